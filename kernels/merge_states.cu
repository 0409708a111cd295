// merge_states.cu: the attention states of a shared-prefix decode step merged into its output.
//
// merge_states_kernel: shared-prefix (cascade) decode with the two parts run side by side (cuda_attention.py,
//   FLASHGEN_SHARED_OVERLAP): the own-part launch writes each (sequence, query head) entry's float32 output and
//   natural-log LSE, the PF_SHARED launch its key splits' (n_sh states; an unused split or a row in no group has
//   LSE -inf and an output never written, so it is skipped, never read). Here they are merged, own state first,
//   then the splits in order, by common.cuh's merge_state8 (the decode kernel's store_out merges with it too),
//   and written in the activation dtype (+ the merged LSE when asked for).
//   One thread per 8 dims of an entry: grid ceil(entries * D / 8 / 256), 256 threads. Traffic: read
//   (1 + used splits) x entries x D floats, write entries x D scalars.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
merge_states_kernel(const float* __restrict__ o_own,   // (entries, D)
                    const float* __restrict__ lse_own, // (entries,)
                    const float* __restrict__ o_sh,    // (n_sh, entries, D)
                    const float* __restrict__ lse_sh,  // (n_sh, entries)
                    int n_sh, int entries, int D,             // entries * D / 8 < 2^31 (the host checks)
                    scalar_t* __restrict__ out,        // (entries, D)
                    float* __restrict__ lse_out) {     // (entries,), or null
    pdl_prologue();  // before any memory access (common.cuh)
    const int per = D / 8;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= entries * per) return;
    const int idx = t / per, d0 = (t % per) * 8;
    float acc[8];
    {
        const float4 a = *reinterpret_cast<const float4*>(o_own + (i64)idx * D + d0);
        const float4 b = *reinterpret_cast<const float4*>(o_own + (i64)idx * D + d0 + 4);
        acc[0] = a.x; acc[1] = a.y; acc[2] = a.z; acc[3] = a.w;
        acc[4] = b.x; acc[5] = b.y; acc[6] = b.z; acc[7] = b.w;
    }
    float lse = lse_own[idx];
    for (int sp = 0; sp < n_sh; ++sp) {
        const i64 e = idx + (i64)sp * entries;
        merge_state8(acc, lse, o_sh + e * D + d0, lse_sh[e]);
    }
    st_v4(out + (i64)idx * D + d0, pack8(acc));
    if (lse_out != nullptr && d0 == 0) lse_out[idx] = lse;
}
