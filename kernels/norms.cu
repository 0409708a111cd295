// norms.cu: RMSNorm (optionally fused with the residual add) and SiLU-and-multiply.
//
// rms_norm_kernel: one CTA per token row, blockDim.x = NT threads (a multiple of 32, chosen by the host
//   so that each thread holds at most RMS_VPT vectors of 8 scalars; with fewer rows than SMs, one vector
//   per thread, so a lone decode row is spread over the most threads). The row and the weight are read
//   once into registers (x, plus residual when fused), the sum of squares is reduced (warp shuffles, then
//   shared memory across warps), and the row is written once. Arithmetic mirrors HF / the torch reference:
//     h = x + residual            (rounded to the storage dtype: it is also the new residual)
//     out = weight * dtype(h * rsqrt(mean(h^2) + eps))   (the product rounded once)
//   Memory traffic: read x (+ residual) + weight (L2-resident), write out (+ residual_out):
//   2 (or 4) * hidden * sizeof(dtype) bytes per row. residual_out may alias residual (each thread reads
//   its elements before it writes them).
//
// silu_mul_kernel: out[t, i] = silu(x[t, i]) * x[t, I + i], computed in float32 and rounded once
//   (gelu_tanh_mul_kernel: the same with GeLU-tanh, Gemma's MLP).
//   Grid (T, ceil(I / 8 / 256)), 256 threads, one 16-byte vector of gate and of up per thread.
//   Traffic: read 2 * I, write I scalars per row.
#include "common.cuh"

#define RMS_VPT 4  // vectors of 8 per thread held in registers: hidden <= 8 * 4 * 1024

extern "C" __global__ void rms_norm_kernel(const scalar_t* __restrict__ x,
                                           const scalar_t* residual,  // may alias residual_out
                                           const scalar_t* __restrict__ weight,
                                           scalar_t* __restrict__ out,
                                           scalar_t* residual_out,
                                           int hidden, float eps) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    const int nvec = hidden / 8;
    const int tid = threadIdx.x;
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
            st_v4(out + base + 8 * i, pack8(a));
        }
    }
}

// gate * up with the gate's activation, one 16-byte vector of each per thread (the kernels below).
template <typename Act>
FG_INLINE void act_mul_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int inter, Act act) {
    const int row = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;  // vector index within the row
    if (i >= inter / 8) return;
    const scalar_t* xr = x + (i64)row * 2 * inter;
    float g[8], u[8];
    unpack8(ld_v4(xr + 8 * i), g);
    unpack8(ld_v4(xr + inter + 8 * i), u);
#pragma unroll
    for (int e = 0; e < 8; ++e) g[e] = act(g[e]) * u[e];
    st_v4(out + (i64)row * inter + 8 * i, pack8(g));
}

extern "C" __global__ void silu_mul_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                           int inter) {
    act_mul_row(x, out, inter, [](float g) { return g / (1.f + __expf(-g)); });
}

// gelu_tanh_mul_kernel: out[t, i] = gelu_tanh(x[t, i]) * x[t, I + i] (Gemma's MLP), in float32, rounded once:
//   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanhf (not the approximate tanh.approx:
//   its 2^-11 relative error would be above bf16's rounding near g = 0). Same grid and traffic as silu_mul.
extern "C" __global__ void gelu_tanh_mul_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                                int inter) {
    act_mul_row(x, out, inter, [](float g) {
        return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    });
}
