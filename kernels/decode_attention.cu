// decode_attention.cu: paged decode attention (one new query token per sequence), GQA-aware, split-KV.
//
// Algorithm (FlashDecoding with the GQA group on the tensor cores):
//   grid (num_splits, Hkv * ceil(G / 8), B), 4 warps per CTA. A CTA owns one sequence b, one kv head and
//   up to 8 of the G = Hq / Hkv query heads that share it, over one split of the context: every K/V element
//   of the split is read from HBM exactly once per step, whatever G (G > 8 re-reads it once per 8 heads).
//   The warps take 16-token steps in turn (warp w: steps w, w + 4, ...). A step is two m16n8k16 passes:
//     S^T (16 tokens x 8 heads) = K (16 x D) . Q^T (D x 8)     A = K straight from global memory, B = Q
//     O^T (D x 8 heads)       += V^T (D x 16) . P^T (16 x 8)    A = V^T built in registers, B = P^T
//   with an online softmax per head in float32 (exp2, scale folded in). K and V are loaded with 16-byte
//   loads straight into fragment registers: the head dimension is permuted consistently on both sides of
//   each product (a dot product does not care about the order of its terms), so no shared memory, no
//   ldmatrix; V^T's token pairs are formed with byte permutes and P^T with movmatrix. The next step's
//   K/V loads (read-only, no L1 allocation, 256-byte L2 fetches) and the page-table read of the step
//   after are issued before the current step's math.
//   NOTE: a step never crosses a page: steps start at multiples of 16 tokens and block_size is a power of
//   two >= 16. Tokens past the split's end are clamped to its last token (valid memory) and masked.
//   At the end the 4 warps merge (m, l, O) through shared memory. With one split the CTA writes the output
//   (and the LSE); otherwise it writes a float32 partial O and its LSE, counts itself done on a per-(b,
//   head group) counter, and the last split to finish merges all the partials (no second kernel: at batch 1
//   a separate combine kernel took 3.3 us against the attention's 5.0 us in a profile). The split of sequence b is ceil(ctx_b / num_splits)
//   rounded up to 64 tokens, so the splits of a short sequence may be empty: such CTAs exit at once and
//   are not counted.
// Tiles: 16 tokens x D per warp step, 8 heads per CTA; registers only (the merge uses 16 KB of shared
//   memory at D = 128).
// Memory traffic: K and V of every context token once (2 * ctx * Hkv * D * sizeof(dtype) per sequence),
//   plus q, the block tables and, with splits, 4 * (D + 1) bytes per split and head written and re-read.
#include "common.cuh"

#ifndef FG_HEAD_DIM
#define FG_HEAD_DIM 128
#endif
#define D FG_HEAD_DIM
#define DEC_WARPS 4
#define DEC_HEADS 8                // query heads per CTA: the mma's n
#define DEC_STEP 16                // tokens per warp step: the mma's m
#define KCH (D / 32)               // 16-byte K chunks per token per thread
#define VCH (D / 64)               // 16-byte V chunks per token per thread

static_assert(D % 64 == 0 && D <= 256, "decode_attention: head_dim must be 64, 128, 192 or 256");

// Tokens per split for a context of ctx tokens: a multiple of DEC_WARPS * DEC_STEP.
FG_INLINE int split_chunk(int ctx, int num_splits) {
    const int c = ceil_div(ctx, num_splits);
    return ceil_div(c, DEC_WARPS * DEC_STEP) * (DEC_WARPS * DEC_STEP);
}

FG_INLINE u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

struct KVStep {
    uint4 k[2][KCH];  // tokens g, g + 8: dims 32 j + 8 c .. + 7
    uint4 v[4][VCH];  // tokens 2c, 2c + 1, 2c + 8, 2c + 9: dims 64 j + 8 g .. + 7
};

