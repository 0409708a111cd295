// prefill_attention.cu: varlen causal flash attention over the paged KV cache (FlashAttention-2 scheme).
//
// Algorithm: grid (ceil(max_seqlen_q / BM), Hq, B), 4 warps per CTA. A CTA owns BM query rows of one
//   sequence and one head; each warp owns MT m-tiles of 16 rows. Query row i of sequence b sits at position
//   context_len_b - q_len_b + i (bottom-right causal alignment, so prefix-cache hits and chunked prefill
//   need no special path) and attends to keys 0 .. that position. K/V tiles of BN tokens are visited from
//   the last one (the diagonal, masked) down to 0 (unmasked), each gathered from the paged cache through
//   the block table with cp.async (16-byte chunks, one page lookup per token row) into a 2-stage shared
//   memory ring: tile n-1 is in flight while tile n is used. Per tile and warp:
//     S (16 MT x BN) = Q (16 MT x D) . K^T   mma.sync m16n8k16 (fp32 accumulate); K by ldmatrix, each K
//                                            fragment serving the warp's MT m-tiles
//     online softmax in float32: masked scores set to -inf, exp2 with the scale folded into one FMA,
//     running max and sum per row; O is rescaled only when some row's max moved (warp vote)
//     O (16 MT x D) += P . V                 P packed to 16 bits from the S accumulators, V by
//                                            ldmatrix.trans, each V fragment serving the MT m-tiles
//   Shared-memory rows are 16-byte-chunk XOR-swizzled (chunk ^ (row & 7)) so ldmatrix and the cp.async
//   writes are free of bank conflicts. The output tile goes through shared memory for 16-byte stores.
//   CTAs are launched longest-first (the last query blocks of a sequence see the most keys).
// Sliding window (window > 0; 0: none): the row at position p sees keys (p - window, p] only. The scores
//   below a row's window are masked like those past the diagonal, and the tiles below every row's window are
//   never visited: the loop stops at the tile holding the block's lowest window start (row 0's, position
//   qoff + m0 - window + 1), so a long prompt costs O(window) per row.
// Tiles (compile-time, -DPF_MT / -DPF_BN; the wrapper picks per head_dim): BM = 64 MT query rows, BN keys,
//   the full head_dim D. MT = 1 keeps Q's fragments in registers; MT = 2 (the default: half the
//   shared-memory reads of K and V per FLOP) re-reads them from shared memory each tile. Shared memory:
//   2 stages x (K + V) = 4 BN D 2 bytes, plus the Q tile (BM D 2 bytes) when MT = 2 (with MT = 1, Q is
//   staged in stage 1 before the loop): 96 KB at MT = 2, BN = 64, D = 128 (2 CTAs per SM).
//   D = 256 (Gemma 3) runs MT = 1, BN = 32 (the wrapper's only tile there): Q's fragments (64 registers) and O
//   (128) for 16 rows x 256 dims leave no room for more (ptxas spills at BN = 64 or MT = 2); 64 KB of shared
//   memory (Q, 32 KB, staged in stage 1's K and V, exactly its size), 2 CTAs per SM. The wgmma kernel does not
//   take D = 256: the wrapper routes it here on Hopper too.
// Memory traffic: q and out once; K/V of tile n once per (query block, head) CTA, mostly from L2 (the CTAs
//   of one sequence and head run side by side); HBM sees about ctx * Hkv * D * 2 * sizeof(dtype) per
//   sequence. FLOPs: 4 * D * (number of unmasked (query, key) pairs) per head.
// PF_SHARED=1: the shared-prefix part of a cascade decode step (docs/design.md, "Shared-prefix decode"). A
//   "sequence" b is a group of decode sequences that share their leading cache blocks; its query rows are its
//   members' query heads of one kv head (row i: member slot i / r, query head kvh * r + i % r, r = Hq / Hkv),
//   q and the output addressed through q_rows (NG, q_group) (-1: padding). Grid (ceil(q_group r / BM) *
//   splits, Hkv, NG): a CTA takes BM rows of one kv head over one of `splits` equal runs of the prefix's key
//   tiles, so each K/V tile of the shared prefix is read once per BM query heads (the decode kernel reads it
//   once per 8), and the splits give a few groups enough CTAs to fill the GPU (a group takes one split per
//   PF_SPLIT_KEYS of its shared tokens, at most `splits`: the other CTAs return at once). No causal mask: every
//   row sits after the prefix (its new token is in the member's own blocks) and sees all context_lens[b] shared tokens
//   (row 0's position is taken to be context_lens[b], so the mask above keeps only j < ctx). The output is
//   float32, unrounded, with its natural-log LSE, (splits, B, Hq, D) and (splits, B, Hq) indexed by the split and
//   the member's row: the decode kernel's second launch merges the splits' states into each sequence's own part
//   (entries of sequences in no group, and of empty splits, are not written: the caller fills the LSE with -inf).
#include "common.cuh"

