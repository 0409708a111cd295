"""Decode attention over an FP8 (e4m3) cache on engine-like shapes (GQA 16/8 at the Qwen3-0.6B shape with 256
sequences, 32/8 at the Llama shapes), block 16, random page order, as the cache's bytes per second: run it in two
trees (a kernel change and its base) in one call to compare them, each tree's kernels compiled from its own
sources.

    (cd TREE && PYTHONPATH=. python3 PATH/TO/fp8_decode_probe.py LABEL)
"""
from __future__ import annotations

import sys

import torch

from flashgen.ops import cuda_ops
from flashgen.ops.timing import bench, fixed

SHAPES = [(256, 608, 16, 8), (256, 1504, 16, 8), (64, 4096, 32, 8), (128, 2000, 32, 8)]  # (B, context, Hq, Hkv)


def main(label: str) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    d, bs = 128, 16
    for B, L, hq, hkv in SHAPES:
        nb = B * L // bs
        q = torch.randn(B, hq, d, generator=g, device=dev).to(torch.bfloat16)
        kc = (torch.randn(nb, bs, hkv, d, generator=g, device=dev) * 64).to(torch.float8_e4m3fn)
        vc = (torch.randn(nb, bs, hkv, d, generator=g, device=dev) * 64).to(torch.float8_e4m3fn)
        bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, L // bs)
        ctx = torch.full((B,), L, dtype=torch.int32, device=dev)
        t = bench(fixed(cuda_ops.decode_attention, q, kc, vc, ctx, bt, d ** -0.5, 1 / 64, 1 / 64), reps=30)
        print(f"{label} B{B} L{L} hq{hq}/{hkv}: {2 * B * L * hkv * d / t / 1e12:.2f} TB/s ({t * 1e6:.0f} us)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