FG_INLINE void load_step(KVStep& r, const scalar_t* __restrict__ k_cache, const scalar_t* __restrict__ v_cache,
                         i64 page_row0, int t0, int last, int bs_mask, i64 row_stride, i64 head_off, int g,
                         int c) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int tok = min(t0 + g + 8 * i, last);
        const scalar_t* p = k_cache + (page_row0 + (tok & bs_mask)) * row_stride + head_off + 8 * c;
#pragma unroll
        for (int j = 0; j < KCH; ++j) r.k[i][j] = ld_v4_stream(p + 32 * j);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int tok = min(t0 + 2 * c + (i & 1) + 8 * (i >> 1), last);
        const scalar_t* p = v_cache + (page_row0 + (tok & bs_mask)) * row_stride + head_off + 8 * g;
#pragma unroll
        for (int j = 0; j < VCH; ++j) r.v[i][j] = ld_v4_stream(p + 64 * j);
    }
}

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, 2)
decode_attention_kernel(const scalar_t* __restrict__ q,        // (B, Hq, D)
                        const scalar_t* __restrict__ k_cache,  // (num_blocks, block_size, Hkv, D)
                        const scalar_t* __restrict__ v_cache,
                        const int* __restrict__ context_lens,  // (B,)
                        const int* __restrict__ block_tables,  // (B, bt_stride)
                        int bt_stride,
                        scalar_t* __restrict__ out,            // (B, Hq, D), num_splits == 1
                        float* __restrict__ lse_out,           // (B, Hq) natural log, or null
                        float* __restrict__ part_o,            // (num_splits, B, Hq, D), num_splits > 1
                        float* __restrict__ part_lse,          // (num_splits, B, Hq), log2 units
                        int* __restrict__ split_counters,      // (B * Hkv * ceil(G / 8),) zeros, num_splits > 1
                        int batch, int hq, int hkv, int log2_bs, float scale_log2, int num_splits) {
    __shared__ __align__(16) float s_o[DEC_WARPS][DEC_HEADS][D];
    __shared__ float s_m[DEC_WARPS][DEC_HEADS];
    __shared__ float s_l[DEC_WARPS][DEC_HEADS];

    const int split = blockIdx.x;
    const int group = hq / hkv;
    const int hgroups = ceil_div(group, DEC_HEADS);
    const int kvh = blockIdx.y / hgroups;
    const int hg = blockIdx.y % hgroups;
    const int b = blockIdx.z;
    const int head0 = kvh * group + hg * DEC_HEADS;
    const int nh = min(DEC_HEADS, group - hg * DEC_HEADS);
    const int ctx = context_lens[b];
    const int chunk = num_splits == 1 ? ctx : split_chunk(ctx, num_splits);
    const int start = split * chunk;
    const int end = min(start + chunk, ctx);
    const int tid = threadIdx.x;

    if (start >= end) {
        // An empty split (not counted, not merged); an empty context: zeros, written by split 0.
        if (num_splits == 1 || (ctx == 0 && split == 0)) {
            for (int p = tid; p < nh * D; p += blockDim.x)
                out[((i64)b * hq + head0 + p / D) * D + p % D] = from_float(0.f);
            if (lse_out != nullptr && tid < nh) lse_out[(i64)b * hq + head0 + tid] = FG_NEG_INF;
        }
        return;
    }

    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;

    // Q^T as B fragments: head g, dims 32 j + 8 c .. + 7 (the permuted order K uses too).
    u32 qf[D / 16][2];
    {
        const bool hv = g < nh;
        const scalar_t* qp = q + ((i64)b * hq + head0 + (hv ? g : 0)) * D + 8 * c;
#pragma unroll
        for (int j = 0; j < D / 32; ++j) {
            const uint4 w = hv ? ld_v4(qp + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
            qf[2 * j][0] = w.x;
            qf[2 * j][1] = w.y;
            qf[2 * j + 1][0] = w.z;
            qf[2 * j + 1][1] = w.w;
        }
    }

    float o[D / 16][4];
#pragma unroll
    for (int i = 0; i < D / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = FG_NEG_INF, m1 = FG_NEG_INF, l0 = 0.f, l1 = 0.f;  // heads 2c and 2c + 1

    const i64 row_stride = (i64)hkv * D;
    const i64 head_off = (i64)kvh * D;
    const int bs_mask = (1 << log2_bs) - 1;
    const int* bt = block_tables + (i64)b * bt_stride;
    const int last = end - 1;
    const int stride = DEC_STEP * DEC_WARPS;

    int t0 = start + DEC_STEP * warp;
    KVStep cur;
    if (t0 < end) load_step(cur, k_cache, v_cache, (i64)bt[t0 >> log2_bs] << log2_bs, t0, last, bs_mask,
                            row_stride, head_off, g, c);
    int next_page = t0 + stride < end ? bt[(t0 + stride) >> log2_bs] : 0;

    for (; t0 < end; t0 += stride) {
        const int t1 = t0 + stride;
        KVStep nxt;
        if (t1 < end)
            load_step(nxt, k_cache, v_cache, (i64)next_page << log2_bs, t1, last, bs_mask, row_stride,
                      head_off, g, c);
        if (t1 + stride < end) next_page = bt[(t1 + stride) >> log2_bs];

        // S^T = K . Q^T: rows = tokens g, g + 8; columns = heads 2c, 2c + 1.
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < KCH; ++j) {
            u32 a[4];
            a[0] = cur.k[0][j].x; a[1] = cur.k[1][j].x; a[2] = cur.k[0][j].y; a[3] = cur.k[1][j].y;
            mma_16816(s, a, qf[2 * j]);
            a[0] = cur.k[0][j].z; a[1] = cur.k[1][j].z; a[2] = cur.k[0][j].w; a[3] = cur.k[1][j].w;
            mma_16816(s, a, qf[2 * j + 1]);
        }
        const bool v0 = t0 + g < end, v1 = t0 + g + 8 < end;
        s[0] = v0 ? s[0] * scale_log2 : FG_NEG_INF;
        s[1] = v0 ? s[1] * scale_log2 : FG_NEG_INF;
        s[2] = v1 ? s[2] * scale_log2 : FG_NEG_INF;
        s[3] = v1 ? s[3] * scale_log2 : FG_NEG_INF;

        // Online softmax per head (column); tokens are spread over the lanes of equal c.
        float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float mu0 = mn0 == FG_NEG_INF ? 0.f : mn0, mu1 = mn1 == FG_NEG_INF ? 0.f : mn1;
        const float al0 = fast_exp2(m0 - mu0), al1 = fast_exp2(m1 - mu1);
        const float p0 = fast_exp2(s[0] - mu0), p2 = fast_exp2(s[2] - mu0);
        const float p1 = fast_exp2(s[1] - mu1), p3 = fast_exp2(s[3] - mu1);
        l0 = l0 * al0 + p0 + p2;
        l1 = l1 * al1 + p1 + p3;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int i = 0; i < D / 16; ++i) {
            o[i][0] *= al0; o[i][1] *= al1; o[i][2] *= al0; o[i][3] *= al1;
        }

        // P^T as B fragments: (tokens 2c..2c+1 | 2c+8..2c+9, head g).
        u32 pb[2];
        pb[0] = movmatrix_trans(pack2(p0, p1));
        pb[1] = movmatrix_trans(pack2(p2, p3));

        // O^T += V^T . P^T; m-tile 4 j + i covers dims 64 j + 8 g + 2 i (row g) and + 1 (row g + 8).
#pragma unroll
        for (int j = 0; j < VCH; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 wa = word(cur.v[0][j], i), wb = word(cur.v[1][j], i);
                const u32 wc = word(cur.v[2][j], i), wd = word(cur.v[3][j], i);
                u32 a[4];
                a[0] = pack_lo(wa, wb);
                a[1] = pack_hi(wa, wb);
                a[2] = pack_lo(wc, wd);
                a[3] = pack_hi(wc, wd);
                mma_16816(o[4 * j + i], a, pb);
            }
        }
        cur = nxt;
    }

    // Row sums over the warp's tokens.
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }

    // Merge the warps through shared memory.
