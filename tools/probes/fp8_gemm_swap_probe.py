"""cuBLASLt's FP8 GEMM (torch._scaled_mm) at decode batch sizes, as the engine calls it (xq (M, K) . weight^T,
row-wise scales) and swapped (weight . xq^T, then the (N, M) result transposed into (M, N)): with M of 16-512
rows the unswapped GEMM's tiles along M are mostly empty, and the swapped one puts the weight's N rows where
the tiles are wide. Times are medians of CUDA-graph replays over weight copies rotated past L2 (as a step's
layers read them), weight bytes per second next to the copy ceiling.

    PYTHONPATH=. python3 tools/probes/fp8_gemm_swap_probe.py [--rows 16,32,64,128,256,512]
"""
from __future__ import annotations

import argparse

import torch

from flashgen.ops import torch_ops
from flashgen.ops.cuda_linear import fp8_fast_accum
from flashgen.ops.timing import bench, rotating

SHAPES = {"qkv 6144x4096": (6144, 4096), "o 4096x4096": (4096, 4096), "gate_up 28672x4096": (28672, 4096),
          "down 4096x14336": (4096, 14336)}  # Llama-3.1-8B


def plain(xq, xs, w, ws):
    return torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16,
                            use_fast_accum=fp8_fast_accum())


def swapped(xq, xs, w, ws, out):
    y = torch._scaled_mm(w, xq.t(), scale_a=ws[:, None], scale_b=xs[None, :], out_dtype=torch.bfloat16,
                         use_fast_accum=fp8_fast_accum())
    out.copy_(y.t())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,32,64,128,256,512")
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / bench(lambda i: dst.copy_(src), reps=10, inner=4, graph=False)
    print(f"{torch.cuda.get_device_name()}: copy {copy / 1e12:.2f} TB/s; fast accumulation {fp8_fast_accum()}")
    print(f"{'shape':<22}{'rows':>6}{'plain us':>10}{'swapped us':>12}{'plain TB/s':>12}{'swapped TB/s':>14}"
          f"{'max diff':>10}")
    for name, (N, K) in SHAPES.items():
        copies = max(1, -(-(96 << 20) // (N * K)))
        ws = [torch_ops.quantize_fp8_rows(torch.randn((N, K), generator=g, device=dev) * 0.02)
              for _ in range(copies)]
        for M in (int(r) for r in a.rows.split(",")):
            xq, xs = torch_ops.quantize_fp8_rows(torch.randn((M, K), generator=g, device=dev))
            out = torch.empty((M, N), dtype=torch.bfloat16, device=dev)
            ref = plain(xq, xs, *ws[0]).float()
            diff = (swapped(xq, xs, *ws[0], out).float() - ref).abs().max().item() / ref.abs().max().item()
            calls = max(copies, 4)
            tp = bench(rotating(plain, [(xq, xs, w, s) for w, s in ws]), reps=9, inner=calls)
            ts = bench(rotating(swapped, [(xq, xs, w, s, out) for w, s in ws]), reps=9, inner=calls)
            print(f"{name:<22}{M:>6}{tp * 1e6:>10.1f}{ts * 1e6:>12.1f}{N * K / tp / 1e12:>12.2f}"
                  f"{N * K / ts / 1e12:>14.2f}{diff:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
