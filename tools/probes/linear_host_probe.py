"""Host time of a prefill step's cuBLAS GEMMs, by how their row count varies from step to step.

A prefill step runs the model's four linear layers once per layer at one row count M (the step's new tokens), and
M differs from step to step. cuBLAS picks an algorithm per problem shape; whether that choice is remembered, and
what a call costs the host when it is not, decides how much host time a prefill step spends inside F.linear. Per
mode, `steps` groups of the step's GEMMs (Qwen3-0.6B's shapes by default, 28 layers x 4) are issued without a sync
inside a group; the host's microseconds a call (issue time only) and the GPU's milliseconds a group (CUDA events)
are printed, medians over the groups after warm-up:
  - fixed: every group at M = 11,700;
  - varying: each group at a new M drawn from 10,000-12,000 (as prefill steps are);
  - padded-K: the same M's rounded up to a multiple of K (64, 128, 256, 512): fewer distinct shapes, a little
    more work.

    PYTHONPATH=. python3 tools/probes/linear_host_probe.py [--hidden 1024 --inter 3072 --heads 16 --kv-heads 8
        --head-dim 128 --layers 28 --steps 40]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from flashgen.ops.timing import bench, fixed, rotating


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    H, D = a.hidden, a.head_dim
    shapes = [((a.heads + 2 * a.kv_heads) * D, H), (H, a.heads * D), (2 * a.inter, H), (H, a.inter)]
    weights = [[(torch.randn(s, generator=g, device=dev) * 0.02).to(bf) for s in shapes] for _ in range(a.layers)]
    mmax = 12_800
    xs = {k: torch.randn(mmax, k, generator=g, device=dev).to(bf) for k in {s[1] for s in shapes}}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, preferred BLAS "
          f"{torch.backends.cuda.preferred_blas_library()}")

    def group(m: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t0 = time.perf_counter()
        for layer in weights:
            for w in layer:
                F.linear(xs[w.shape[1]][:m], w)
        host = time.perf_counter() - t0
        e1.record()
        torch.cuda.synchronize()
        return host / (4 * a.layers) * 1e6, e0.elapsed_time(e1)

    rng = random.Random(0)
    ms = [rng.randrange(10_000, 12_001) for _ in range(a.steps)]
    modes = {"fixed": [11_700] * a.steps, "varying": ms}
    for k in (64, 128, 256, 512):
        modes[f"padded-{k}"] = [-(-m // k) * k for m in ms]
    group(11_700)  # warm-up: the workspace, the first algorithms
    print(f"{'mode':<12}{'distinct M':>11}{'host us/call':>14}{'p90':>8}{'GPU ms/group':>14}{'TFLOP/s':>9}")
    for name, mlist in modes.items():
        res = [group(m) for m in mlist]
        host = sorted(r[0] for r in res)
        gpu = statistics.median(r[1] for r in res)
        flop = 2 * statistics.median(mlist) * sum(n * k for n, k in shapes) * a.layers
        print(f"{name:<12}{len(set(mlist)):>11}{statistics.median(host):>14.1f}{host[int(0.9 * len(host))]:>8.1f}"
              f"{gpu:>14.2f}{flop / gpu / 1e9:>9.0f}")
    # the same varying M's a second time: a shape seen once before
    res = [group(m) for m in ms]
    print(f"{'varying 2nd':<12}{len(set(ms)):>11}{statistics.median(r[0] for r in res):>14.1f}")

    # Decode-sized M: the GPU time of a step's GEMMs (all layers, weights past L2 from layer to layer) against
    # reading the weights once at the copy bandwidth and against the bf16 matmul rate measured here.
    nbytes = sum(n * k for n, k in shapes) * 2 * a.layers
    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    big = torch.randn(8192, 8192, generator=g, device=dev).to(bf)

    copy = 2 * src.numel() / bench(fixed(dst.copy_, src), graph=False)
    mm = 2 * 8192 ** 3 / bench(fixed(torch.matmul, big, big), inner=2)
    print(f"copy {copy / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s; the step's weights {nbytes / 1e6:.0f} MB")
    print(f"{'M':>6}{'GEMMs ms':>10}{'floor ms':>10}{'of floor':>9}   per shape (N x K): us a call")
    for m in (64, 128, 256, 384, 512, 1024):
        # each layer's weight in turn (past L2 from one to the next), the calls captured in a CUDA graph as the
        # engine's decode steps run them: eager calls from Python would time their issue rate (~30 us a call)
        per = [1e6 * bench(rotating(F.linear, [(xs[k][:m], layer[j]) for layer in weights]), inner=a.layers)
               for j, (_, k) in enumerate(shapes)]
        tot = sum(per) * a.layers / 1e3
        floor = max(nbytes / copy, 2 * m * nbytes / 2 / mm) * 1e3
        print(f"{m:>6}{tot:>10.3f}{floor:>10.3f}{100 * floor / tot:>8.0f}%   "
              + "  ".join(f"{n}x{k}: {us:.1f}" for (n, k), us in zip(shapes, per, strict=True)))


if __name__ == "__main__":
    main()
