// sampling.cu: Gumbel-max sampling fused into one pass over the logits.
//
// gumbel_argmax_kernel: grid (B, S), 512 threads; S CTAs share a row when the batch alone would not fill
//   the GPU. Each thread keeps its best (value, index) of  x = logit / T + g(seed, step, v)  (rows with
//   T == 0: x = logit, greedy), then warp-shuffle and shared-memory reductions pick the row's maximum,
//   lowest index on ties (as torch.argmax). g is Gumbel(0, 1) noise from a counter-based hash of (request
//   seed, output position, token id), the same function as flashgen.engine.sampler.gumbel_noise (up to the
//   rounding of fast logarithms), so a request's draws depend on its seed alone, never on its batch, and
//   no generator state lives on the device (CUDA-graph friendly).
//   Filtering (top-k, top-p, min-p, penalties, banned tokens) happens before, as -inf logits.
//   Traffic: the (B, V) logits are read once, 16-byte vectors, in the model's dtype (or float32 after
//   penalties / filters); the torch version makes ~30 passes over a (B, V) int64 tensor for the noise alone.
#include "common.cuh"

#ifndef SAMPLING_F32
#define SAMPLING_F32 1
#endif

// NOTE: NVRTC has no math.h, so no INFINITY macro.
FG_INLINE float neg_inf() { return __int_as_float(0xff800000); }

FG_INLINE u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// (v, i) replaces the best (bv, bi) if larger, or equal with a lower index (torch.argmax's tie rule). NaN never
// wins; a row of -inf keeps index 0x7FFFFFFF, which the kernel writes as 0.
FG_INLINE void take_max(float v, int i, float& bv, int& bi) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

// Warp-wide (value, index) maximum, lowest index on ties.
FG_INLINE void warp_argmax(float& bv, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        take_max(ov, oi, bv, bi);
    }
}

// Logits in float32 (SAMPLING_F32 = 1) or in the model's dtype (scalar_t: the lm_head GEMM's output, read
// as it is, half the bytes).
#if SAMPLING_F32
typedef float logit_t;
#define LOGIT_VEC 4
FG_INLINE void load_vec(const float* p, float* f) {
    const float4 v = ld_f4(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}
FG_INLINE float logit_to_float(float x) { return x; }
#else
typedef scalar_t logit_t;
#define LOGIT_VEC 8
FG_INLINE void load_vec(const scalar_t* p, float* f) { unpack8(ld_v4(p), f); }
FG_INLINE float logit_to_float(scalar_t x) { return to_float(x); }
#endif

// The running best of one thread: x = logit / T + g(key, v), or the logit itself when T == 0.
// -log(-log(u)) with the hardware log2 (__logf): the noise equals sampler.gumbel_noise's up to the rounding
// of the two logarithms (a few ulp). The accurate logf made the kernel compute-bound, several times
// slower than reading the logits (docs/benchmark-history.md).
FG_INLINE void consider(float logit, int v, float t, u32 key, float& bv, int& bi) {
    float val = logit;
    if (t > 0.f) {
        const u32 h = mix32(mix32(key ^ (u32)v) + 0x9E3779B9u);
        const float u = ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
        val = val / t - __logf(-__logf(u));
    }
    take_max(val, v, bv, bi);
}

// CTA-wide (value, index) maximum, lowest index on ties; the result is valid in thread 0.
FG_INLINE void block_argmax(float& bv, int& bi) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    warp_argmax(bv, bi);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        bv = lane < nw ? best_v[lane] : neg_inf();
        bi = lane < nw ? best_i[lane] : 0x7FFFFFFF;
        warp_argmax(bv, bi);
    }
}

// grid (B, S): CTA (row, s) scans chunk s of the row (chunk = a multiple of LOGIT_VEC, or the whole row
// when S == 1). With S > 1 each CTA writes its best to part_v / part_i, counts itself done on the row's
// counter, and the row's last CTA to finish reduces the S partials (rows of a small batch are spread over
// the GPU instead of one SM each).
extern "C" __global__ void __launch_bounds__(512)
gumbel_argmax_kernel(const logit_t* __restrict__ logits, int vocab, int chunk,
                     const float* __restrict__ temperature, const i64* __restrict__ seeds,
                     const i64* __restrict__ steps, i64* __restrict__ out,
                     float* __restrict__ part_v, int* __restrict__ part_i, int* __restrict__ counters) {
    const int row = blockIdx.x, S = gridDim.y, sp = blockIdx.y;
    const float t = temperature[row];
    const unsigned long long seed = (unsigned long long)seeds[row];
    const u32 base = (mix32((u32)(seed & 0xFFFFFFFFull)) ^ mix32((u32)(seed >> 32))) + (u32)steps[row];
    const u32 key = mix32(base);
    const logit_t* x = logits + (i64)row * vocab;
    const int lo = sp * chunk, hi = min(vocab, lo + chunk);
    float bv = neg_inf();
    int bi = 0x7FFFFFFF;
    if (vocab % LOGIT_VEC == 0) {  // rows start 16-byte aligned: vector loads, a few in flight per thread
#pragma unroll 4
        for (int v0 = lo + LOGIT_VEC * threadIdx.x; v0 < hi; v0 += LOGIT_VEC * blockDim.x) {
            float f[LOGIT_VEC];
            load_vec(x + v0, f);
#pragma unroll
            for (int e = 0; e < LOGIT_VEC; ++e) consider(f[e], v0 + e, t, key, bv, bi);
        }
    } else {
        for (int v = lo + threadIdx.x; v < hi; v += blockDim.x) consider(logit_to_float(x[v]), v, t, key, bv, bi);
    }
    block_argmax(bv, bi);
    if (S == 1) {
        if (threadIdx.x == 0) out[row] = bi == 0x7FFFFFFF ? 0 : bi;
        return;
    }
    if (threadIdx.x == 0) {
        part_v[(i64)row * S + sp] = bv;
        part_i[(i64)row * S + sp] = bi;
    }
    if (!arrive_last(counters + row, S)) return;
    bv = neg_inf();
    bi = 0x7FFFFFFF;
    for (int j = threadIdx.x; j < S; j += blockDim.x) {  // chunks in order: ties keep the lowest index
        take_max(__ldcg(part_v + (i64)row * S + j), __ldcg(part_i + (i64)row * S + j), bv, bi);
    }
    block_argmax(bv, bi);
    if (threadIdx.x == 0) out[row] = bi == 0x7FFFFFFF ? 0 : bi;
}
