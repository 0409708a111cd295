// norms.cu: RMSNorm (optionally fused with the residual add) and SiLU-and-multiply.
//
// rms_norm_kernel (its row in norm_rows.cuh): one CTA per token row, blockDim.x = NT threads (a multiple of 32, chosen by the host
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
#include "norm_rows.cuh"

extern "C" __global__ void rms_norm_kernel(const scalar_t* __restrict__ x,
                                           const scalar_t* residual,  // may alias residual_out
                                           const scalar_t* __restrict__ weight,
                                           scalar_t* __restrict__ out,
                                           scalar_t* residual_out,
                                           int hidden, float eps) {
    pdl_prologue();  // before any memory access (common.cuh)
    __shared__ float red[32];
    rms_norm_row(x, residual, weight, residual_out, hidden, eps, red,
                 [=](int, i64 at, const float* y) { st_v4(out + at, pack8(y)); });  // the product rounded once
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
    pdl_prologue();  // before any memory access (common.cuh)
    act_mul_row(x, out, inter, ActSilu());
}

// gelu_tanh_mul_kernel: out[t, i] = gelu_tanh(x[t, i]) * x[t, I + i] (Gemma's MLP), in float32, rounded once
//   (ActGeluTanh in norm_rows.cuh). Same grid and traffic as silu_mul.
extern "C" __global__ void gelu_tanh_mul_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                                int inter) {
    pdl_prologue();  // before any memory access (common.cuh)
    act_mul_row(x, out, inter, ActGeluTanh());
}
