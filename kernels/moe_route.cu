// moe_route.cu: a mixture-of-experts layer's routing and combine at decode sizes, in two kernels instead of the
// ~20 torch ops of torch_moe.sort_by_expert and combine (softmax, topk, sum, divide, a radix sort, index
// arithmetic, searchsorted, a float copy, a product, a cast, zeros and index_add): at decode sizes each of those is
// a CUDA-graph node of a few microseconds and almost no work, and together they took about as long as the experts'
// GEMMs at one token (docs/design.md, "Mixture of experts").
//
// moe_route_kernel: one CTA of MR_THREADS threads. T tokens, E <= MR_MAX_E router logits each (the activation
//   dtype, as F.linear returns them), top_k experts per token, P = T * top_k (token, expert) pairs, pair i = t k + j.
//   1. Warp w takes tokens w, w + MR_WARPS, ...: probabilities = softmax(logits) in float32 (minus the max, expf,
//      the sum, a division), then top_k rounds of a warp argmax (the largest probability; on a tie the lowest
//      expert), renormalized to sum to 1 (summed in j order) where asked. Pair t k + j is the token's j-th choice:
//      its expert and weight go to experts_tk and weights_tk (global scratch, re-read by this CTA only).
//   2. Counts per expert (shared-memory atomics), then warp 0's exclusive scan: group starts, and offs (E) int32, the
//      group end offsets torch._grouped_mm takes (offs[E - 1] = P).
//   3. Warp 0 walks the pairs in index order, 32 at a time: a pair's sorted position is its expert's cursor plus the
//      number of earlier pairs among these 32 with the same expert (__match_any_sync), then the cursors advance. The
//      pairs end up sorted by expert and, within one expert, by pair index (token): the order of the stable sort
//      in torch_moe.sort_by_expert, so the grouped GEMMs see the same rows in the same order.
//   Outputs: offs; tokens (P,) int64 (sorted pair p's token, for the gather of the GEMMs' rows); weights (P,)
//   float32 in sorted order; pos (P,) int32, the sorted position of pair i (for the combine).
//   The result depends on the logits only (no atomics decide an order: counts are sums, positions come from the
//   ordered walk), so a CUDA-graph replay gives the eager call's routing.
// moe_combine_kernel: grid (T), threads over the hidden dims in 16-byte vectors:
//   out[t] = dtype(sum_j dtype(ys[pos[t k + j]] * weight))   (float32 products rounded to the dtype, as
//   torch_moe.combine rounds them, summed in float32 in j order and rounded once; the reference adds them in the
//   dtype, one rounding per add, in expert order: this sum is the closer of the two to the exact one).
// Memory traffic: route reads the T x E logits and writes a few arrays of P entries; combine reads P rows of H
//   and writes T rows.
#include "common.cuh"

#define MR_WARPS 32
#define MR_THREADS (32 * MR_WARPS)
#define MR_MAX_E 512                 // experts a lane holds MR_MAX_E / 32 of (the host routes more in torch)
#define MR_VPL (MR_MAX_E / 32)

// (value, index) of the larger; on equal values the lower index (torch.topk takes one of equal values; the lowest
// index makes the choice deterministic).
FG_INLINE void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

