// fp8_quant.cu: per-row dynamic quantization of activations to float8 e4m3 for the FP8 GEMMs (FP8 weights):
//   scale[r] = max(amax |x[r, :]|, FP8_AMAX_FLOOR) / 448,   xq[r, k] = e4m3(clamp(x[r, k] / scale[r], +-448))
// in float32 with round-to-nearest-even, so the bytes equal the torch reference's on the GPU
// (torch_ops.quantize_fp8_rows: .float(), abs, amax, clamp, /, clamp, cast: eight kernels and a float32 copy of
// the activations, which this one pass replaces). As torch on CUDA does, the scale is amax times the float
// reciprocal of 448 (its division of a tensor by a Python scalar) and x / scale a true division (tensor by
// tensor); torch on the CPU divides by 448 exactly, which can differ in the scale's last bit. A NaN in a row makes
// its scale NaN, as torch's amax does.
// Grid (rows), 256 threads; a thread takes 16-byte vectors (8 elements) strided by the block: the first pass
// finds the row's amax (warp shuffles, then shared memory), the second reads the row again (an L1/L2 hit) and
// writes 8 bytes per vector. K must be a multiple of 8 (the FP8 GEMMs need 16).
//
// The same quantization fused into the op that makes the rows (FP8 weights: every linear layer but the attention
// output's takes such rows), so that the row is quantized while it is still in registers and never written in the
// activation dtype:
//   rms_norm_fp8_kernel    RMSNorm (+ the residual add, its sum still written) of norm_rows.cuh, its output rounded
//                          to the activation dtype as rms_norm_kernel writes it, then quantized as above
//   silu_mul_fp8_kernel    silu(gate) * up rounded as silu_mul_kernel writes it, then quantized (gelu_tanh_mul_fp8:
//                          Gemma's activation)
// One CTA per row holds the whole row (at most RMS_VPT vectors of 8 per thread, the host picks the threads), so
// the bytes equal those of the two kernels one after the other: the rows' output, then quantize_fp8_rows_kernel.
#include "fp8.cuh"
#include "norm_rows.cuh"

#define FP8_AMAX_FLOOR 1e-12f
#define FP8_MAX 448.f

// The CTA's amax of its threads' `amax` (a thread's own is NaN when it saw a NaN), through `red` (32 floats):
// fmaxf drops a NaN operand, so a NaN is carried through explicitly, as torch's amax returns NaN.
FG_INLINE float block_amax(float amax, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, amax, o);
        amax = (other != other || amax != amax) ? __int_as_float(0x7fffffff) : fmaxf(amax, other);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = amax;
    __syncthreads();
    if (warp == 0) {
        amax = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float other = __shfl_xor_sync(0xffffffffu, amax, o);
            amax = (other != other || amax != amax) ? __int_as_float(0x7fffffff) : fmaxf(amax, other);
        }
        if (lane == 0) red[0] = amax;
    }
    __syncthreads();
    return red[0];
}

// The row's scale from its amax: torch divides a CUDA tensor by a Python scalar as a product with the scalar's
// float reciprocal.
FG_INLINE float row_scale(float amax) {
    return __fmul_rn(amax != amax ? amax : fmaxf(amax, FP8_AMAX_FLOOR), 1.f / FP8_MAX);
}

// 8 values / s -> 8 e4m3 bytes: a true division, clamped to +-448 (torch's clamp keeps a NaN a NaN), then
// cvt.rn.satfinite (round to nearest even; a NaN becomes e4m3's NaN, as torch's cast does).
FG_INLINE uint2 quant8(float* a, float s) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float v = __fdiv_rn(a[e], s);
        a[e] = v != v ? v : fminf(fmaxf(v, -FP8_MAX), FP8_MAX);
    }
    uint2 q;
    q.x = (u32)f32x2_to_e4m3x2(a[0], a[1]) | ((u32)f32x2_to_e4m3x2(a[2], a[3]) << 16);
    q.y = (u32)f32x2_to_e4m3x2(a[4], a[5]) | ((u32)f32x2_to_e4m3x2(a[6], a[7]) << 16);
    return q;
}

// A thread's amax over 8 values (NaN when one is).
FG_INLINE float amax8(const float* a, float amax) {
    bool nan = amax != amax;  // fmaxf would drop an earlier NaN
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        nan |= a[e] != a[e];
        amax = fmaxf(amax, fabsf(a[e]));
    }
    return nan ? __int_as_float(0x7fffffff) : amax;
}

