"""One small case of each CUDA kernel, for compute-sanitizer (memcheck / racecheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py

(without torch's caching allocator every tensor is its own allocation, so an out-of-bounds access is
caught). `--attention` runs only the attention kernels (for racecheck, which is slow). Exits non-zero
if an output holds NaN (an unwritten element).
"""
from __future__ import annotations

import sys

import torch

from flashgen.ops import cuda_attention, cuda_linear, cuda_ops, jit, torch_ops


def main() -> int:
    attention_only = "--attention" in sys.argv
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    rnd = lambda *s, dt=bf: torch.randn(*s, generator=g, device=dev).to(dt)  # noqa: E731
    outs = {}
    d, hq, hkv, bs = 128, 8, 2, 16
    lens = [1, 17, 40, 130]  # pages partly filled, one sequence past several pages
    nblk = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(nblk)
    bt = torch.full((len(lens), max(nblk)), -1, dtype=torch.int32, device=dev)
    perm = torch.randperm(num_blocks, generator=g, device=dev).to(torch.int32)
    pos = 0
    for b, k in enumerate(nblk):
        bt[b, :k] = perm[pos:pos + k]
        pos += k
    kc, vc = rnd(num_blocks, bs, hkv, d), rnd(num_blocks, bs, hkv, d)
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)

    if not attention_only:
        x, r, w = rnd(5, 1024), rnd(5, 1024), rnd(1024)
        outs["rms_norm"] = cuda_ops.rms_norm(x, w, 1e-6, r)[0]
        outs["silu_mul"] = cuda_ops.silu_mul(rnd(5, 2 * 1032))
        outs["gelu_tanh_mul"] = cuda_ops.gelu_tanh_mul(rnd(5, 2 * 1032))
        T = 7
        cos_sin = torch.randn(64, d, generator=g, device=dev)
        slots = torch.arange(T, device=dev, dtype=torch.int64) * 3
        slots[2] = -1
        outs["rope_kv_append"] = cuda_ops.rope_kv_append(
            rnd(T, (hq + 2 * hkv) * d), torch.arange(T, device=dev), cos_sin, slots, kc.clone(), vc.clone(),
            rnd(d), rnd(d), 1e-6, False)
        for warps, unroll in cuda_ops.SKINNY_VARIANTS:  # 3 rows, N not a multiple of 16, K not of 32, bias
            outs[f"skinny_gemm_{warps}x{unroll}"] = cuda_ops.skinny_gemm(rnd(3, 1032), rnd(37, 1032), rnd(37),
                                                                       warps=warps, unroll=unroll)
        if torch.cuda.get_device_capability(dev) >= (8, 9):  # FP8 weights: 3 rows, N = 37, K = 1040 (not of 64)
            xq, xs = torch_ops.quantize_fp8_rows(rnd(3, 1040))
            wq, wsc = torch_ops.quantize_fp8_rows(rnd(37, 1040))
            outs["quantize_fp8_rows"] = cuda_linear.quantize_fp8_rows(rnd(3, 1040))[0].float()
            outs["rms_norm_fp8"] = cuda_ops.rms_norm_fp8(x, w, 1e-6, r)[0].q.float()  # the fused quantizations
            outs["silu_mul_fp8"] = cuda_ops.act_mul_fp8(rnd(5, 2 * 1032), "silu").q.float()
            outs["gelu_tanh_mul_fp8"] = cuda_ops.act_mul_fp8(rnd(5, 2 * 1032), "gelu_tanh").q.float()
            for warps, unroll in cuda_ops.SKINNY_FP8_VARIANTS:
                outs[f"skinny_gemm_fp8_{warps}x{unroll}"] = cuda_ops.skinny_gemm_fp8(
                    xq, xs, wq, wsc, rnd(37), bf, warps=warps, unroll=unroll)
        logits = rnd(3, 50257)
        outs["gumbel_argmax"] = cuda_ops.gumbel_argmax(  # several CTAs per row (small batch), scalar tail path
            logits, torch.tensor([0.0, 0.7, 1.3], device=dev), torch.tensor([1, 2, 3], device=dev),
            torch.tensor([0, 5, 9], device=dev)).float()
        outs["gumbel_argmax_vec"] = cuda_ops.gumbel_argmax(
            rnd(2, 4096), torch.tensor([0.5, 0.0], device=dev), torch.tensor([4, 5], device=dev),
            torch.tensor([1, 1], device=dev)).float()
        checked, slot_tokens = torch.empty(3, dtype=torch.int64, device=dev), torch.zeros(7, dtype=torch.int64,
                                                                                          device=dev)
        outs["gumbel_argmax_epilogue"] = cuda_ops.gumbel_argmax(  # the step's epilogue: checked and the slots
            logits, torch.tensor([0.0, 0.7, 1.3], device=dev), torch.tensor([1, 2, 3], device=dev),
            torch.tensor([0, 5, 9], device=dev), checked=checked,
            slot_ids=torch.tensor([6, 0, 3], dtype=torch.int32, device=dev), slot_tokens=slot_tokens).float()
        outs["gumbel_argmax_checked"] = checked.float()
        outs["gumbel_argmax_slots"] = slot_tokens.float()

    q = rnd(len(lens), hq, d)
    outs["decode"] = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1)
    outs["decode_split"] = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, num_splits=3, return_lse=True,
                                                     plan="split")[0]
    outs["decode_balanced"] = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, num_splits=3, return_lse=True,
                                                        plan="balanced")[0]
    outs["decode_warp"] = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, return_lse=True, plan="warp")[0]
    if not attention_only:  # a shared-prefix step's two states merged (an empty split: LSE -inf, never read)
        f32 = torch.float32
        l_sh = rnd(3, len(lens), hq, dt=f32)
        l_sh[1] = float("-inf")
        outs["merge_states"] = torch.empty_like(q)
        cuda_attention.merge_states(rnd(len(lens), hq, d, dt=f32), rnd(len(lens), hq, dt=f32),
                                    rnd(3, len(lens), hq, d, dt=f32), l_sh, outs["merge_states"],
                                    torch.empty(len(lens), hq, dtype=f32, device=dev))
    qlens = [1, 17, 5, 130]  # prefix hits (context > q_len) and a full prefill
    cu = torch.tensor([0, 1, 18, 23, 153], dtype=torch.int32, device=dev)
    qp = rnd(153, hq, d)
    outs["prefill"] = cuda_ops.prefill_attention(qp, kc, vc, cu, ctx, bt, max(qlens), 0.1, impl="mma")
    if jit.device_arch(dev) == cuda_ops.WGMMA_ARCH:
        outs["prefill_wgmma"] = cuda_ops.prefill_attention(qp, kc, vc, cu, ctx, bt, max(qlens), 0.1, impl="wgmma")
    torch.cuda.synchronize()
    bad = [k for k, v in outs.items() if torch.isnan(v).any()]
    print("sanitize cases:", ", ".join(outs), "| NaN in:", bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
