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
//   Structured outputs: gumbel_argmax_masked_kernel takes also mask (M, mask_words) and mask_rows (B,); a row
//   with mask_rows[row] >= 0 considers only the tokens its bitmask row allows (llguidance's layout: token t
//   iff bit t & 31 of int32 word t >> 5; tokens at or past 32 * mask_words are not allowed). Disallowed tokens
//   are skipped, not scored as -inf: a constrained row where nothing allowed scores above -inf (no token
//   allowed, or every allowed logit -inf or NaN) gets -1, as in sampler.sample. Index 0 there (the -inf tie
//   rule) could be a disallowed token whose logit is finite, which the runner's isfinite check would let
//   through. The mask costs one 32-bit load per vector of logits (a vector never straddles a word: 1 bit per
//   logit); unconstrained batches launch gumbel_argmax_kernel, which reads no mask.
//   The step's epilogue (checked != nullptr): out[row] gets a token a device slot can hold (the -1 of a row with
//   nothing allowed becomes 0), checked[row] the token the host is told: -1 where the row had nothing allowed or
//   where the logit of the token picked is not finite (a NaN or inf row: the engine fails that request alone),
//   and slot_tokens[slot_ids[row]] (slot_ids != nullptr) the token too: the input of the sequence's next decode
//   step. These are what the runner did with ~10 torch ops after the launch.
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
// wins: a row of NaN keeps index 0x7FFFFFFF, which the kernel writes as 0 (a row of -inf ties to index 0).
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
        // (2^24 - 1 + 0.5) rounds up to 2^24 in float: clamp below 1, or the noise is +inf (and -inf + inf
        // a NaN that could outrank every allowed token)
        const float u = fminf(((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f), 0.99999994f);
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

// Bits of tokens v, v + 1, ... (up to the end of v's word) of one bitmask row of `words` int32s: bit 0 = v.
FG_INLINE u32 allowed_bits(const int* __restrict__ m, int words, int v) {
    const int w = v >> 5;
    return w < words ? (u32)__ldg(m + w) >> (v & 31) : 0u;
}

// One thread's share of [lo, hi) of row x; MASKED: only the tokens that bitmask row m allows.
template <bool MASKED>
FG_INLINE void scan(const logit_t* __restrict__ x, int lo, int hi, bool vec, float t, u32 key,
                    const int* __restrict__ m, int mask_words, float& bv, int& bi) {
    if (vec) {  // rows start 16-byte aligned: vector loads, a few in flight per thread
#pragma unroll 4
        for (int v0 = lo + LOGIT_VEC * threadIdx.x; v0 < hi; v0 += LOGIT_VEC * blockDim.x) {
            float f[LOGIT_VEC];
            load_vec(x + v0, f);
            // v0 is a multiple of LOGIT_VEC, which divides 32: the vector's bits lie in one word
            const u32 bits = MASKED ? allowed_bits(m, mask_words, v0) : 0u;
#pragma unroll
            for (int e = 0; e < LOGIT_VEC; ++e) {
                if (!MASKED || ((bits >> e) & 1u)) consider(f[e], v0 + e, t, key, bv, bi);
            }
        }
    } else {
        for (int v = lo + threadIdx.x; v < hi; v += blockDim.x) {
            if (MASKED && !(allowed_bits(m, mask_words, v) & 1u)) continue;
            consider(logit_to_float(x[v]), v, t, key, bv, bi);
        }
    }
}

// The row's token: -1 for a constrained row where nothing allowed scored above -inf; else the argmax (index 0
// when nothing won: a row of NaN).
FG_INLINE i64 row_token(float bv, int bi, bool constrained) {
    if (constrained && !(bv > neg_inf())) return -1;
    return bi == 0x7FFFFFFF ? 0 : bi;
}

// Thread 0's write of the row's result (the top comment: out alone, or the step's epilogue).
FG_INLINE void finish_row(const logit_t* __restrict__ x, int row, float bv, int bi, bool constrained,
                          i64* __restrict__ out, i64* __restrict__ checked, const int* __restrict__ slot_ids,
                          i64* __restrict__ slot_tokens) {
    const i64 tok = row_token(bv, bi, constrained);
    if (checked == nullptr) {
        out[row] = tok;
        return;
    }
    const i64 safe = tok < 0 ? 0 : tok;
    const float chosen = logit_to_float(x[safe]);
    out[row] = safe;
    checked[row] = (tok >= 0 && fabsf(chosen) < __int_as_float(0x7f800000)) ? tok : -1;  // NaN fails both
    if (slot_ids != nullptr) slot_tokens[slot_ids[row]] = safe;
}

// grid (B, S): CTA (row, s) scans chunk s of the row (chunk = a multiple of LOGIT_VEC, or the whole row
// when S == 1). With S > 1 each CTA writes its best to part_v / part_i, counts itself done on the row's
// counter, and the row's last CTA to finish reduces the S partials (rows of a small batch are spread over
// the GPU instead of one SM each). MASKED: mask (M, mask_words) and mask_rows (B,) are read.
template <bool MASKED>
FG_INLINE void gumbel_argmax_row(const logit_t* __restrict__ logits, int vocab, int chunk,
                                 const float* __restrict__ temperature, const i64* __restrict__ seeds,
                                 const i64* __restrict__ steps, i64* __restrict__ out, float* __restrict__ part_v,
                                 int* __restrict__ part_i, int* __restrict__ counters, const int* __restrict__ mask,
                                 const int* __restrict__ mask_rows, int mask_words, i64* __restrict__ checked,
                                 const int* __restrict__ slot_ids, i64* __restrict__ slot_tokens) {
    const int row = blockIdx.x, S = gridDim.y, sp = blockIdx.y;
    const float t = temperature[row];
    const unsigned long long seed = (unsigned long long)seeds[row];
    const u32 base = (mix32((u32)(seed & 0xFFFFFFFFull)) ^ mix32((u32)(seed >> 32))) + (u32)steps[row];
    const u32 key = mix32(base);
    const logit_t* x = logits + (i64)row * vocab;
    const int lo = sp * chunk, hi = min(vocab, lo + chunk);
    const int mrow = MASKED ? mask_rows[row] : -1;
    const bool vec = vocab % LOGIT_VEC == 0;
    float bv = neg_inf();
    int bi = 0x7FFFFFFF;
    if (MASKED && mrow >= 0) {
        scan<true>(x, lo, hi, vec, t, key, mask + (i64)mrow * mask_words, mask_words, bv, bi);
    } else {
        scan<false>(x, lo, hi, vec, t, key, nullptr, 0, bv, bi);
    }
    block_argmax(bv, bi);
    if (S == 1) {
        if (threadIdx.x == 0) finish_row(x, row, bv, bi, mrow >= 0, out, checked, slot_ids, slot_tokens);
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
    if (threadIdx.x == 0) finish_row(x, row, bv, bi, mrow >= 0, out, checked, slot_ids, slot_tokens);
}

extern "C" __global__ void __launch_bounds__(512)
gumbel_argmax_kernel(const logit_t* __restrict__ logits, int vocab, int chunk,
                     const float* __restrict__ temperature, const i64* __restrict__ seeds,
                     const i64* __restrict__ steps, i64* __restrict__ out,
                     float* __restrict__ part_v, int* __restrict__ part_i, int* __restrict__ counters,
                     i64* __restrict__ checked, const int* __restrict__ slot_ids, i64* __restrict__ slot_tokens) {
    gumbel_argmax_row<false>(logits, vocab, chunk, temperature, seeds, steps, out, part_v, part_i, counters,
                             nullptr, nullptr, 0, checked, slot_ids, slot_tokens);
}

// A separate entry point rather than a null-mask branch: the masked loop's registers would lower the
// occupancy of every unconstrained launch (ptxas sizes a kernel for its widest path).
extern "C" __global__ void __launch_bounds__(512)
gumbel_argmax_masked_kernel(const logit_t* __restrict__ logits, int vocab, int chunk,
                            const float* __restrict__ temperature, const i64* __restrict__ seeds,
                            const i64* __restrict__ steps, i64* __restrict__ out,
                            float* __restrict__ part_v, int* __restrict__ part_i, int* __restrict__ counters,
                            const int* __restrict__ mask, const int* __restrict__ mask_rows, int mask_words,
                            i64* __restrict__ checked, const int* __restrict__ slot_ids,
                            i64* __restrict__ slot_tokens) {
    gumbel_argmax_row<true>(logits, vocab, chunk, temperature, seeds, steps, out, part_v, part_i, counters,
                            mask, mask_rows, mask_words, checked, slot_ids, slot_tokens);
}
