// skinny_gemm.cu: y (M, N) = x (M, K) . W (N, K)^T [+ bias (N)] for M <= 8 rows (decode at small batch).
//
// At a handful of rows a linear layer is a pass over its weight: the kernel exists to stream W from HBM at
// full bandwidth, with the few FLOPs on the tensor cores (cuBLAS picks a kernel well short of the bandwidth
// for some of these shapes at M = 1, e.g. Llama-3.1-8B's o_proj; docs/benchmark-history.md).
//
// Algorithm: grid ceil(N / 16), NW warps per CTA (2, 4 or 8, the host's choice). A CTA owns 16 output columns
//   n0 .. n0 + 15; warp w owns the w-th slice of K (split-K inside the CTA). A warp step covers 32 k per
//   row with two m16n8k16 products:
//     D^T (16 n x 8 m) += W (16 n x 16 k) . x^T (16 k x 8 m)     A = W, B = x^T, fp32 accumulators
//   Each lane (g = lane / 4, c = lane % 4) loads W rows n0 + g and n0 + g + 8 and x row g (zeros for
//   g >= M) at k + 8c .. + 7 with one 16-byte load each, straight into fragment registers: product j of the
//   step takes words 2j (logical k 2c, 2c + 1) and 2j + 1 (logical k 2c + 8, 2c + 9) of those vectors, on
//   both sides, so the 32 k of the step are each used once (a dot product does not care about the order
//   of its terms) and no shared memory or shuffle is needed. SG_U steps' loads (2 SG_U W vectors per lane,
//   read-only, no L1 allocation, 256-byte L2 fetches) are issued before their products.
//   The NW partial 16 x 8 tiles are summed through shared memory; bias is added in fp32 and y rounded once.
// Tiles: 16 columns x K per CTA; registers hold 2 x SG_U x 3 vectors per lane (this chunk and the next).
// Memory traffic: W once (N K sizeof(dtype)), x once per CTA (L2-resident), y once.
#include "skinny_common.cuh"

#ifndef SG_U
#define SG_U 8           // 32-wide k steps whose loads are in flight together (host: 4 or 8)
#endif

struct Chunk {
    uint4 w0[SG_U], w1[SG_U], x[SG_U];  // SG_U steps of 32 k: W rows g and g + 8, x row g
};

// Loads of the chunk at kb. K and k_per_warp are multiples of 8, so k < kend => k + 8 <= kend. Steps past
// the slice load its last vector instead (valid memory, just fetched: an L2 hit; no branch) and use zeros.
// W's loads and x's are apart so that the first chunk's W can be in flight before pdl_wait (W is no earlier
// kernel's output; x is).
FG_INLINE void load_chunk_w(Chunk& ch, const scalar_t* w0, const scalar_t* w1, int kb, int kend, int c) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < SG_U; ++u) {
        const int k = kb + 32 * u + 8 * c;
        const bool ok = k < kend;
        const int kk = ok ? k : kend - 8;
        ch.w0[u] = ld_v4_stream(w0 + kk);
        ch.w1[u] = ld_v4_stream(w1 + kk);
        if (!ok) ch.w0[u] = ch.w1[u] = zero;
    }
}

FG_INLINE void load_chunk_x(Chunk& ch, const scalar_t* xr, bool has_x, int kb, int kend, int c) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < SG_U; ++u) {
        const int k = kb + 32 * u + 8 * c;
        const bool ok = k < kend;
        ch.x[u] = ld_v4(xr + (ok ? k : kend - 8));
        if (!ok || !has_x) ch.x[u] = zero;
    }
}

FG_INLINE void load_chunk(Chunk& ch, const scalar_t* w0, const scalar_t* w1, const scalar_t* xr, bool has_x,
                          int kb, int kend, int c) {
    load_chunk_w(ch, w0, w1, kb, kend, c);
    load_chunk_x(ch, xr, has_x, kb, kend, c);
}

extern "C" __global__ void __launch_bounds__(32 * SG_MAX_WARPS)
skinny_gemm_kernel(const scalar_t* __restrict__ x, i64 ldx,  // (M, K), row stride ldx
                   const scalar_t* __restrict__ w,           // (N, K) contiguous
                   const scalar_t* __restrict__ bias,        // (N,) or null
                   scalar_t* __restrict__ y, i64 ldy,        // (M, N), row stride ldy
                   int M, int N, int K, int k_per_warp) {
    __shared__ float part[SG_MAX_WARPS][16][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int nw = blockDim.x >> 5;
    const int n0 = blockIdx.x * 16;
    const SkinnyLane<scalar_t> l = skinny_lane(x, ldx, w, M, N, K, k_per_warp, n0, g, warp);
    const scalar_t *w0 = l.w0, *w1 = l.w1, *xr = l.xr;
    const bool has_x = l.has_x;
    const int kbeg = l.kbeg, kend = l.kend;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    Chunk cur, nxt;
    pdl_allow_next();
    if (kbeg < kend) load_chunk_w(cur, w0, w1, kbeg, kend, c);  // the weights: before the wait (common.cuh)
    pdl_wait();
    if (kbeg < kend) {
        load_chunk_x(cur, xr, has_x, kbeg, kend, c);
        for (int kb = kbeg; kb < kend; kb += 32 * SG_U) {
            // the next chunk's loads go out before this chunk's products (loop-carried, so the compiler
            // cannot sink them to their use): SG_U steps of W stay in flight per lane
            load_chunk(nxt, w0, w1, xr, has_x, kb + 32 * SG_U, kend, c);
#pragma unroll
            for (int u = 0; u < SG_U; ++u) {
                const u32 wa[4] = {cur.w0[u].x, cur.w0[u].y, cur.w0[u].z, cur.w0[u].w};
                const u32 wb[4] = {cur.w1[u].x, cur.w1[u].y, cur.w1[u].z, cur.w1[u].w};
                const u32 xx[4] = {cur.x[u].x, cur.x[u].y, cur.x[u].z, cur.x[u].w};
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const u32 a[4] = {wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1]};
                    const u32 b[2] = {xx[2 * j], xx[2 * j + 1]};
                    mma_16816(acc, a, b);
                }
            }
            cur = nxt;
        }
    }
    skinny_reduce(part, acc, warp, g, c, nw, M, N, n0, [&](int m, int n, float s) {
        if (bias != nullptr) s += to_float(bias[n0 + n]);
        y[(i64)m * ldy + n0 + n] = from_float(s);
    });
}