#pragma unroll
    for (int j = 0; j < VCH; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int d = 64 * j + 8 * g + 2 * i;
            s_o[warp][2 * c][d] = o[4 * j + i][0];
            s_o[warp][2 * c + 1][d] = o[4 * j + i][1];
            s_o[warp][2 * c][d + 1] = o[4 * j + i][2];
            s_o[warp][2 * c + 1][d + 1] = o[4 * j + i][3];
        }
    }
    if (g == 0) {
        s_m[warp][2 * c] = m0;
        s_m[warp][2 * c + 1] = m1;
        s_l[warp][2 * c] = l0;
        s_l[warp][2 * c + 1] = l1;
    }
    __syncthreads();

    for (int p = tid; p < nh * (D / 8); p += blockDim.x) {
        const int h = p / (D / 8), d0 = (p % (D / 8)) * 8;
        float mm = FG_NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mm = fmaxf(mm, s_m[w][h]);
        float ll = 0.f, acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float sc = fast_exp2(s_m[w][h] - mm);  // 0 for a warp that saw no token
            ll += s_l[w][h] * sc;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += s_o[w][h][d0 + e] * sc;
        }
        const float inv = 1.f / ll;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= inv;
        const int head = head0 + h;
        if (num_splits == 1) {
            st_v4(out + ((i64)b * hq + head) * D + d0, pack8(acc));
            if (lse_out != nullptr && d0 == 0) lse_out[(i64)b * hq + head] = (mm + __log2f(ll)) * FG_LN2;
        } else {
            float* dst = part_o + (((i64)split * batch + b) * hq + head) * D + d0;
            *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
            *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
            if (d0 == 0) part_lse[((i64)split * batch + b) * hq + head] = mm + __log2f(ll);
        }
    }
    if (num_splits == 1) return;

    // The last split of (b, head group) to finish merges them all: out = sum_s w_s O_s / sum_s w_s,
    // w_s = 2^(lse_s - max lse), over the non-empty splits.
    const int n = ceil_div(ctx, chunk);  // non-empty splits
    if (!arrive_last(split_counters + (i64)b * gridDim.y + blockIdx.y, n)) return;
    for (int p = tid; p < nh * (D / 8); p += blockDim.x) {
        const int head = head0 + p / (D / 8), d0 = (p % (D / 8)) * 8;
        float mm = FG_NEG_INF;
        for (int sp = 0; sp < n; ++sp) mm = fmaxf(mm, __ldcg(part_lse + ((i64)sp * batch + b) * hq + head));
        float ll = 0.f, acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.f;
        for (int sp = 0; sp < n; ++sp) {
            const i64 idx = ((i64)sp * batch + b) * hq + head;
            const float w = fast_exp2(__ldcg(part_lse + idx) - mm);
            const float4 v0 = __ldcg(reinterpret_cast<const float4*>(part_o + idx * D + d0));
            const float4 v1 = __ldcg(reinterpret_cast<const float4*>(part_o + idx * D + d0 + 4));
            ll += w;
            acc[0] += w * v0.x; acc[1] += w * v0.y; acc[2] += w * v0.z; acc[3] += w * v0.w;
            acc[4] += w * v1.x; acc[5] += w * v1.y; acc[6] += w * v1.z; acc[7] += w * v1.w;
        }
        const float inv = 1.f / ll;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= inv;
        st_v4(out + ((i64)b * hq + head) * D + d0, pack8(acc));
        if (lse_out != nullptr && d0 == 0) lse_out[(i64)b * hq + head] = (mm + __log2f(ll)) * FG_LN2;
    }
}
