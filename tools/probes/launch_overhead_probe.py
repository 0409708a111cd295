"""Host time per call of the CUDA backend's ops on tiny inputs (the GPU work is shorter than the launch, so the
figure is what the host spends issuing one call: argument checks, kernel lookup, CuPy's launch). A prefill step
issues ~9 such calls per layer eagerly.

    PYTHONPATH=. python3 tools/probes/launch_overhead_probe.py
"""
from __future__ import annotations

import time

import torch

from flashgen.ops import cuda_ops


def per_call(fn, n: int = 3000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    dev = torch.device("cuda")
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=dev).to(bf)

    T, H, D, hq, hkv, bs = 8, 1024, 128, 16, 8, 64
    x, r, w = rnd(T, H), rnd(T, H), rnd(H)
    gu = rnd(T, 2 * 3072)
    qkv = rnd(T, (hq + 2 * hkv) * D)
    kc, vc = rnd(4, bs, hkv, D), rnd(4, bs, hkv, D)
    cos_sin = torch.randn(4096, D, generator=g, device=dev)
    pos = torch.arange(T, device=dev)
    slots = torch.arange(T, device=dev, dtype=torch.int64)
    q = rnd(T, hq, D)
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
    ctx = torch.tensor([T], dtype=torch.int32, device=dev)
    bt = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32, device=dev)
    wq = rnd(3072, H)
    cases = {
        "rms_norm": lambda: cuda_ops.rms_norm(x, w, 1e-6),
        "rms_norm+residual": lambda: cuda_ops.rms_norm(x, w, 1e-6, r),
        "silu_mul": lambda: cuda_ops.silu_mul(gu),
        "rope_kv_append": lambda: cuda_ops.rope_kv_append(qkv, pos, cos_sin, slots, kc, vc),
        "prefill_attention": lambda: cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, T, D ** -0.5),
        "linear (torch, 8 x 1024 x 3072)": lambda: torch.nn.functional.linear(x, wq),
    }
    print(f"{'op':34s} host us per call")
    for name, fn in cases.items():
        print(f"{name:34s} {per_call(fn):8.1f}")


if __name__ == "__main__":
    main()
