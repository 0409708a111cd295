// skinny_gemm_fp8.cu: y (M, N) = (xq (M, K) e4m3 * xs (M,)) . (W (N, K) e4m3 * ws (N,))^T [+ bias (N)] for M <= 8
// rows, in the activation dtype: the FP8-weight twin of skinny_gemm.cu (decode at small batch with FP8 weights).
//
// The arithmetic is the reference's (torch_ops.linear_fp8) up to the order of the fp32 sums: the e4m3 products
// are exact and accumulate in fp32 on the tensor cores; then, once per output, acc * xs[m] * ws[n] (in that
// order, fp32), + bias[n] in fp32, rounded once to the output dtype. Needs sm_89 or later (e4m3 mma).
//
// Fragment layout of mma.m16n8k32.row.col.f32.e4m3.e4m3.f32 (PTX ISA, "Matrix Fragments for mma.m16n8k32",
// the .s8 / .e4m3 case): lane = 4 * g + c, four 8-bit elements per 32-bit register, lowest byte first;
//   a[0] = A[g][4c .. 4c+3],       a[1] = A[g+8][4c .. 4c+3],
//   a[2] = A[g][4c+16 .. 4c+19],   a[3] = A[g+8][4c+16 .. 4c+19]
//   b[0] = B[4c .. 4c+3][g],       b[1] = B[4c+16 .. 4c+19][g]
//   d[0..1] = D[g][2c .. 2c+1],    d[2..3] = D[g+8][2c .. 2c+1]     (as m16n8k16)
// So byte i of a[r] and byte i of b[r >> 1] hold the same logical k (4c + i, + 16 when r >= 2), for both rows.
//
// Algorithm (skinny_gemm.cu's, with 64 k per warp step): grid ceil(N / 16), NW warps per CTA (2, 4 or 8); a CTA
//   owns columns n0 .. n0 + 15, warp w the w-th slice of K (split-K inside the CTA). A step covers 64 k per row
//   with two m16n8k32 products:
//     D^T (16 n x 8 m) += W (16 n x 32 k) . x^T (32 k x 8 m)     A = W, B = x^T, fp32 accumulators
//   Lane (g, c) loads W rows n0 + g and n0 + g + 8 and x row g (zeros for g >= M) at k + 16c .. + 15 with one
//   16-byte load each (16 e4m3, 4 words). Product j of the step takes words 2j and 2j + 1 of those vectors:
//     a = {w0[2j], w1[2j], w0[2j+1], w1[2j+1]},  b = {x[2j], x[2j+1]}
//   so byte i of word 2j + h (memory k = k + 16c + 8j + 4h + i) plays logical k 4c + 16h + i in A's rows g and
//   g + 8 and in B's column g alike: each of the 64 k is used once, in a matching pair (a dot product does not
//   care about the order of its terms), with no shared memory or shuffle. SG_U steps' loads (2 SG_U W vectors
//   per lane, read-only, no L1 allocation, 256-byte L2 fetches) are issued before the previous chunk's
//   products; the slice's last chunk is peeled off the loop, so no loads past the slice are issued.
//   The NW partial 16 x 8 tiles are summed through shared memory, then scaled, biased and rounded once.
// Shapes: K a multiple of 16 (a lane's 16-byte vector is never partial), any N (rows past N read row N - 1,
// valid memory, and are not stored); xq rows ldx bytes apart, 16-byte aligned like W.
// Memory traffic: W once (N K bytes), x once per CTA (L2-resident), y once.
#include "fp8.cuh"
#include "skinny_common.cuh"

#ifndef SG_U
#define SG_U 8           // 64-wide k steps whose loads are in flight together (host: 4 or 8)
#endif
#define SG_STEP 64       // k per warp step: 4 lanes x 16 e4m3

// D = A * B + D, m16n8k32, e4m3 x e4m3 -> fp32 (layout above).
FG_INLINE void mma_16832_e4m3(float* d, const u32* a, const u32* b) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

struct ChunkFp8 {
    uint4 w0[SG_U], w1[SG_U], x[SG_U];  // SG_U steps of 64 k: W rows g and g + 8, x row g
};

