"""Which decode-attention plan wins where: the heuristic (auto) against the warp plan over query groups, head dims,
batch sizes and context-length mixes, to set the rule by which auto picks the warp plan.

Each case: Hkv 8 kv heads, Hq = 8 x group; bf16; 64-token pages scattered over the cache; the batch sorted longest
first as the engine sorts it; block tables either as wide as the longest context or as wide as a captured graph's
(32,768 tokens). Timed with CUDA events, median of 30 after warm-up, each plan on the same fresh random data;
bytes over the copy bandwidth measured in the same process.

    PYTHONPATH=. python3 tools/probes/decode_plan_probe.py [--quick]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from flashgen.ops import cuda_attention
from tools.probes.decode_extract_probe import copy_bandwidth, timed

HKV, BS, GRAPH_WIDTH = 8, 64, 512

MIXES = {  # name: (low, high) own tokens, uniform; equal bounds = every sequence that long
    "256": (256, 256),
    "50-350": (50, 350),
    "100-2000": (100, 2000),
    "2048": (2048, 2048),
    "500-8000": (500, 8000),
}


def case(group: int, d: int, B: int, lo: int, hi: int, wide: bool, bw: float) -> tuple[float, float, float]:
    """(auto us, warp us, auto's share of copy bandwidth) for one shape."""
    g = torch.Generator().manual_seed(B * 131 + group * 17 + d + lo)
    lens = torch.randint(lo, hi + 1, (B,), generator=g).sort(descending=True).values
    blocks = (-(-lens // BS)).tolist()
    nb = sum(blocks) + 4
    k = torch.randn((nb, BS, HKV, d), dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    W = GRAPH_WIDTH if wide else max(blocks)
    bt = torch.zeros((B, W), dtype=torch.int32)
    perm, nxt = torch.randperm(nb, generator=g).tolist(), 0
    for b in range(B):
        bt[b, :blocks[b]] = torch.tensor(perm[nxt:nxt + blocks[b]])
        nxt += blocks[b]
    bt, ctx = bt.cuda(), lens.to(torch.int32).cuda()
    q = torch.randn((B, HKV * group, d), dtype=torch.bfloat16, device="cuda")
    nbytes = float(lens.sum()) * HKV * d * 2 * 2
    t = {p: timed(lambda p=p: cuda_attention.decode_attention(q, k, v, ctx, bt, d ** -0.5, plan=p), 30)
         for p in ("auto", "warp")}
    return t["auto"] * 1e6, t["warp"] * 1e6, nbytes / t["auto"] / bw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="head_dim 128 and graph-wide tables only")
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}")
    print(f"{'group':>5}{'d':>5}{'B':>5}{'lens':>10}{'table':>7}{'auto us':>10}{'warp us':>10}{'warp/auto':>10}"
          f"{'auto % copy':>12}")
    dims = (128,) if a.quick else (64, 128)
    widths = (True,) if a.quick else (False, True)
    for group, d, B, mix, wide in itertools.product((1, 2, 4, 8), dims, (64, 128, 256), MIXES, widths):
        lo, hi = MIXES[mix]
        if B * hi > 600_000:  # keep the cache under ~2.5 GB at head_dim 128
            continue
        au, wu, frac = case(group, d, B, lo, hi, wide, bw)
        print(f"{group:>5}{d:>5}{B:>5}{mix:>10}{'graph' if wide else 'tight':>7}{au:>10.1f}{wu:>10.1f}"
              f"{wu / au:>10.2f}{100 * frac:>11.0f}%", flush=True)


if __name__ == "__main__":
    main()
