// rope_kv_append.cu: fused [Qwen3 q/k RMSNorm] + RoPE + paged KV-cache write, one pass over qkv.
//
// qkv (T, (Hq + 2 Hkv) * D) row-major: q heads, then k heads, then v heads of each token.
// One CTA per token, 128 threads; a head is handled by TPH = D / 16 threads, each holding 16 elements,
// and each thread handles two heads at a time (both loaded before either is processed):
//   NeoX (default, HF rotate_half): thread t of a head holds x[8t .. 8t+7] and x[D/2 + 8t .. D/2 + 8t+7],
//     the two halves of its 8 rotation pairs;
//   interleaved (GPT-J): thread t holds x[16t .. 16t+15], 8 adjacent pairs.
//   In both layouts thread t uses cos/sin[8t .. 8t+7] (cos_sin row: R/2 cos, then R/2 sin, float32).
// Partial rotary (Phi-4-mini's partial_rotary_factor): only the first R = rot_dim dims of a head rotate (R a
//   multiple of 16, R <= D; R = D is the full rotation). Threads t < R/16 hold rotation pairs as above with R in
//   place of D (NeoX: x[8t ..] and x[R/2 + 8t ..]); threads t >= R/16 hold x[16t .. 16t+15], dims R .. D-1,
//   which pass through unrotated (still normalised by the q/k norm, which sums over all TPH lanes).
// Per head: optional RMSNorm over D (float32 sum of squares reduced over the TPH lanes by shuffles),
// times the norm weight, rotation in float32, one rounding to the storage dtype. q heads go to q_out
// (T, Hq, D); k and v heads go to k_cache / v_cache[slot] (slot = block * block_size + offset, flat over
// (num_blocks * block_size, Hkv, D)), skipped when slot < 0.
// FG_KV_FP8=1: the cache is float8 e4m3 (fp8.cuh): k and v are stored as round(x / k_scale), round(x / v_scale),
// k first rounded to the activation dtype as the torch reference computes it.
// FG_KV_FP8=2, the int8k cache (fp8.cuh): k_cache int8, v_cache e4m3, and a float32 scale per token and kv head in
// k_scales / v_scales ((num_blocks * block_size, Hkv), the same slots as the cache; the float k_scale / v_scale are
// unused). Per head: k (rotated, normed, rounded to the activation dtype as above) and v as they are, in float32,
// amax = max |x| over the D values (a group max over the head's TPH lanes), s = max(amax, 1e-12) / 127 (K) or
// / 448 (V); K stores round_half_even(k / s) clamped to +-127, V e4m3(v / s) rounded and saturated (IEEE
// divisions throughout, as the torch reference's); the head's first lane writes s.
// Memory traffic: read (Hq + 2 Hkv) * D scalars + R floats of cos_sin (L1/L2-resident) per token, write
// the same number of scalars: 2 * (Hq + 2 Hkv) * D * sizeof(dtype) bytes per token in all (k and v: half that
// with FP8; int8k: the same bytes as FP8 plus 4 + 4 bytes of scales per kv head).
#include "common.cuh"

#ifndef FG_KV_FP8
#define FG_KV_FP8 0
#endif
#define FG_KV_INT8K (FG_KV_FP8 == 2)
#if FG_KV_FP8
#include "fp8.cuh"
typedef fp8_t kv_t;
#else
typedef scalar_t kv_t;
#endif

#ifndef FG_HEAD_DIM
#define FG_HEAD_DIM 128
#endif
#define D FG_HEAD_DIM
#define TPH (D / 16)  // threads per head
#define ROPE_THREADS 128

static_assert(D % 16 == 0 && D >= 32 && D <= 512, "head_dim must be a multiple of 16 in [32, 512]");

#if FG_KV_FP8
// 8 values / scale -> 8 e4m3 bytes (an IEEE division, as the reference's)
FG_INLINE void store_fp8(kv_t* dst, const float* x, float scale) {
    float y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = __fdiv_rn(x[e], scale);
    *reinterpret_cast<uint2*>(dst) = pack8_e4m3(y, 1.f);
}
#endif

#if FG_KV_INT8K
// The int8k cache's scale of one head whose thread holds x0, x1 (16 of its D values): max(amax, floor) / qmax,
// the amax reduced over the head's TPH lanes (all of them take part).
FG_INLINE float head_scale(const float* x0, const float* x1, float qmax) {
    float a = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) a = fmaxf(a, fmaxf(fabsf(x0[e]), fabsf(x1[e])));
    a = group_max<TPH>(a);
    return __fdiv_rn(fmaxf(a, FG_INT8K_FLOOR), qmax);
}
#endif

