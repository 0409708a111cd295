"""Would per-token scales save the FP8 KV cache's accuracy? A fake-quantization answer on the CPU reference.

The engine's FP8 cache uses one scale per layer for K and one for V (calibrated at start-up). This probe keeps a
bf16 cache but rounds each token's K and / or V through e4m3 with the token's own scale per kv head (amax of its
head_dim values over 448) as they are written, then runs `flashgen.bench.accuracy`'s teacher-forced comparison
with float32 (the embedded model, its 4,096 positions). Figures in BENCHMARKS.md ("FP8 KV cache").

    python3 tools/probes/fp8_kv_token_scale_probe.py none|k|v|kv
"""
from __future__ import annotations

import sys

import torch

from flashgen.bench import accuracy
from flashgen.ops import torch_ops


def fake_e4m3_per_token(x: torch.Tensor) -> torch.Tensor:
    """x (T, Hkv, D) rounded through e4m3 with one scale per token and head, back in float32."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / torch_ops.FP8_MAX
    return (xf / s).clamp(-torch_ops.FP8_MAX, torch_ops.FP8_MAX).to(torch.float8_e4m3fn).float() * s


def main(mode: str) -> None:
    if mode not in ("none", "k", "v", "kv"):
        raise SystemExit(f"mode {mode!r}: use none, k, v or kv")
    plain = torch_ops.to_cache
    writes = [0]

    def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
        if dtype != torch.bfloat16:  # the float32 oracle's cache stays exact
            return plain(x, dtype, scale)
        is_k = writes[0] % 2 == 0  # rope_kv_append writes K, then V
        writes[0] += 1
        if ("k" in mode and is_k) or ("v" in mode and not is_k):
            return fake_e4m3_per_token(x).to(dtype)
        return x.to(dtype)

    torch_ops.to_cache = to_cache
    res = accuracy.run("", "cpu", ("bfloat16",))
    c = res["configs"]["bfloat16"]
    print(f"bf16 cache, per-token e4m3 rounding of {mode}: top-1 agreement {100 * c['top1_agreement']:.2f}%, "
          f"KL {c['kl_nats']:.5f} nats ({res['tokens']:,} positions)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kv")