#ifndef FG_HEAD_DIM
#define FG_HEAD_DIM 128
#endif
#ifndef PF_MT
#define PF_MT 2                       // 16-row m-tiles per warp (1: Q in registers; 2: Q re-read from smem)
#endif
#ifndef PF_BN
#define PF_BN 64                      // keys per tile
#endif
#ifndef PF_SHARED
#define PF_SHARED 0
#endif
#ifndef PF_SPLIT_KEYS
#define PF_SPLIT_KEYS 512             // PF_SHARED: shared tokens per key split (cuda_attention.SHARED_SPLIT_KEYS)
#endif
#define D FG_HEAD_DIM
#define BN PF_BN
#define MT PF_MT
#define PF_THREADS 128
#define BM (4 * 16 * MT)              // query rows per CTA
#define CH (D / 8)                    // 16-byte chunks per row
#define RSTEP (PF_THREADS / CH)      // rows apart between one thread's chunks in a tile load
#define NLD (BN * CH / PF_THREADS)   // chunks per thread per K (or V) tile
#define NLDQ (BM * CH / PF_THREADS)  // chunks per thread of the Q tile

static_assert(D % 16 == 0 && D >= 32 && D <= 256 && PF_THREADS % CH == 0, "prefill_attention: head_dim");
static_assert((MT == 1 || MT == 2) && BN % 16 == 0 && BN * CH >= PF_THREADS, "prefill_attention: tiles");
static_assert(MT == 2 || BM <= 2 * BN, "MT == 1 stages Q in stage 1's K and V buffers");

// Index (in 16-byte units) of chunk ch of row `row` in a swizzled tile.
FG_INLINE int swz(int row, int ch) { return row * CH + (ch ^ (row & 7)); }

