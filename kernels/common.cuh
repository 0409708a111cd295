// common.cuh: helpers shared by every flashgen kernel.
//
// Compiled at run time by NVRTC (through CuPy) and, in CI, by nvcc; so only CUDA's own headers are
// included, never the C++ standard library. Variants are chosen with -D:
//   FG_DTYPE     0 = bfloat16 (default), 1 = float16: the activation / KV-cache element type
//   FG_HEAD_DIM  attention head size (64, 128, 256) where a kernel needs it at compile time
// Everything accumulates in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef FG_DTYPE
#define FG_DTYPE 0
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#if FG_DTYPE == 0
typedef __nv_bfloat16 scalar_t;
typedef __nv_bfloat162 scalar2_t;
#define FG_MMA_TYPE "bf16"
#elif FG_DTYPE == 1
typedef __half scalar_t;
typedef __half2 scalar2_t;
#define FG_MMA_TYPE "f16"
#else
#error "FG_DTYPE must be 0 (bf16) or 1 (fp16)"
#endif

#define FG_INLINE __device__ __forceinline__

// ---------------------------------------------------------------- programmatic dependent launch (Hopper)
// A kernel the host launches with programmatic stream serialization (flashgen/ops/jit.py, PDL_KERNELS) may
// start while the kernel before it in the stream is still running. Such a kernel calls pdl_prologue() (or,
// with something to do first that reads nothing an earlier kernel writes, pdl_allow_next() then pdl_wait())
// before its first access to memory an earlier kernel writes or reads: griddepcontrol.wait returns once every
// prerequisite grid has completed and its writes are visible, so from there on the kernel sees the stream in
// order. pdl_allow_next() lets the next kernel's CTAs be scheduled once every CTA of this grid has started (they
// take only what this grid leaves free, and wait in their own prologue). Without such a launch, or before
// sm_90, both are no-ops.
FG_INLINE void pdl_allow_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

FG_INLINE void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

FG_INLINE void pdl_prologue() {
    pdl_allow_next();
    pdl_wait();
}

// ---------------------------------------------------------------- conversions
FG_INLINE float to_float(scalar_t x) {
#if FG_DTYPE == 0
    return __bfloat162float(x);
#else
    return __half2float(x);
#endif
}

FG_INLINE scalar_t from_float(float x) {
#if FG_DTYPE == 0
    return __float2bfloat16_rn(x);
#else
    return __float2half_rn(x);
#endif
}

// Two floats -> one 32-bit register of two scalars (lo = a, hi = b), as the mma fragments want.
FG_INLINE u32 pack2(float a, float b) {
#if FG_DTYPE == 0
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
#else
    __half2 h = __floats2half2_rn(a, b);
#endif
    return *reinterpret_cast<u32*>(&h);
}

FG_INLINE float2 unpack2(u32 v) {
#if FG_DTYPE == 0
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
#else
    return __half22float2(*reinterpret_cast<__half2*>(&v));
#endif
}

// 16 bytes = 8 scalars <-> 8 floats
FG_INLINE void unpack8(const uint4& v, float* f) {
    float2 t;
    t = unpack2(v.x); f[0] = t.x; f[1] = t.y;
    t = unpack2(v.y); f[2] = t.x; f[3] = t.y;
    t = unpack2(v.z); f[4] = t.x; f[5] = t.y;
    t = unpack2(v.w); f[6] = t.x; f[7] = t.y;
}

FG_INLINE uint4 pack8(const float* f) {
    uint4 v;
    v.x = pack2(f[0], f[1]);
    v.y = pack2(f[2], f[3]);
    v.z = pack2(f[4], f[5]);
    v.w = pack2(f[6], f[7]);
    return v;
}

// Round a float through the storage type (what a torch op in that dtype would return).
FG_INLINE float round_to_dtype(float x) { return to_float(from_float(x)); }