extern "C" __global__ void __launch_bounds__(MR_THREADS)
moe_route_kernel(const scalar_t* __restrict__ logits,  // (T, E)
                 int T, int E, int top_k, int renormalize,
                 int* __restrict__ experts_tk,          // (T * top_k,) scratch
                 float* __restrict__ weights_tk,        // (T * top_k,) the pairs' weights, pair order
                 int* __restrict__ offs,                // (E,) group end offsets
                 long long* __restrict__ tokens,        // (P,) sorted pair -> token
                 float* __restrict__ weights,           // (P,) sorted pair -> weight
                 int* __restrict__ pos) {               // (P,) pair -> sorted position
    __shared__ int s_count[MR_MAX_E];
    __shared__ int s_cursor[MR_MAX_E];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    constexpr unsigned FULL = 0xffffffffu;
    for (int e = tid; e < E; e += MR_THREADS) s_count[e] = 0;

    // 1. softmax and top-k, one warp per token
    for (int t = warp; t < T; t += MR_WARPS) {
        float p[MR_VPL];
        float mx = FG_NEG_INF;
#pragma unroll
        for (int v = 0; v < MR_VPL; ++v) {
            const int e = lane + 32 * v;
            p[v] = e < E ? to_float(logits[(i64)t * E + e]) : FG_NEG_INF;
            mx = fmaxf(mx, p[v]);
        }
        mx = warp_max(mx);
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < MR_VPL; ++v) {
            p[v] = lane + 32 * v < E ? expf(p[v] - mx) : 0.f;
            sum += p[v];
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int v = 0; v < MR_VPL; ++v) p[v] = lane + 32 * v < E ? p[v] / sum : -1.f;  // -1: no expert
        float wsum = 0.f, my_w = 0.f;
        int my_e = 0;
        for (int j = 0; j < top_k; ++j) {  // every lane ends each round holding the same (bv, bi)
            float bv = -1.f;
            int bi = 0x7fffffff;
#pragma unroll
            for (int v = 0; v < MR_VPL; ++v) better(bv, bi, p[v], lane + 32 * v);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                const float ov = __shfl_xor_sync(FULL, bv, off);
                const int oi = __shfl_xor_sync(FULL, bi, off);
                better(bv, bi, ov, oi);
            }
            if (bi >= E) bi = 0;  // NaN probabilities compare false: keep the index in range (the row is NaN anyway)
#pragma unroll
            for (int v = 0; v < MR_VPL; ++v)
                if (lane + 32 * v == bi) p[v] = -2.f;  // taken: below every probability and the padding
            if (lane == j) {
                my_e = bi;
                my_w = bv;
            }
            wsum += bv;
        }
        if (lane < top_k) {  // lane j writes the token's j-th pair (top_k <= 32, the host's check)
            experts_tk[t * top_k + lane] = my_e;
            weights_tk[t * top_k + lane] = renormalize ? my_w / wsum : my_w;
        }
    }
    __syncthreads();  // experts_tk / weights_tk (global, this CTA's writes) and s_count are visible to all

    // 2. counts, starts, end offsets
    const int P = T * top_k;
    for (int i = tid; i < P; i += MR_THREADS) atomicAdd(&s_count[experts_tk[i]], 1);
    __syncthreads();
    if (warp == 0) {
        int run = 0;  // exclusive scan, 32 experts at a time
        for (int e0 = 0; e0 < E; e0 += 32) {
            const int e = e0 + lane;
            const int c = e < E ? s_count[e] : 0;
            int incl = c;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int o = __shfl_up_sync(FULL, incl, off);
                if (lane >= off) incl += o;
            }
            if (e < E) {
                s_cursor[e] = run + incl - c;
                offs[e] = run + incl;
            }
            run += __shfl_sync(FULL, incl, 31);
        }
        __syncwarp();
        // 3. stable positions: pairs in index order, 32 at a time
        for (int i0 = 0; i0 < P; i0 += 32) {
            const int i = i0 + lane;
            const bool ok = i < P;
            const int e = ok ? experts_tk[i] : -1 - lane;  // a distinct key per idle lane
            const unsigned peers = __match_any_sync(FULL, e);
            const int rank = __popc(peers & ((1u << lane) - 1u));
            const int p = ok ? s_cursor[e] + rank : 0;
            __syncwarp();
            if (ok && rank == 0) s_cursor[e] += __popc(peers);
            __syncwarp();
            if (ok) {
                tokens[p] = i / top_k;
                weights[p] = weights_tk[i];
                pos[i] = p;
            }
        }
    }
}

extern "C" __global__ void moe_combine_kernel(const scalar_t* __restrict__ ys,      // (P, H) sorted pairs' outputs
                                              const int* __restrict__ pos,          // (T * top_k,)
                                              const float* __restrict__ weights_tk, // (T * top_k,)
                                              scalar_t* __restrict__ out,           // (T, H)
                                              int H, int top_k) {
    const int t = blockIdx.x;
    for (int d = 8 * threadIdx.x; d < H; d += 8 * blockDim.x) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < top_k; ++j) {
            const int i = t * top_k + j;
            const float w = weights_tk[i];
            float y[8];
            unpack8(ld_v4(ys + (i64)pos[i] * H + d), y);
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[x] += round_to_dtype(y[x] * w);
        }
        st_v4(out + (i64)t * H + d, pack8(acc));
    }
}
