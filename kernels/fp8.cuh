// fp8.cuh: the FP8 KV cache's element conversions (float8 e4m3, "E4M3FN": no infinities, max 448), in hardware
// on sm_89 and later (Ada, Hopper, Blackwell); see docs/design.md, "FP8 KV cache".
//
// Writing rounds x * inv_scale to nearest and saturates to +-448 (cvt.rn.satfinite), as the torch reference's
// clamp + cast does. Reading converts exactly: every e4m3 value is a float16 (cvt.rn.f16x2.e4m3x2) and a bfloat16;
// the scale is applied by the caller (folded into the softmax scale for K, into the output for V), so a
// kernel reads 8 bytes where it read 16 and does the same math after a few conversions.
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