// ---------------------------------------------------------------- memory
// 16-byte loads; `p` must be 16-byte aligned.
FG_INLINE uint4 ld_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Streaming read-only load (KV cache in decode: touched once, keep it out of L1; let L2 fetch 256-byte
// sectors, a whole head row of a token at head_dim 128).
FG_INLINE uint4 ld_v4_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

FG_INLINE void st_v4(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

FG_INLINE float4 ld_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Asynchronous global -> shared copy of 16 bytes; src_bytes = 0 fills the 16 bytes with zeros.
FG_INLINE void cp_async_16(void* smem, const void* gmem, int src_bytes = 16) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
FG_INLINE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
FG_INLINE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---------------------------------------------------------------- last-arrival merge
// For kernels whose CTAs write partial results that the last CTA of a group merges (split-KV decode,
// multi-CTA sampling). Every thread of the CTA calls it after the CTA's partials are written; it returns
// true in the CTA whose arrival completes `expected` arrivals on `counter`, and that CTA then sees all the
// others' partials (read them with __ldcg: L1 is not coherent). The counter is set back to 0 there, so it is
// ready for the next launch (CUDA-graph replays). threadFenceReduction, CUDA samples.
FG_INLINE bool arrive_last(int* counter, int expected) {
    __shared__ int s_last;
    __threadfence();  // this CTA's partials are visible before it counts itself
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = atomicAdd(counter, 1) == expected - 1;
        if (s_last) *counter = 0;
    }
    __syncthreads();
    const bool last = s_last;
    if (last) __threadfence();
    return last;
}

// ---------------------------------------------------------------- warp reductions
FG_INLINE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
FG_INLINE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over aligned groups of WIDTH consecutive lanes (WIDTH a power of two <= 32). Only the calling
// lane's group needs to take part, so groups of one warp may diverge.
template <int WIDTH>
FG_INLINE float group_sum(float v) {
    const int lane = threadIdx.x & 31;
    const u32 mask = WIDTH == 32 ? 0xffffffffu : (((1u << WIDTH) - 1u) << (lane & ~(WIDTH - 1)));
#pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
    return v;
}
// Max over the same groups (the int8 K cache's amax of a head spread over its lanes).
template <int WIDTH>
FG_INLINE float group_max(float v) {
    const int lane = threadIdx.x & 31;
    const u32 mask = WIDTH == 32 ? 0xffffffffu : (((1u << WIDTH) - 1u) << (lane & ~(WIDTH - 1)));
#pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(mask, v, o));
    return v;
}

// ---------------------------------------------------------------- fast math
FG_INLINE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#define FG_LOG2E 1.4426950408889634f
#define FG_LN2 0.6931471805599453f

// ---------------------------------------------------------------- flash attention: online softmax
// A 16-row tile of scores (or of O) in the m16n8 accumulator layout, NG groups of 8 columns: lane 4g + c holds
// rows g and g + 8; a[4i], a[4i+1] = row g, columns 8i + 2c, + 1; a[4i+2], a[4i+3] = row g + 8. A row spans the
// 4 lanes of g. Per row: running max m[r], per-lane partial sum l[r], r = 0 (row g), 1 (row g + 8).
#define FG_NEG_INF (-__int_as_float(0x7f800000))

// Eight dims of an attention state (acc, float32, its natural-log LSE lse) merged in place with another state's
// (o: its eight float32 dims, l2: its LSE; an empty state, l2 = -inf, changes nothing): the pairwise step of
// shared-prefix decode, one and the same in decode_attention.cu's store_out and merge_states.cu.
FG_INLINE void merge_state8(float* acc, float& lse, const float* __restrict__ o, float l2) {
    if (l2 == FG_NEG_INF) return;
    const float mx = fmaxf(lse, l2);
    const float w1 = __expf(lse - mx), w2 = __expf(l2 - mx), inv = 1.f / (w1 + w2);
    const float4 a = *reinterpret_cast<const float4*>(o);
    const float4 b = *reinterpret_cast<const float4*>(o + 4);
    const float o2[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int x = 0; x < 8; ++x) acc[x] = (acc[x] * w1 + o2[x] * w2) * inv;
    lse = mx + __logf(w1 + w2);
}

// One tile of unscaled scores s (masked ones -inf) into the running softmax: m and l move to the new max and s
// becomes exp2(s * scale_log2 - max * scale_log2) in place (the scale folded into one FMA; max commutes with
// a positive scale). al[r] is the factor that rescales row r's O and earlier sums (1 when its max stayed).
template <int NG>
FG_INLINE void online_softmax_m16(float* s, float scale_log2, float* m, float* l, float* al) {
    float mx[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
    for (int i = 0; i < NG; ++i) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * i], s[4 * i + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    float mu[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], off));
        const float mn = fmaxf(m[r], mx[r]);
        mu[r] = mn == FG_NEG_INF ? 0.f : mn * scale_log2;  // exponent offset; 0 while the row saw no key
        al[r] = mn == m[r] ? 1.f : fast_exp2(m[r] * scale_log2 - mu[r]);
        m[r] = mn;
    }
