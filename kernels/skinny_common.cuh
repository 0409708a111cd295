// skinny_common.cuh: what skinny_gemm.cu and skinny_gemm_fp8.cu share around their main loops (the algorithm is
// in skinny_gemm.cu's header): where a lane's two W rows, its x row and its warp's slice of K start, and the
// epilogue that sums the warps' partial 16 x 8 tiles through shared memory.
#pragma once

#include "common.cuh"

#define SG_MAX_WARPS 8

// Lane (g, c) of warp `warp` in the CTA owning output columns n0 .. n0 + 15: W rows n0 + g and n0 + g + 8
// (rows past N clamped to the last row, valid memory: their results are not stored), x row g (row 0 and
// has_x false when g >= M: the lane feeds zeros), and the warp's slice [kbeg, kend) of K (split-K in the CTA).
template <typename T>
struct SkinnyLane {
    const T* w0;
    const T* w1;
    const T* xr;
    bool has_x;
    int kbeg, kend;
};

template <typename T>
FG_INLINE SkinnyLane<T> skinny_lane(const T* x, i64 ldx, const T* w, int M, int N, int K, int k_per_warp, int n0,
                                    int g, int warp) {
    SkinnyLane<T> l;
    l.w0 = w + (i64)min(n0 + g, N - 1) * K;
    l.w1 = w + (i64)min(n0 + g + 8, N - 1) * K;
    l.has_x = g < M;
    l.xr = x + (i64)(l.has_x ? g : 0) * ldx;
    l.kbeg = warp * k_per_warp;
    l.kend = min(K, l.kbeg + k_per_warp);
    return l;
}

// The CTA's nw partial tiles summed through `part` (the kernel's __shared__ float [SG_MAX_WARPS][16][8]): lane
// (g, c)'s acc holds D[g][2c..2c+1] (column n0 + g, rows m = 2c, 2c + 1) and D[g + 8][2c..2c+1]; store(m, n, sum)
// runs once for each output in range (row m < M, column n0 + n < N, n = 0..15) with the fp32 sum of the warps'
// parts in warp order. (The kernels keep `part`, nw and the column offset n0 + n as they were written before this
// header: the sm_90a cubins are then byte-identical to those of the two separate copies.)
template <typename Store>
FG_INLINE void skinny_reduce(float (*part)[16][8], const float* acc, int warp, int g, int c, int nw, int M, int N,
                              int n0, Store store) {
    part[warp][g][2 * c] = acc[0];
    part[warp][g][2 * c + 1] = acc[1];
    part[warp][g + 8][2 * c] = acc[2];
    part[warp][g + 8][2 * c + 1] = acc[3];
    __syncthreads();
    for (int p = threadIdx.x; p < 128; p += blockDim.x) {  // 16 columns x 8 rows; 2 warps take two passes
        const int n = p & 15, m = p >> 4;
        if (m < M && n0 + n < N) {
            float s = 0.f;
            for (int i = 0; i < nw; ++i) s += part[i][n][m];
            store(m, n, s);
        }
    }
}
