"""Decode attention on the extract job's decode step, launch by launch, against the bytes each launch must read.

The step (Qwen3-0.6B heads: 16 query, 8 kv, head_dim 128; 64-token pages; bf16): 256 sequences behind one shared
prefix of 960 tokens (15 whole pages: the job's 1,022-token instruction), each with its own 50-350 tokens past it
(the document, the template and the tokens generated so far). Timed with CUDA events, median of 50 after warm-up,
each case on fresh random data:
  - plain: every sequence over its whole context (the shared pages read once per sequence);
  - shared, both kernels for the shared part (FLASHGEN_SHARED_KERNEL=decode|prefill): groups of up to 8 or 32
    members as the engine forms them, then the own parts merged in; again with the own parts on the warp plan, and
    with the two parts side by side on two streams (FLASHGEN_SHARED_OVERLAP=1, then merge_states);
  - own parts alone (no shared part, no merge), with the plan and splits of the heuristic and forced, and on the
    warp plan (one warp per sequence and kv head);
  - the shared part alone on the PF_SHARED kernel;
  - the PF_SHARED case again with block tables as wide as a captured graph's (its key splits follow the width),
    sequential and side by side.
Each next to its bytes over the copy bandwidth measured in the same process.

    PYTHONPATH=. python3 tools/probes/decode_extract_probe.py [--seqs 256] [--shared 960] [--own 50 350]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from flashgen.engine.step_packing import SHARED_GROUP, SHARED_GROUP_WIDE  # noqa: E402
from flashgen.ops import cuda_attention  # noqa: E402
from flashgen.ops.backend import SharedPrefix  # noqa: E402
from test_shared_prefix import shared_batch  # noqa: E402 - the tests' batch: groups cut as the engine cuts them

HQ, HKV, D, BS = 16, 8, 128, 64


def timed(fn, reps: int = 50) -> float:
    """Median seconds of fn() over `reps` launches after 5 warm-up ones (CUDA events)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x), 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--shared", type=int, default=960, help="shared prefix tokens (a multiple of 64)")
    ap.add_argument("--own", type=int, nargs=2, default=(50, 350), help="own tokens per sequence, uniform range")
    a = ap.parse_args()
    torch.manual_seed(0)
    B, sb = a.seqs, a.shared // BS
    own = torch.randint(a.own[0], a.own[1] + 1, (B,))
    own = own.sort(descending=True).values  # the engine sorts decode batches longest first

    def batch(group: int):
        """The cache, context lengths, block tables and groups of up to `group` members: the same cache and
        tables for every group size (the same seed)."""
        g = torch.Generator().manual_seed(1)
        return shared_batch([(sb, own.tolist())], [], BS, HKV, D, torch.bfloat16, g, "cuda", pad_groups=0,
                            group=group)

    k, v, ctx, bt, sp8 = batch(SHARED_GROUP)
    W = bt.shape[1]
    q = torch.randn((B, HQ, D), dtype=torch.bfloat16, device="cuda")
    scale = D ** -0.5
    tok_bytes = HKV * D * 2 * 2
    bw = copy_bandwidth()
    own_bytes = float(own.sum()) * tok_bytes
    print(f"{B} sequences, shared {sb * BS} tokens, own {a.own[0]}-{a.own[1]} (mean {own.float().mean():.0f}); "
          f"copy {bw / 1e12:.2f} TB/s")
    print(f"{'case':<52}{'us':>9}{'MB read':>10}{'of copy':>9}")

    def row(name: str, sec: float, nbytes: float) -> None:
        print(f"{name:<52}{sec * 1e6:>9.1f}{nbytes / 1e6:>10.1f}{100 * nbytes / sec / bw:>8.0f}%")

    row("plain (shared pages read per sequence)",
        timed(lambda: cuda_attention.decode_attention(q, k, v, ctx, bt, scale)), float(ctx.sum().item()) * tok_bytes)
    row("plain, plan warp",
        timed(lambda: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, plan="warp")),
        float(ctx.sum().item()) * tok_bytes)
    sps = {SHARED_GROUP: sp8, SHARED_GROUP_WIDE: batch(SHARED_GROUP_WIDE)[4]}
    for kern, group in (("decode", SHARED_GROUP), ("prefill", SHARED_GROUP_WIDE)):
        os.environ["FLASHGEN_SHARED_KERNEL"] = kern
        sp = sps[group]
        ng = sp.q_rows.shape[0]
        sec = timed(lambda sp=sp: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, shared=sp))
        row(f"shared, {kern} kernel, {ng} groups of <= {group}", sec, own_bytes + sb * BS * tok_bytes)
        sec = timed(lambda sp=sp: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, shared=sp, plan="warp"))
        row("  the same, own parts on plan warp", sec, own_bytes + sb * BS * tok_bytes)
        os.environ["FLASHGEN_SHARED_OVERLAP"] = "1"  # the shared part on a second stream, then merge_states
        sec = timed(lambda sp=sp: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, shared=sp, plan="warp"))
        row("  the same, the two parts side by side", sec, own_bytes + sb * BS * tok_bytes)
        os.environ.pop("FLASHGEN_SHARED_OVERLAP")
    # a captured decode graph's tables are max_blocks_per_seq wide (640 at a 40,960-token context, 64-token pages):
    # the PF_SHARED kernel's key splits follow the width, not the prefix
    wide = F.pad(bt, (0, 640 - W))
    sp = sps[SHARED_GROUP_WIDE]
    sp = SharedPrefix(sp.q_rows, sp.lens, F.pad(sp.tables, (0, 640 - W)), sp.skip, sp.suffix_lens)
    os.environ["FLASHGEN_SHARED_KERNEL"] = "prefill"
    row(f"shared, prefill kernel, tables 640 wide ({cuda_attention.shared_splits(640 * BS, D)} key splits)",
        timed(lambda: cuda_attention.decode_attention(q, k, v, ctx, wide, scale, shared=sp)),
        own_bytes + sb * BS * tok_bytes)
    os.environ["FLASHGEN_SHARED_OVERLAP"] = "1"
    row("  the same, the two parts side by side",
        timed(lambda: cuda_attention.decode_attention(q, k, v, ctx, wide, scale, shared=sp)),
        own_bytes + sb * BS * tok_bytes)
    os.environ.pop("FLASHGEN_SHARED_OVERLAP")
    os.environ.pop("FLASHGEN_SHARED_KERNEL", None)
    bt_own = bt[:, sb:].contiguous()
    own_ctx = (ctx - sb * BS).contiguous()
    row("own parts alone, heuristic",
        timed(lambda: cuda_attention.decode_attention(q, k, v, own_ctx, bt_own, scale)), own_bytes)
    row("own parts alone, plan warp",
        timed(lambda: cuda_attention.decode_attention(q, k, v, own_ctx, bt_own, scale, plan="warp")), own_bytes)
    for plan in ("split", "balanced"):
        for splits in (1, 2, 4):
            row(f"own parts alone, plan {plan}, {splits} splits",
                timed(lambda p=plan, s=splits: cuda_attention.decode_attention(q, k, v, own_ctx, bt_own, scale,
                                                                                num_splits=s, plan=p)), own_bytes)
    sp = sps[SHARED_GROUP_WIDE]
    splits = cuda_attention.shared_splits(sp.tables.shape[1] * BS, D)
    o_sh = torch.empty((splits, B, HQ, D), dtype=torch.float32, device="cuda")
    lse_sh = torch.full((splits, B, HQ), float("-inf"), dtype=torch.float32, device="cuda")
    row(f"shared part alone, PF_SHARED ({splits} key splits)",
        timed(lambda: cuda_attention._shared_prefill_launch(q, k, v, sp, BS, HKV, scale, o_sh, lse_sh)),
        sb * BS * tok_bytes)


if __name__ == "__main__":
    main()