extern "C" __global__ void __launch_bounds__(256)
quantize_fp8_rows_kernel(const scalar_t* __restrict__ x, i64 ldx, fp8_t* __restrict__ xq,
                         float* __restrict__ scale, int K) {
    pdl_prologue();  // before any memory access (common.cuh)
    __shared__ float red[32];
    const i64 row = blockIdx.x;
    const scalar_t* xr = x + row * ldx;
    const int nvec = K / 8;
    float amax = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        float a[8];
        unpack8(ld_v4(xr + 8 * i), a);
        amax = amax8(a, amax);
    }
    const float s = row_scale(block_amax(amax, red));
    if (threadIdx.x == 0) scale[row] = s;
    fp8_t* qr = xq + row * (i64)K;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        float a[8];
        unpack8(ld_v4(xr + 8 * i), a);
        *reinterpret_cast<uint2*>(qr + 8 * i) = quant8(a, s);
    }
}

// The rows a fused kernel holds, y[j] the 8 values of vector threadIdx.x + j * blockDim.x (those below nvec),
// already rounded to the activation dtype: quantized into xq (rows, 8 * nvec) and scale (rows,).
FG_INLINE void quantize_held_row(float (&y)[RMS_VPT][8], int nvec, float amax, fp8_t* __restrict__ xq,
                                 float* __restrict__ scale, float* red) {
    const float s = row_scale(block_amax(amax, red));
    const int row = blockIdx.x;
    if (threadIdx.x == 0) scale[row] = s;
    fp8_t* qr = xq + (i64)row * 8 * nvec;
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) *reinterpret_cast<uint2*>(qr + 8 * i) = quant8(y[j], s);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rms_norm_fp8_kernel(const scalar_t* __restrict__ x,
                    const scalar_t* residual,  // may alias residual_out
                    const scalar_t* __restrict__ weight, scalar_t* residual_out,
                    fp8_t* __restrict__ xq, float* __restrict__ scale, int hidden,
                    float eps) {
    pdl_prologue();  // before any memory access (common.cuh)
    __shared__ float red[32];
    float y[RMS_VPT][8];
    float amax = 0.f;
    rms_norm_row(x, residual, weight, residual_out, hidden, eps, red, [&](int j, i64, const float* a) {
#pragma unroll
        for (int e = 0; e < 8; ++e) y[j][e] = round_to_dtype(a[e]);  // the output rms_norm_kernel would write
        amax = amax8(y[j], amax);
    });
    __syncthreads();  // every thread has read the sum of squares from red[0]: block_amax reuses it
    quantize_held_row(y, hidden / 8, amax, xq, scale, red);
}

// gate * up with the gate's activation, rounded as act_mul_row (norms.cu) writes it, then quantized.
template <typename Act>
FG_INLINE void act_mul_fp8_row(const scalar_t* __restrict__ x, fp8_t* __restrict__ xq, float* __restrict__ scale,
                               int inter, Act act) {
    __shared__ float red[32];
    const int nvec = inter / 8;
    const scalar_t* xr = x + (i64)(int)blockIdx.x * 2 * inter;
    float y[RMS_VPT][8];
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            float u[8];
            unpack8(ld_v4(xr + 8 * i), y[j]);
            unpack8(ld_v4(xr + inter + 8 * i), u);
#pragma unroll
            for (int e = 0; e < 8; ++e) y[j][e] = round_to_dtype(act(y[j][e]) * u[e]);
            amax = amax8(y[j], amax);
        }
    }
    quantize_held_row(y, nvec, amax, xq, scale, red);
}

extern "C" __global__ void __launch_bounds__(1024)
silu_mul_fp8_kernel(const scalar_t* __restrict__ x, fp8_t* __restrict__ xq,
                    float* __restrict__ scale, int inter) {
    pdl_prologue();  // before any memory access (common.cuh)
    act_mul_fp8_row(x, xq, scale, inter, ActSilu());
}

extern "C" __global__ void __launch_bounds__(1024)
gelu_tanh_mul_fp8_kernel(const scalar_t* __restrict__ x, fp8_t* __restrict__ xq,
                         float* __restrict__ scale, int inter) {
    pdl_prologue();  // before any memory access (common.cuh)
    act_mul_fp8_row(x, xq, scale, inter, ActGeluTanh());
}