// cos = 1, sin = 0 for the lanes of a head past rot_dim (partial rotary): their dims pass through unrotated
__device__ __align__(16) const float ROPE_IDENTITY[16] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f,
                                                         0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};

FG_INLINE i64 load_index(const void* p, int is_i64, int t) {
    return is_i64 ? reinterpret_cast<const i64*>(p)[t] : (i64) reinterpret_cast<const int*>(p)[t];
}

// One head of one token: x0/x1 are the thread's two 8-vectors (see the layout above).
FG_INLINE void rope_head(int h, uint4 r0, uint4 r1, i64 tok, i64 slot, int hq, int hkv, int off0, int off1,
                         const float* c, const float* s, kv_t* __restrict__ k_cache,
                         kv_t* __restrict__ v_cache, scalar_t* __restrict__ q_out,
                         const scalar_t* __restrict__ q_norm, const scalar_t* __restrict__ k_norm, float eps,
                         int interleaved, float k_scale, float v_scale, float* __restrict__ k_scales,
                         float* __restrict__ v_scales) {
    if (h >= hq + hkv) {  // v head: copied into the cache as is
        if (slot >= 0) {
            kv_t* dst = v_cache + (slot * hkv + (h - hq - hkv)) * D;
#if FG_KV_FP8
            float f0[8], f1[8];
            unpack8(r0, f0);
            unpack8(r1, f1);
#if FG_KV_INT8K
            v_scale = head_scale(f0, f1, FG_INT8K_VMAX);
            if (threadIdx.x % TPH == 0) v_scales[slot * hkv + (h - hq - hkv)] = v_scale;
#endif
            store_fp8(dst + off0, f0, v_scale);
            store_fp8(dst + off1, f1, v_scale);
#else
            st_v4(dst + off0, r0);
            st_v4(dst + off1, r1);
#endif
        }
        return;
    }
    const bool is_q = h < hq;
    float x0[8], x1[8];
    unpack8(r0, x0);
    unpack8(r1, x1);
    const scalar_t* nw = is_q ? q_norm : k_norm;
    if (nw != nullptr) {  // Qwen3: RMSNorm over the head before the rotation
        float ss = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += x0[e] * x0[e] + x1[e] * x1[e];
        ss = group_sum<TPH>(ss);
        const float rinv = rsqrtf(ss / (float)D + eps);
        float w0[8], w1[8];
        unpack8(ld_v4(nw + off0), w0);
        unpack8(ld_v4(nw + off1), w1);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            x0[e] = x0[e] * rinv * w0[e];
            x1[e] = x1[e] * rinv * w1[e];
        }
    }
    float y0[8], y1[8];
    if (interleaved) {  // pairs (x[2j], x[2j+1]), j = 8t .. 8t+7: four in x0, four in x1
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            y0[2 * j] = x0[2 * j] * c[j] - x0[2 * j + 1] * s[j];
            y0[2 * j + 1] = x0[2 * j + 1] * c[j] + x0[2 * j] * s[j];
            y1[2 * j] = x1[2 * j] * c[j + 4] - x1[2 * j + 1] * s[j + 4];
            y1[2 * j + 1] = x1[2 * j + 1] * c[j + 4] + x1[2 * j] * s[j + 4];
        }
    } else {  // pairs (x[i], x[i + D/2])
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            y0[e] = x0[e] * c[e] - x1[e] * s[e];
            y1[e] = x1[e] * c[e] + x0[e] * s[e];
        }
    }
    const uint4 o0 = pack8(y0), o1 = pack8(y1);
    if (is_q) {
        scalar_t* dst = q_out + (tok * hq + h) * D;
        st_v4(dst + off0, o0);
        st_v4(dst + off1, o1);
    } else if (slot >= 0) {
        kv_t* dst = k_cache + (slot * hkv + (h - hq)) * D;
#if FG_KV_INT8K
        unpack8(o0, y0);  // k in the activation dtype first, as the reference rounds it
        unpack8(o1, y1);
        const float sk = head_scale(y0, y1, FG_INT8K_KMAX);
        if (threadIdx.x % TPH == 0) k_scales[slot * hkv + (h - hq)] = sk;
        *reinterpret_cast<uint2*>(dst + off0) = pack8_s8(y0, sk);
        *reinterpret_cast<uint2*>(dst + off1) = pack8_s8(y1, sk);
#elif FG_KV_FP8
        unpack8(o0, y0);  // k in the activation dtype first, as the reference rounds it
        unpack8(o1, y1);
        store_fp8(dst + off0, y0, k_scale);
        store_fp8(dst + off1, y1, k_scale);
#else
        st_v4(dst + off0, o0);
        st_v4(dst + off1, o1);
#endif
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_kv_append_kernel(const scalar_t* __restrict__ qkv,
                      const void* __restrict__ positions, int pos_i64,
                      const float* __restrict__ cos_sin,
                      const void* __restrict__ slot_mapping, int slot_i64,
                      kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache,
                      scalar_t* __restrict__ q_out,
                      const scalar_t* __restrict__ q_norm,  // (D,) or null
                      const scalar_t* __restrict__ k_norm,  // (D,) or null
                      float eps, int hq, int hkv, int interleaved,
                      float k_scale, float v_scale,         // FP8 cache: stored = x / scale (else unused)
                      int rot_dim                           // rotated dims per head (R), a multiple of 16 <= D
#if FG_KV_INT8K
                      , float* __restrict__ k_scales,       // int8k cache: (num_blocks * block_size, Hkv) float32,
                      float* __restrict__ v_scales          //   written at the slots of k / v
#endif
                      ) {
    pdl_prologue();  // before any memory access (common.cuh)
#if !FG_KV_INT8K
    float* const k_scales = nullptr;
    float* const v_scales = nullptr;
#endif
    const int tok = blockIdx.x;
    const int nheads = hq + 2 * hkv;
    const int t = threadIdx.x % TPH;  // lane within the head
    const int hstep = ROPE_THREADS / TPH;
    const scalar_t* row = qkv + (i64)tok * nheads * D;
    // Element offsets of this thread's two 8-vectors within a head (uniform per lane, see the layout above).
    const bool rot = t < rot_dim / 16;
    const int off0 = (interleaved || !rot) ? 16 * t : 8 * t;
    const int off1 = (interleaved || !rot) ? 16 * t + 8 : rot_dim / 2 + 8 * t;

    // Two heads per thread and iteration, their four loads issued together (more bytes in flight).
    // NOTE: loop bounds and `two` are uniform over each group of TPH lanes (ROPE_THREADS is a multiple
    // of TPH), so the shuffles of the q/k norm always see their whole group.
    int h = threadIdx.x / TPH;
    if (h >= nheads) return;
    uint4 a0 = ld_v4(row + h * D + off0), a1 = ld_v4(row + h * D + off1);
    bool two = h + hstep < nheads;
    uint4 b0 = make_uint4(0u, 0u, 0u, 0u), b1 = b0;
    if (two) {
        b0 = ld_v4(row + (h + hstep) * D + off0);
        b1 = ld_v4(row + (h + hstep) * D + off1);
    }
    const i64 pos = load_index(positions, pos_i64, tok);
    const i64 slot = load_index(slot_mapping, slot_i64, tok);

    // cos/sin of this thread's 8 pairs: the same for every head of the token. Lanes past rot_dim rotate by 0
    // (cos 1, sin 0 from ROPE_IDENTITY: x * 1 - y * 0 is x exactly for finite values), so every lane runs the
    // same code and the same loads (a branch here cost registers and spilled in the FP8 variants).
    const float* cc = rot ? cos_sin + pos * rot_dim + 8 * t : ROPE_IDENTITY;
    const float* ss = rot ? cos_sin + pos * rot_dim + rot_dim / 2 + 8 * t : ROPE_IDENTITY + 8;
    float c[8], s[8];
    {
        float4 p = ld_f4(cc), q = ld_f4(cc + 4);
        float4 e = ld_f4(ss), f = ld_f4(ss + 4);
        c[0] = p.x; c[1] = p.y; c[2] = p.z; c[3] = p.w; c[4] = q.x; c[5] = q.y; c[6] = q.z; c[7] = q.w;
        s[0] = e.x; s[1] = e.y; s[2] = e.z; s[3] = e.w; s[4] = f.x; s[5] = f.y; s[6] = f.z; s[7] = f.w;
    }

    for (;;) {
        rope_head(h, a0, a1, tok, slot, hq, hkv, off0, off1, c, s, k_cache, v_cache, q_out, q_norm, k_norm,
                  eps, interleaved, k_scale, v_scale, k_scales, v_scales);
        if (two)
            rope_head(h + hstep, b0, b1, tok, slot, hq, hkv, off0, off1, c, s, k_cache, v_cache, q_out, q_norm,
                      k_norm, eps, interleaved, k_scale, v_scale, k_scales, v_scales);
        h += 2 * hstep;
        if (h >= nheads) break;
        a0 = ld_v4(row + h * D + off0);
        a1 = ld_v4(row + h * D + off1);
        two = h + hstep < nheads;
        if (two) {
            b0 = ld_v4(row + (h + hstep) * D + off0);
            b1 = ld_v4(row + (h + hstep) * D + off1);
        }
    }
}
