"""Would per-token scales save the FP8 KV cache's accuracy? A fake-quantization answer on the CPU reference.

The engine's FP8 cache uses one scale per layer for K and one for V (calibrated at start-up). This probe keeps a
bf16 cache but rounds each token's K and / or V through e4m3 with the token's own scale per kv head (amax of its
head_dim values over 448) as they are written, then runs `flashgen.bench.accuracy`'s teacher-forced comparison
with float32 (the embedded model, its 4,096 positions). Figures in BENCHMARKS.md ("FP8 KV cache").

    python3 tools/probes/fp8_kv_token_scale_probe.py none|k|v|kv
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from flashgen.bench import accuracy
from flashgen.ops import torch_ops


def fake_e4m3_per_token(x: torch.Tensor) -> torch.Tensor:
    """x (T, Hkv, D) rounded through e4m3 with one scale per token and head, back in float32."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / torch_ops.FP8_MAX
    return (xf / s).clamp(-torch_ops.FP8_MAX, torch_ops.FP8_MAX).to(torch.float8_e4m3fn).float() * s


def run_rounded(round_k: Callable[[torch.Tensor], torch.Tensor] | None,
                round_v: Callable[[torch.Tensor], torch.Tensor] | None) -> dict:
    """flashgen.bench.accuracy's bfloat16 run with K and / or V rounded by round_k / round_v (x (T, Hkv, D) ->
    float32; None: kept) as they are written to the bf16 cache -> {"tokens", "top1_agreement", "kl_nats"}."""
    plain = torch_ops.to_cache
    writes = [0]

    def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
        if dtype != torch.bfloat16:  # the float32 oracle's cache stays exact
            return plain(x, dtype, scale)
        fn = round_k if writes[0] % 2 == 0 else round_v  # rope_kv_append writes K, then V
        writes[0] += 1
        return (fn(x) if fn is not None else x).to(dtype)

    torch_ops.to_cache = to_cache
    try:
        res = accuracy.run("", "cpu", ("bfloat16",))
    finally:
        torch_ops.to_cache = plain
    return {"tokens": res["tokens"], **res["configs"]["bfloat16"]}


def main(mode: str) -> None:
    if mode not in ("none", "k", "v", "kv"):
        raise SystemExit(f"mode {mode!r}: use none, k, v or kv")
    c = run_rounded(fake_e4m3_per_token if "k" in mode else None, fake_e4m3_per_token if "v" in mode else None)
    print(f"bf16 cache, per-token e4m3 rounding of {mode}: top-1 agreement {100 * c['top1_agreement']:.2f}%, "
          f"KL {c['kl_nats']:.5f} nats ({c['tokens']:,} positions)")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kv")
