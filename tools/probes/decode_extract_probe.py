"""Decode attention on the extract job's decode step, launch by launch, against the bytes each launch must read.

The step (Qwen3-0.6B heads: 16 query, 8 kv, head_dim 128; 64-token pages; bf16): 256 sequences behind one shared
prefix of 960 tokens (15 whole pages: the job's 1,022-token instruction), each with its own 50-350 tokens past it
(the document, the template and the tokens generated so far). Timed with CUDA events, median of 50 after warm-up,
each case on fresh random data:
  - plain: every sequence over its whole context (the shared pages read once per sequence);
  - shared, both kernels for the shared part (FLASHGEN_SHARED_KERNEL=decode|prefill): groups of up to 8 or 32
    members as the engine forms them, then the own parts merged in;
  - own parts alone (no shared part, no merge), with the plan and splits of the heuristic and forced, and on the
    warp plan (one warp per sequence and kv head);
  - the shared part alone on the PF_SHARED kernel;
  - the PF_SHARED case again with block tables as wide as a captured graph's (its key splits follow the width).
Each next to its bytes over the copy bandwidth measured in the same process.

    PYTHONPATH=. python3 tools/probes/decode_extract_probe.py [--seqs 256] [--shared 960] [--own 50 350]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from flashgen.engine.step_packing import SHARED_GROUP, SHARED_GROUP_WIDE
from flashgen.ops import cuda_attention
from flashgen.ops.backend import SharedPrefix

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


def shared_prefix(B: int, shared_blocks: int, group: int, ctx: torch.Tensor, table0: torch.Tensor) -> SharedPrefix:
    """Groups of nearly equal size, at most `group` members, over all B sequences (every one shares the prefix)."""
    n = -(-B // group)
    q_rows = torch.full((n, group), -1, dtype=torch.int32)
    for j in range(n):
        members = torch.arange(j * B // n, (j + 1) * B // n, dtype=torch.int32)
        q_rows[j, :len(members)] = members
    W = table0.numel()
    tables = torch.zeros((n, W), dtype=torch.int32)
    tables[:, :shared_blocks] = table0[:shared_blocks]
    skip = torch.full((B,), shared_blocks, dtype=torch.int32)
    dev = ctx.device
    return SharedPrefix(q_rows.to(dev), torch.full((n,), shared_blocks * BS, dtype=torch.int32, device=dev),
                        tables.to(dev), skip.to(dev), ctx - shared_blocks * BS)


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
    ctx = (own + sb * BS).to(torch.int32)
    own_blocks = (-(-own // BS)).tolist()
    total_blocks = sb + sum(own_blocks) + 8
    k = torch.randn((total_blocks, BS, HKV, D), dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    W = sb + max(own_blocks)
    bt = torch.zeros((B, W), dtype=torch.int32)
    perm = (torch.randperm(total_blocks - sb) + sb).tolist()  # own pages scattered, as a cache in use
    nxt = 0
    for b in range(B):
        bt[b, :sb] = torch.arange(sb)
        bt[b, sb:sb + own_blocks[b]] = torch.tensor(perm[nxt:nxt + own_blocks[b]])
        nxt += own_blocks[b]
    bt, ctx = bt.cuda(), ctx.cuda()
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
    for kern, group in (("decode", SHARED_GROUP), ("prefill", SHARED_GROUP_WIDE)):
        os.environ["FLASHGEN_SHARED_KERNEL"] = kern
        sp = shared_prefix(B, sb, group, ctx, bt[0].cpu())
        ng = sp.q_rows.shape[0]
        sec = timed(lambda sp=sp: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, shared=sp))
        row(f"shared, {kern} kernel, {ng} groups of <= {group}", sec, own_bytes + sb * BS * tok_bytes)
        sec = timed(lambda sp=sp: cuda_attention.decode_attention(q, k, v, ctx, bt, scale, shared=sp, plan="warp"))
        row("  the same, own parts on plan warp", sec, own_bytes + sb * BS * tok_bytes)
    # a captured decode graph's tables are max_blocks_per_seq wide (640 at a 40,960-token context, 64-token pages):
    # the PF_SHARED kernel's key splits follow the width, not the prefix
    wide = torch.zeros((B, 640), dtype=torch.int32, device="cuda")
    wide[:, :W] = bt
    sp = shared_prefix(B, sb, SHARED_GROUP_WIDE, ctx, wide[0].cpu())
    os.environ["FLASHGEN_SHARED_KERNEL"] = "prefill"
    row(f"shared, prefill kernel, tables 640 wide ({cuda_attention.shared_splits(640 * BS, D)} key splits)",
        timed(lambda: cuda_attention.decode_attention(q, k, v, ctx, wide, scale, shared=sp)),
        own_bytes + sb * BS * tok_bytes)
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
    sp = shared_prefix(B, sb, SHARED_GROUP_WIDE, ctx, bt[0].cpu())
    splits = cuda_attention.shared_splits(sp.tables.shape[1] * BS, D)
    o_sh = torch.empty((splits, B, HQ, D), dtype=torch.float32, device="cuda")
    lse_sh = torch.full((splits, B, HQ), float("-inf"), dtype=torch.float32, device="cuda")
    row(f"shared part alone, PF_SHARED ({splits} key splits)",
        timed(lambda: cuda_attention._shared_prefill_launch(q, k, v, sp, BS, HKV, scale, o_sh, lse_sh)),
        sb * BS * tok_bytes)


if __name__ == "__main__":
    main()
