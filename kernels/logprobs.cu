// logprobs.cu: logprobs of chosen tokens, their ranks and the top-k, in one pass over the logits.
//
// logprobs_pack_kernel: grid (R), 512 threads, one CTA per row of x (R, V) (logits in the model's dtype, or
// float32 with LP_F32 = 1; rows `stride` elements apart). For row r and its chosen token c = tokens[r] (< 0
// reads token 0) it writes out[r] = [x_c - lse, rank, top_1 - lse .. top_k - lse, id_1 .. id_k] (float32; ids
// exact below 2^24), where lse = log-sum-exp of the row, rank = 1 + the tokens with a strictly larger logit
// (vLLM's count) and top_1 >= .. >= top_k the k largest logits; flashgen.engine.logprobs.pack_logprobs is the
// reference (equal up to the order of equal logits in the top-k).
// Each thread scans the row with stride 512 keeping an online (max, sum of exp), its count of logits > x_c and
// its LP_K largest (value, id) sorted in registers (an insertion is rare once the list has filled); then the
// block reduces (max, sum) and the counts, and k rounds of a block-wide argmax over the threads' list heads
// pick the top-k (lowest id first on equal values). NaN logits are skipped.
// Traffic: the row once, in its own dtype: 2 V bytes per row for bf16 logits (the torch version makes ~6
// float32 passes: conversion, log-sum-exp, gather, compare, top-k).
#include "common.cuh"

#ifndef LP_F32
#define LP_F32 0
#endif
#ifndef LP_K
#define LP_K 20
#endif
#define LP_THREADS 512
#define LP_WARPS (LP_THREADS / 32)

#if LP_F32
typedef float logit_t;
FG_INLINE float lp_load(const float* p) { return __ldg(p); }
#else
typedef scalar_t logit_t;
FG_INLINE float lp_load(const scalar_t* p) { return to_float(*p); }
#endif

FG_INLINE float lp_neg_inf() { return __int_as_float(0xff800000); }

// (v, i) beats (bv, bi): larger, or equal with a lower id.
FG_INLINE bool lp_better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

extern "C" __global__ void __launch_bounds__(LP_THREADS)
logprobs_pack_kernel(const logit_t* __restrict__ x, long long stride, int V,
                     const long long* __restrict__ tokens, int k, float* __restrict__ out) {
    __shared__ float s_m[LP_WARPS], s_s[LP_WARPS], s_bv[LP_WARPS];
    __shared__ int s_cnt[LP_WARPS], s_bi[LP_WARPS], s_bt[LP_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const logit_t* row = x + (long long)blockIdx.x * stride;
    long long c = tokens[blockIdx.x];
    c = c < 0 ? 0 : c;
    const float xc = lp_load(row + c);

    float m = lp_neg_inf(), s = 0.f;
    int cnt = 0;
    float tv[LP_K];
    int ti[LP_K];
#pragma unroll
    for (int j = 0; j < LP_K; ++j) {
        tv[j] = lp_neg_inf();
        ti[j] = 0x7fffffff;
    }
    for (int i = tid; i < V; i += LP_THREADS) {
        const float v = lp_load(row + i);
        if (v != v) continue;  // NaN
        cnt += v > xc;
        if (v > m) {
            s = s * exp2f((m - v) * FG_LOG2E) + 1.f;
            m = v;
        } else if (v != lp_neg_inf()) {  // -inf adds nothing (and -inf - -inf would be NaN)
            s += exp2f((v - m) * FG_LOG2E);
        }
        if (lp_better(v, i, tv[LP_K - 1], ti[LP_K - 1])) {  // insert, keeping tv sorted (best first)
#pragma unroll
            for (int j = LP_K - 1; j > 0; --j) {
                if (lp_better(v, i, tv[j - 1], ti[j - 1])) {
                    tv[j] = tv[j - 1];
                    ti[j] = ti[j - 1];
                } else if (lp_better(v, i, tv[j], ti[j])) {
                    tv[j] = v;
                    ti[j] = i;
                }
            }
            if (lp_better(v, i, tv[0], ti[0])) {
                tv[0] = v;
                ti[0] = i;
            }
        }
    }

    // (max, sum of exp) and the count over the block
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o), os = __shfl_xor_sync(0xffffffffu, s, o);
        const float nm = fmaxf(m, om);
        s = (s == 0.f ? 0.f : s * exp2f((m - nm) * FG_LOG2E)) + (os == 0.f ? 0.f : os * exp2f((om - nm) * FG_LOG2E));
        m = nm;
        cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_s[warp] = s;
        s_cnt[warp] = cnt;
    }
    __syncthreads();
    float lse;
    int rank;
    {
        float bm = lp_neg_inf();
#pragma unroll
        for (int w = 0; w < LP_WARPS; ++w) bm = fmaxf(bm, s_m[w]);
        float bs = 0.f;
        int bc = 0;
#pragma unroll
        for (int w = 0; w < LP_WARPS; ++w) {
            bs += s_s[w] == 0.f ? 0.f : s_s[w] * exp2f((s_m[w] - bm) * FG_LOG2E);
            bc += s_cnt[w];
        }
        lse = bm + __logf(bs);
        rank = bc + 1;
    }
    const int width = 2 + 2 * k;
    float* o = out + (long long)blockIdx.x * width;
    if (tid == 0) {
        o[0] = xc - lse;
        o[1] = (float)rank;
    }

    // k rounds: the best list head of the block wins and is popped from its thread's list
    for (int j = 0; j < k; ++j) {
        float bv = tv[0];
        int bi = ti[0], bt = tid;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, off), ot = __shfl_xor_sync(0xffffffffu, bt, off);
            if (lp_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
                bt = ot;
            }
        }
        __syncthreads();  // the previous round's reads of s_bv / s_bi / s_bt are done
        if (lane == 0) {
            s_bv[warp] = bv;
            s_bi[warp] = bi;
            s_bt[warp] = bt;
        }
        __syncthreads();
        bv = s_bv[0];
        bi = s_bi[0];
        bt = s_bt[0];
#pragma unroll
        for (int w = 1; w < LP_WARPS; ++w)
            if (lp_better(s_bv[w], s_bi[w], bv, bi)) {
                bv = s_bv[w];
                bi = s_bi[w];
                bt = s_bt[w];
            }
        if (tid == 0) {
            o[2 + j] = bv - lse;
            o[2 + k + j] = (float)(bi == 0x7fffffff ? 0 : bi);
        }
        if (tid == bt) {  // pop the head
#pragma unroll
            for (int q = 0; q < LP_K - 1; ++q) {
                tv[q] = tv[q + 1];
                ti[q] = ti[q + 1];
            }
            tv[LP_K - 1] = lp_neg_inf();
            ti[LP_K - 1] = 0x7fffffff;
        }
    }
}
