// fp8.cuh: the FP8 KV cache's element conversions (float8 e4m3, "E4M3FN": no infinities, max 448), in hardware
// on sm_89 and later (Ada, Hopper, Blackwell); see docs/design.md, "FP8 KV cache".
//
// Writing rounds x * inv_scale to nearest and saturates to +-448 (cvt.rn.satfinite), as the torch reference's
// clamp + cast does. Reading converts exactly: every e4m3 value is a float16 (cvt.rn.f16x2.e4m3x2) and a bfloat16;
// the scale is applied by the caller (folded into the softmax scale for K, into the output for V), so a
// kernel reads 8 bytes where it read 16 and does the same math after a few conversions.
//
// The int8k cache (FG_KV_FP8=2 in the kernels that read or write a cache) keeps V in e4m3 as above and K in int8,
// each with a float32 scale per cached token and kv head instead of one per layer (docs/design.md, "FP8 KV
// cache": e4m3's 3-bit mantissa on K costs accuracy, a uniform int8 grid of amax / 127 per head does not):
//   K: s = max(amax |k|, 1e-12) / 127, stored = clamp(round_half_even(k / s), -127, 127)
//   V: s = max(amax |v|, 1e-12) / 448, stored = e4m3(v / s), rounded to nearest and saturated
// (IEEE divisions, amax over the head's D values). Reading converts exactly: every int8 value of -128..127 is a
// float16 and a bfloat16, like every e4m3 value.
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "the FP8 KV cache needs sm_89 or later (cvt between e4m3 and float)"
#endif

typedef unsigned char fp8_t;

// Two floats -> two e4m3 bytes (lo = a, hi = b, so they land in memory order).
FG_INLINE unsigned short f32x2_to_e4m3x2(float a, float b) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(b), "f"(a));
    return r;
}

// 8 floats * s -> 8 e4m3 bytes.
FG_INLINE uint2 pack8_e4m3(const float* x, float s) {
    uint2 r;
    r.x = (u32)f32x2_to_e4m3x2(x[0] * s, x[1] * s) | ((u32)f32x2_to_e4m3x2(x[2] * s, x[3] * s) << 16);
    r.y = (u32)f32x2_to_e4m3x2(x[4] * s, x[5] * s) | ((u32)f32x2_to_e4m3x2(x[6] * s, x[7] * s) << 16);
    return r;
}

// Two e4m3 bytes -> one register of two scalars (the activation dtype), exactly.
FG_INLINE u32 e4m3x2_to_scalar2(u32 two) {
    u32 h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)two));
#if FG_DTYPE == 0
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
    __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<u32*>(&b);
#else
    return h;
#endif
}

// 8 e4m3 bytes -> 8 scalars in the layout of a 16-byte load of the activation dtype.
FG_INLINE uint4 e4m3x8_to_scalar8(const uint2& v) {
    return make_uint4(e4m3x2_to_scalar2(v.x & 0xffffu), e4m3x2_to_scalar2(v.x >> 16),
                      e4m3x2_to_scalar2(v.y & 0xffffu), e4m3x2_to_scalar2(v.y >> 16));
}

// Streaming 8-byte load (the FP8 twin of common.cuh's ld_v4_stream).
FG_INLINE uint2 ld_v2_stream(const void* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// ---------------------------------------------------------------- the int8k cache's K
#define FG_INT8K_KMAX 127.f  // K: stored = round(k / s), s = amax / 127
#define FG_INT8K_VMAX 448.f  // V: stored = e4m3(v / s), s = amax / 448 (e4m3's largest finite value)
#define FG_INT8K_FLOOR 1e-12f  // the amax of a head of zeros (or nearly): a tiny scale, not a division by zero

// 8 floats -> 8 int8 bytes in memory order: x / s (an IEEE division) rounded half to even, clamped to +-127.
FG_INLINE uint2 pack8_s8(const float* x, float s) {
    u32 w[2] = {0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int q = max(-127, min(127, __float2int_rn(__fdiv_rn(x[e], s))));
        w[e >> 2] |= ((u32)q & 0xffu) << (8 * (e & 3));
    }
    return make_uint2(w[0], w[1]);
}

// Two int8 bytes of `biased` (the cache's 4 bytes xor 0x80808080: each one b + 128, unsigned), bytes i and i + 1
// (i = 0 or 2), -> one register of two scalars, exactly. float16: the bytes under 0x64 are the halves 1024 + b +
// 128, minus 1152; bfloat16: under 0x4b0000 they are the floats 2^23 + b + 128, minus 2^23 + 128, then packed.
FG_INLINE u32 s8x2_to_scalar2(u32 biased, int i) {
#if FG_DTYPE == 1
    u32 h = __byte_perm(biased, 0x64646464u, i == 0 ? 0x5140 : 0x5342);
    u32 m = 0x64806480u;  // (1152, 1152)
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<__half2*>(&m));
    return *reinterpret_cast<u32*>(&r);
#else
    const float a = __uint_as_float(__byte_perm(biased, 0x4b000000u, 0x7540 + i)) - 8388736.f;
    const float b = __uint_as_float(__byte_perm(biased, 0x4b000000u, 0x7541 + i)) - 8388736.f;
    __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&r);
#endif
}

// 8 int8 bytes -> 8 scalars in the layout of a 16-byte load of the activation dtype.
FG_INLINE uint4 s8x8_to_scalar8(const uint2& v) {
    const u32 x = v.x ^ 0x80808080u, y = v.y ^ 0x80808080u;
    return make_uint4(s8x2_to_scalar2(x, 0), s8x2_to_scalar2(x, 2), s8x2_to_scalar2(y, 0), s8x2_to_scalar2(y, 2));
}