// Loads of the chunk at kb. K and k_per_warp are multiples of 16, so k < kend => k + 16 <= kend. Steps past
// the slice load its last vector instead (valid memory, just fetched: an L2 hit; no branch) and use zeros.
// W's loads and x's are apart so that the first chunk's W can be in flight before pdl_wait (W is no earlier
// kernel's output; x is).
FG_INLINE void load_chunk_fp8_w(ChunkFp8& ch, const fp8_t* w0, const fp8_t* w1, int kb, int kend, int c) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < SG_U; ++u) {
        const int k = kb + SG_STEP * u + 16 * c;
        const bool ok = k < kend;
        const int kk = ok ? k : kend - 16;
        ch.w0[u] = ld_v4_stream(w0 + kk);
        ch.w1[u] = ld_v4_stream(w1 + kk);
        if (!ok) ch.w0[u] = ch.w1[u] = zero;
    }
}

FG_INLINE void load_chunk_fp8_x(ChunkFp8& ch, const fp8_t* xr, bool has_x, int kb, int kend, int c) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < SG_U; ++u) {
        const int k = kb + SG_STEP * u + 16 * c;
        const bool ok = k < kend;
        ch.x[u] = ld_v4(xr + (ok ? k : kend - 16));
        if (!ok || !has_x) ch.x[u] = zero;
    }
}

FG_INLINE void load_chunk_fp8(ChunkFp8& ch, const fp8_t* w0, const fp8_t* w1, const fp8_t* xr, bool has_x,
                              int kb, int kend, int c) {
    load_chunk_fp8_w(ch, w0, w1, kb, kend, c);
    load_chunk_fp8_x(ch, xr, has_x, kb, kend, c);
}

// The 2 SG_U products of a chunk (operand words as in the header).
FG_INLINE void chunk_products(float* acc, const ChunkFp8& ch) {
#pragma unroll
    for (int u = 0; u < SG_U; ++u) {
        const u32 wa[4] = {ch.w0[u].x, ch.w0[u].y, ch.w0[u].z, ch.w0[u].w};
        const u32 wb[4] = {ch.w1[u].x, ch.w1[u].y, ch.w1[u].z, ch.w1[u].w};
        const u32 xx[4] = {ch.x[u].x, ch.x[u].y, ch.x[u].z, ch.x[u].w};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const u32 a[4] = {wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1]};
            const u32 b[2] = {xx[2 * j], xx[2 * j + 1]};
            mma_16832_e4m3(acc, a, b);
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * SG_MAX_WARPS)
skinny_gemm_fp8_kernel(const fp8_t* __restrict__ xq, i64 ldx,  // (M, K) e4m3, row stride ldx bytes
                       const float* __restrict__ xs,            // (M,) per-row scales of xq
                       const fp8_t* __restrict__ w,             // (N, K) e4m3, contiguous
                       const float* __restrict__ ws,            // (N,) per-row scales of w
                       const scalar_t* __restrict__ bias,       // (N,) or null
                       scalar_t* __restrict__ y, i64 ldy,       // (M, N), row stride ldy
                       int M, int N, int K, int k_per_warp) {
    __shared__ float part[SG_MAX_WARPS][16][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int nw = blockDim.x >> 5;
    const int n0 = blockIdx.x * 16;
    const SkinnyLane<fp8_t> l = skinny_lane(xq, ldx, w, M, N, K, k_per_warp, n0, g, warp);
    const fp8_t *w0 = l.w0, *w1 = l.w1, *xr = l.xr;
    const bool has_x = l.has_x;
    const int kbeg = l.kbeg, kend = l.kend;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    ChunkFp8 cur, nxt;
    pdl_allow_next();
    if (kbeg < kend) load_chunk_fp8_w(cur, w0, w1, kbeg, kend, c);  // the weights: before the wait (common.cuh)
    pdl_wait();
    if (kbeg < kend) {
        load_chunk_fp8_x(cur, xr, has_x, kbeg, kend, c);
        int kb = kbeg;
        for (; kb + SG_STEP * SG_U < kend; kb += SG_STEP * SG_U) {
            // the next chunk's loads go out before this chunk's products (loop-carried, so the compiler
            // cannot sink them to their use): SG_U steps of W stay in flight per lane
            load_chunk_fp8(nxt, w0, w1, xr, has_x, kb + SG_STEP * SG_U, kend, c);
            chunk_products(acc, cur);
            cur = nxt;
        }
        chunk_products(acc, cur);  // the slice's last chunk: nothing left to load
    }
    skinny_reduce(part, acc, warp, g, c, nw, M, N, n0, [&](int m, int n, float s) {
        // (acc * xs) * ws + bias, each rounded in fp32 as torch does it (no FMA contraction)
        s = __fmul_rn(__fmul_rn(s, xs[m]), ws[n0 + n]);
        if (bias != nullptr) s = __fadd_rn(s, to_float(bias[n0 + n]));
        y[(i64)m * ldy + n0 + n] = from_float(s);
    });
}
