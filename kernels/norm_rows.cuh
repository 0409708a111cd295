// norm_rows.cuh: a token row's RMSNorm held in registers, and the gate activations of the MLPs; shared by
// norms.cu (the output in the activation dtype) and fp8_quant.cu (the same output quantized to e4m3 with the row's
// scale in the same pass, for the FP8 GEMMs).
#pragma once

#include "common.cuh"

#define RMS_VPT 4  // vectors of 8 per thread held in registers: hidden <= 8 * 4 * 1024

// RMSNorm of row blockIdx.x, one CTA per row, thread tid holding vectors tid + j * blockDim.x (j < RMS_VPT) of 8
// scalars. The row and the weight are read once into registers (x, plus residual when fused), the sum of squares
// is reduced (warp shuffles, then shared memory `red` (32 floats) across warps). Arithmetic mirrors HF / the torch
// reference:
//   h = x + residual            (rounded to the storage dtype: it is also the new residual, stored here)
//   y = weight * dtype(h * rsqrt(mean(h^2) + eps))   (in float32; the caller rounds it once)
// and hands each vector's 8 values to out(j, element offset of the vector in the (rows, hidden) output, y).
// residual_out may alias residual (each thread reads its elements before it writes them). Every thread returns
// after its last read of `red`; a caller that reuses it synchronizes the block first.
template <typename Out>
FG_INLINE void rms_norm_row(const scalar_t* __restrict__ x, const scalar_t* residual,
                            const scalar_t* __restrict__ weight, scalar_t* residual_out, int hidden, float eps,
                            float* red, Out out) {
    const int nvec = hidden / 8;
    const int tid = threadIdx.x;
    const int row = blockIdx.x;
    const i64 base = (i64)row * hidden;

    uint4 v[RMS_VPT], wv[RMS_VPT];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = tid + j * blockDim.x;
        if (i < nvec) {
            v[j] = ld_v4(x + base + 8 * i);
            wv[j] = ld_v4(weight + 8 * i);  // issued with the row's loads: off the reduction's critical path
            if (residual != nullptr) {
                float a[8], r[8];
                unpack8(v[j], a);
                unpack8(ld_v4(residual + base + 8 * i), r);
#pragma unroll
                for (int e = 0; e < 8; ++e) a[e] = a[e] + r[e];
                v[j] = pack8(a);  // rounded sum: it is the new residual and the norm's input
            }
            float a[8];
            unpack8(v[j], a);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += a[e] * a[e];
        }
    }
    // Block reduction of the sum of squares.
    ss = warp_sum(ss);
    const int warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nwarps ? red[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) red[0] = t;
    }
    __syncthreads();
    const float rinv = rsqrtf(red[0] / (float)hidden + eps);

#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = tid + j * blockDim.x;
        if (i < nvec) {
            if (residual != nullptr) st_v4(residual_out + base + 8 * i, v[j]);
            float a[8], w[8];
            unpack8(v[j], a);
            unpack8(wv[j], w);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = w[e] * round_to_dtype(a[e] * rinv);
            out(j, base + 8 * i, a);
        }
    }
}

// The gate activations, in float32 (functors, inlined where they are used): silu (SwiGLU MLPs) and GeLU-tanh (Gemma's)
//   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanhf (not the approximate tanh.approx:
//   its 2^-11 relative error would be above bf16's rounding near g = 0).
struct ActSilu {
    FG_INLINE float operator()(float g) const { return g / (1.f + __expf(-g)); }
};
struct ActGeluTanh {
    FG_INLINE float operator()(float g) const {
        return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    }
};
