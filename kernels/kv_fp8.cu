// kv_fp8.cu: the FP8 KV cache's pages that a prefill batch reads, dequantized into a scratch cache of the
// activation dtype, where the prefill kernels (mma and wgmma) read them as they read a bf16/fp16 cache.
//
// Prefill is compute-bound (each K/V element is reused by a whole tile of queries), so one extra pass over the
// batch's context (read 1 byte, write 2, per element) costs little next to the attention itself; decode, which
// is bandwidth-bound, reads the FP8 cache directly (decode_attention.cu, FG_KV_FP8).
// Grid (pages per sequence = width, sequences); page x of sequence b goes to scratch page b * width + x, and only
// pages holding context (x * block_size < context_lens[b]) are converted. 256 threads, 8 elements per thread
// per iteration: value = fp8 * scale, rounded once to the activation dtype (the torch reference's from_cache).
// kv_dequant_pages_int8k_kernel: the same for the int8k cache (fp8.cuh; K int8, V e4m3, a float32 scale per token
// and kv head): value = (float)stored * scale[token, head], rounded once to the activation dtype (the reference's
// (x.float() * s[..., None]).to(dtype)). The scales are flat over (num_blocks * block_size, Hkv): element i of
// page p (a block id) has scale p * block_size * Hkv + i / D. Reads 1 byte per element plus 4 bytes per token and
// kv head of K and of V, writes 2 per element.
#include "common.cuh"
#include "fp8.cuh"

// 8 values (exact in the activation dtype) times `scale` in float32, rounded once to the activation dtype, to dst.
FG_INLINE void store_scaled8(scalar_t* dst, uint4 w, float scale) {
    float f[8];
    unpack8(w, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] *= scale;
    st_v4(dst, pack8(f));
}

extern "C" __global__ void __launch_bounds__(256)
kv_dequant_pages_kernel(const fp8_t* __restrict__ k_cache, const fp8_t* __restrict__ v_cache,
                        scalar_t* __restrict__ k_out, scalar_t* __restrict__ v_out,
                        const int* __restrict__ block_tables, int bt_stride, const int* __restrict__ context_lens,
                        int width, int log2_bs, int page_elems, float k_scale, float v_scale) {
    const int x = blockIdx.x, b = blockIdx.y;
    if ((x << log2_bs) >= context_lens[b]) return;
    const i64 src = (i64)block_tables[(i64)b * bt_stride + x] * page_elems;
    const i64 dst = ((i64)b * width + x) * page_elems;
    for (int i = 8 * threadIdx.x; i < page_elems; i += 8 * blockDim.x) {
        const uint2 kw = *reinterpret_cast<const uint2*>(k_cache + src + i);
        const uint2 vw = *reinterpret_cast<const uint2*>(v_cache + src + i);
        store_scaled8(k_out + dst + i, e4m3x8_to_scalar8(kw), k_scale);
        store_scaled8(v_out + dst + i, e4m3x8_to_scalar8(vw), v_scale);
    }
}

extern "C" __global__ void __launch_bounds__(256)
kv_dequant_pages_int8k_kernel(const fp8_t* __restrict__ k_cache, const fp8_t* __restrict__ v_cache,
                              scalar_t* __restrict__ k_out, scalar_t* __restrict__ v_out,
                              const int* __restrict__ block_tables, int bt_stride,
                              const int* __restrict__ context_lens, int width, int log2_bs, int page_elems,
                              const float* __restrict__ k_scales, const float* __restrict__ v_scales,
                              int log2_d) {  // log2 of head_dim: 8 elements of a thread share a token and head
    const int x = blockIdx.x, b = blockIdx.y;
    if ((x << log2_bs) >= context_lens[b]) return;
    const i64 blk = block_tables[(i64)b * bt_stride + x];
    const i64 src = blk * page_elems, sc = blk * (page_elems >> log2_d);
    const i64 dst = ((i64)b * width + x) * page_elems;
    for (int i = 8 * threadIdx.x; i < page_elems; i += 8 * blockDim.x) {
        const uint2 kw = *reinterpret_cast<const uint2*>(k_cache + src + i);
        const uint2 vw = *reinterpret_cast<const uint2*>(v_cache + src + i);
        const float ks = k_scales[sc + (i >> log2_d)], vs = v_scales[sc + (i >> log2_d)];
        store_scaled8(k_out + dst + i, s8x8_to_scalar8(kw), ks);
        store_scaled8(v_out + dst + i, e4m3x8_to_scalar8(vw), vs);
    }
}
