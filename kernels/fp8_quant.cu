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
#include "common.cuh"
#include "fp8.cuh"

#define FP8_AMAX_FLOOR 1e-12f
#define FP8_MAX 448.f

extern "C" __global__ void __launch_bounds__(256)
quantize_fp8_rows_kernel(const scalar_t* __restrict__ x, i64 ldx, fp8_t* __restrict__ xq,
                         float* __restrict__ scale, int K) {
    __shared__ float red[32];
    const i64 row = blockIdx.x;
    const scalar_t* xr = x + row * ldx;
    const int nvec = K / 8;
    float amax = 0.f;
    bool nan = false;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        float a[8];
        unpack8(ld_v4(xr + 8 * i), a);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            nan |= a[e] != a[e];
            amax = fmaxf(amax, fabsf(a[e]));
        }
    }
    amax = nan ? __int_as_float(0x7fffffff) : amax;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // fmaxf drops a NaN operand: carry NaN through explicitly
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
    amax = red[0];
    // torch divides a CUDA tensor by a Python scalar as a product with the scalar's float reciprocal
    const float s = __fmul_rn(amax != amax ? amax : fmaxf(amax, FP8_AMAX_FLOOR), 1.f / FP8_MAX);
    if (threadIdx.x == 0) scale[row] = s;
    fp8_t* qr = xq + row * (i64)K;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        float a[8];
        unpack8(ld_v4(xr + 8 * i), a);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float v = __fdiv_rn(a[e], s);
            a[e] = v != v ? v : fminf(fmaxf(v, -FP8_MAX), FP8_MAX);  // torch's clamp keeps a NaN a NaN
        }
        // cvt.rn.satfinite rounds to nearest even (and turns a NaN into e4m3's NaN, as torch's cast does)
        uint2 q;
        q.x = (u32)f32x2_to_e4m3x2(a[0], a[1]) | ((u32)f32x2_to_e4m3x2(a[2], a[3]) << 16);
        q.y = (u32)f32x2_to_e4m3x2(a[4], a[5]) | ((u32)f32x2_to_e4m3x2(a[6], a[7]) << 16);
        *reinterpret_cast<uint2*>(qr + 8 * i) = q;
    }
}