extern "C" __global__ void __launch_bounds__(PF_THREADS, 2)
prefill_attention_kernel(const scalar_t* __restrict__ q,        // (T, Hq, D)
                         const scalar_t* __restrict__ k_cache,  // (num_blocks, block_size, Hkv, D)
                         const scalar_t* __restrict__ v_cache,
                         const int* __restrict__ cu_seqlens_q,  // (B + 1,)
                         const int* __restrict__ context_lens,  // (B,)
                         const int* __restrict__ block_tables,  // (B, bt_stride)
                         int bt_stride,
                         scalar_t* __restrict__ out,            // (T, Hq, D); PF_SHARED: unused (null)
                         int hq, int hkv, int log2_bs, float scale_log2, int num_mblocks,
                         int window                             // sliding window (0: none; not with PF_SHARED)
#if PF_SHARED
                         , const int* __restrict__ q_rows,      // (NG, q_group) decode rows of each group's members
                         int q_group,
                         int splits,                            // key splits: grid.x = num_mblocks * splits
                         int split_stride,                      // B * Hq: entries between two splits' outputs
                         float* __restrict__ out_f32,           // (splits, B, Hq, D) float32
                         float* __restrict__ lse_out            // (splits, B, Hq) natural log
#endif
                         ) {
    extern __shared__ uint4 smem[];
    const int b = blockIdx.z;
#if PF_SHARED
    (void)cu_seqlens_q;
    const int mb = blockIdx.x % num_mblocks, sp = blockIdx.x / num_mblocks;  // row block, key split
    const int r = hq / hkv, kvh = blockIdx.y, h = 0;   // h: the plain kernel's query head (unused here)
    const int q_start = 0, qlen = q_group * r;          // rows of the group (padding members included)
    const int m0 = mb * BM;
    const int ctx = context_lens[b];                    // the group's shared tokens
    const int qoff = ctx;                               // every row after the prefix: no causal mask
    if (m0 >= qlen || ctx <= 0) return;                 // an empty group (graph padding): nothing to merge
    // key split sp takes tiles [t_lo, n_tiles) of the prefix's, in equal runs; an empty one writes nothing (its
    // LSE stays the caller's -inf)
#if D == 256
    // one split (the wrapper passes 1): the D = 256 variant has no register to spare for a split's first tile
    const int t_lo = 0, n_tiles = ceil_div(ctx, BN);
    (void)splits;
#else
    // the splits this group's prefix takes: one per PF_SPLIT_KEYS shared tokens, at most `splits` (the grid's,
    // which follows the block tables' width so that a captured graph has a fixed grid): the CTAs of the splits a
    // short prefix does not take return at once, and so does an empty run
    const int used = min(splits, max(1, ctx / PF_SPLIT_KEYS));
    const int t_run = ceil_div(ceil_div(ctx, BN), used), t_lo = sp * t_run;
    const int n_tiles = min(ceil_div(ctx, BN), t_lo + t_run);
    if (sp >= used || t_lo >= n_tiles) return;
#endif
    out_f32 += (i64)sp * split_stride * D;
    lse_out += (i64)sp * split_stride;
    // decode row (member) and query head of row m of this group, or row -1 (padding)
    auto q_of = [&](int m) {
        const int mem = m < qlen ? q_rows[(i64)b * q_group + m / r] : -1;
        return make_int2(mem, kvh * r + m % r);
    };
#else
    const int mb = num_mblocks - 1 - blockIdx.x;  // longest-running blocks first
    const int h = blockIdx.y;
    const int q_start = cu_seqlens_q[b];
    const int qlen = cu_seqlens_q[b + 1] - q_start;
    const int m0 = mb * BM;
    if (m0 >= qlen) return;
    const int ctx = context_lens[b];
    const int qoff = ctx - qlen;                       // position of query row 0
#endif
#if !PF_SHARED
    const int kv_end = min(ctx, qoff + m0 + BM);       // keys this block can see
    if (kv_end <= 0) return;                           // NOTE: needs ctx >= qlen > 0 (contract)
    const int n_tiles = ceil_div(kv_end, BN), t_lo = 0;
#endif
    const int win = window > 0 ? min(window, 1 << 30) : 1 << 30;  // no window: more than any position
    // Tiles n_tiles - 1 down to the one holding the block's lowest window start (its first row's; 0 without a
    // window) and t_lo (a key split's first; else 0): tile n is visited iff n >= t_lo and its last key is past row
    // 0's window start. (A test, not a count kept in a register: the MT = 2, D = 128 variant has none to spare.)
    auto visited = [&](int n) { return n >= t_lo && n * BN + BN - 1 > qoff + m0 - win; };
#if !PF_SHARED
    const int kvh = h / (hq / hkv);
#endif

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    // Shared memory: [Q (MT == 2 only)] [K0 V0] [K1 V1]; with MT == 1, Q is staged in K1 V1.
    uint4* const stages = smem + (MT == 2 ? BM * CH : 0);
    uint4* const sK0 = stages;
    uint4* const sV0 = stages + BN * CH;
    uint4* const sK1 = stages + 2 * BN * CH;
    uint4* const sV1 = stages + 3 * BN * CH;
    uint4* const sQ = MT == 2 ? smem : sK1;

    const int lch = tid % CH, lrow0 = tid / CH;
    const i64 q_row_stride = (i64)hq * D;

    // Q tile -> shared memory (rows past the sequence are zero-filled).
#pragma unroll
    for (int i = 0; i < NLDQ; ++i) {
        const int row = lrow0 + i * RSTEP;
#if PF_SHARED
        const int2 mh = q_of(m0 + row);
        const bool valid = mh.x >= 0;
        const scalar_t* src = q + (i64)(valid ? mh.x : 0) * q_row_stride + mh.y * D + lch * 8;
#else
        const bool valid = m0 + row < qlen;
        const scalar_t* src = q + (i64)(q_start + (valid ? m0 + row : 0)) * q_row_stride + h * D + lch * 8;
#endif
        cp_async_16(sQ + swz(row, lch), src, valid ? 16 : 0);
    }

    const i64 kv_row_stride = (i64)hkv * D;
    const i64 head_off = (i64)kvh * D + lch * 8;
    const int bs_mask = (1 << log2_bs) - 1;
    const int* bt = block_tables + (i64)b * bt_stride;
    auto load_kv = [&](int n, uint4* sk, uint4* sv) {
#pragma unroll
        for (int i = 0; i < NLD; ++i) {
            const int row = lrow0 + i * RSTEP;
            const int tok = min(n * BN + row, ctx - 1);  // past the end: any valid token, masked later
            const i64 r = ((i64)bt[tok >> log2_bs] << log2_bs) + (tok & bs_mask);
            const i64 off = r * kv_row_stride + head_off;
            cp_async_16(sk + swz(row, lch), k_cache + off);
            cp_async_16(sv + swz(row, lch), v_cache + off);
        }
    };

    // tile n's stage: MT == 2 by its parity (no count to keep); MT == 1 from the first tile visited, stage 0 (Q
    // is in stage 1's buffers until the loop)
    auto stage_of = [&](int n) { return MT == 2 ? (n & 1) : ((n_tiles - 1 - n) & 1); };
    load_kv(n_tiles - 1, stage_of(n_tiles - 1) ? sK1 : sK0, stage_of(n_tiles - 1) ? sV1 : sV0);
    cp_async_commit();
    const int mi = lane >> 3;          // which 8x8 matrix this lane addresses in ldmatrix.x4
    const int wrow = warp * 16 * MT;   // the warp's first row in the CTA's tile
#if PF_MT == 1
    cp_async_wait<0>();
    __syncthreads();
    // Q fragments (A operand, rows wrow .. wrow + 15) for the whole loop.
    u32 qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(qf[ks], sQ + swz(wrow + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
    __syncthreads();  // sQ (stage 1's buffers) is free from here
#endif

    float o[MT][D / 8][4];
    float mr[MT][2], lr[MT][2];  // running max and (per-lane partial) sum of rows g and g + 8
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[t][i][0] = o[t][i][1] = o[t][i][2] = o[t][i][3] = 0.f;
        mr[t][0] = mr[t][1] = FG_NEG_INF;
        lr[t][0] = lr[t][1] = 0.f;
    }
    const int qpos = qoff + m0 + wrow + g;  // position of row g of the warp's first m-tile

    for (int n = n_tiles - 1; visited(n); --n) {
        const int st = stage_of(n);
        const uint4* sk = st ? sK1 : sK0;
        const uint4* sv = st ? sV1 : sV0;
        if (visited(n - 1)) {
            load_kv(n - 1, st ? sK0 : sK1, st ? sV0 : sV1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // S = Q K^T
        float s[MT][BN / 8][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[t][i][0] = s[t][i][1] = s[t][i][2] = s[t][i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#if PF_MT == 1
            const u32* qa[1] = {qf[ks]};
#else
            u32 qr[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                ldmatrix_x4(qr[t], sQ + swz(wrow + 16 * t + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
            const u32* qa[MT] = {qr[0], qr[1]};
#endif
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 kb[4];
                ldmatrix_x4(kb, sk + swz(np * 16 + (mi >> 1) * 8 + (lane & 7), 2 * ks + (mi & 1)));
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma_16816(s[t][2 * np], qa[t], kb);
                    mma_16816(s[t][2 * np + 1], qa[t], kb + 2);
                }
            }
        }

        // Mask: key j is visible to the row at position p iff j <= p (and j < ctx), and j > p - window with a
        // window; tested where the tile crosses the diagonal, the context's end or the last row's window start.
        // Scores stay unscaled: the scale is folded into the exponent (max commutes with a positive scale).
        if ((n * BN + BN - 1 > qoff + m0) || (n * BN + BN > ctx) || (n * BN + win <= qoff + m0 + BM - 1)) {
#pragma unroll
            for (int t = 0; t < MT; ++t) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = n * BN + nt * 8 + 2 * c + (e & 1);
                        const int p = qpos + 16 * t + (e >> 1) * 8;
                        // visible iff 0 <= p - j < win (j <= p, j > p - window), and j < ctx
                        if ((unsigned)(p - j) >= (unsigned)win || j >= ctx) s[t][nt][e] = FG_NEG_INF;
                    }
                }
            }
        }

        // Online softmax per m-tile (common.cuh), then P packed as A fragments (k = keys).
        u32 pa[MT][BN / 16][4];
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            float al[2];
            online_softmax_m16<BN / 8>(&s[t][0][0], scale_log2, mr[t], lr[t], al);
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                pa[t][nt / 2][(nt & 1) * 2] = pack2(s[t][nt][0], s[t][nt][1]);
                pa[t][nt / 2][(nt & 1) * 2 + 1] = pack2(s[t][nt][2], s[t][nt][3]);
            }
            rescale_rows_m16<D / 8>(&o[t][0][0], al);
        }

        // O += P V (each V fragment serves the warp's MT m-tiles)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const int row = kk * 16 + (mi & 1) * 8 + (lane & 7);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 vb[4];
                ldmatrix_x4_trans(vb, sv + swz(row, 2 * dp + (mi >> 1)));
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma_16816(o[t][2 * dp], pa[t][kk], vb);
                    mma_16816(o[t][2 * dp + 1], pa[t][kk], vb + 2);
                }
            }
        }
        __syncthreads();  // the next iteration's loads overwrite this stage
    }