#pragma unroll
    for (int i = 0; i < NG; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[4 * i + e] = fast_exp2(fmaf(s[4 * i + e], scale_log2, -mu[e >> 1]));
        rs[0] += s[4 * i] + s[4 * i + 1];
        rs[1] += s[4 * i + 2] + s[4 * i + 3];
    }
    l[0] = l[0] * al[0] + rs[0];
    l[1] = l[1] * al[1] + rs[1];
}

// acc (NG groups, same layout) *= al per row; skipped when no row of the warp moved its max (rare once the
// first tiles are done).
template <int NG>
FG_INLINE void rescale_rows_m16(float* acc, const float* al) {
    if (__any_sync(0xffffffffu, al[0] != 1.f || al[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < NG; ++i) {
            acc[4 * i] *= al[0]; acc[4 * i + 1] *= al[0]; acc[4 * i + 2] *= al[1]; acc[4 * i + 3] *= al[1];
        }
    }
}

// The normalisers 1 / l of both rows once the 4 lanes' partial sums are added (0 for a row that saw no key);
// the whole warp calls it.
FG_INLINE void softmax_inverse_m16(const float* l, float* inv) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float t = l[r];
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        inv[r] = t > 0.f ? 1.f / t : 0.f;
    }
}

// ---------------------------------------------------------------- tensor cores (sm_80+)
// D = A * B + D, m16n8k16, A row-major 16x16, B column-major 16x8, fp32 accumulators.
// Fragment layout (PTX ISA, "mma.m16n8k16"): lane = 4 * g + c;
//   a[0] = A[g][2c..2c+1], a[1] = A[g+8][2c..], a[2] = A[g][2c+8..], a[3] = A[g+8][2c+8..]
//   b[0] = B[2c..2c+1][g], b[1] = B[2c+8..2c+9][g]
//   d[0..1] = D[g][2c..2c+1], d[2..3] = D[g+8][2c..2c+1]
FG_INLINE void mma_16816(float* d, const u32* a, const u32* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." FG_MMA_TYPE "." FG_MMA_TYPE
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices from shared memory; lane i gives the row address of matrix i / 8, row i % 8.
FG_INLINE void ldmatrix_x4(u32* r, const void* smem) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
FG_INLINE void ldmatrix_x4_trans(u32* r, const void* smem) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// Transpose an 8x8 b16 matrix held one register per lane (lane 4g+c: row g, columns 2c..2c+1).
FG_INLINE u32 movmatrix_trans(u32 x) {
    u32 y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// Low halves of x and y -> (x.lo, y.lo); high halves -> (x.hi, y.hi).
FG_INLINE u32 pack_lo(u32 x, u32 y) { return __byte_perm(x, y, 0x5410); }
FG_INLINE u32 pack_hi(u32 x, u32 y) { return __byte_perm(x, y, 0x7632); }

FG_INLINE int ceil_div(int a, int b) { return (a + b - 1) / b; }