#if PF_SHARED
    // Epilogue: each lane writes its rows' normalised float32 O (2 dims per fragment) and, lane c == 0, the
    // natural-log LSE, (m * scale + log2 l) * ln 2 in the units of the online softmax (common.cuh).
    (void)out;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        float inv[2];
        softmax_inverse_m16(lr[t], inv);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int2 mh = q_of(m0 + wrow + 16 * t + g + 8 * half);
            if (mh.x < 0) continue;
            const i64 idx = (i64)mh.x * hq + mh.y;
            float* dst = out_f32 + idx * D + 2 * c;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<float2*>(dst + dt * 8) =
                    make_float2(o[t][dt][2 * half] * inv[half], o[t][dt][2 * half + 1] * inv[half]);
            if (c == 0) lse_out[idx] = (mr[t][half] * scale_log2 - __log2f(inv[half])) * FG_LN2;
        }
    }
#else
    // Epilogue: normalise, stage the warp's rows in shared memory (its own rows of the first BM rows),
    // write 16-byte chunks.
    uint4* sO = smem;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        float inv[2];
        softmax_inverse_m16(lr[t], inv);
        const int r0 = wrow + 16 * t + g;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            reinterpret_cast<u32*>(sO + swz(r0, dt))[c] = pack2(o[t][dt][0] * inv[0], o[t][dt][1] * inv[0]);
            reinterpret_cast<u32*>(sO + swz(r0 + 8, dt))[c] = pack2(o[t][dt][2] * inv[1], o[t][dt][3] * inv[1]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 16 * MT * CH / 32; ++i) {
        const int idx = lane + 32 * i;
        const int row = idx / CH, ch = idx % CH;
        const int qrow = m0 + wrow + row;
        if (qrow < qlen)
            st_v4(out + (i64)(q_start + qrow) * q_row_stride + h * D + ch * 8, sO[swz(wrow + row, ch)]);
    }
#endif
}
