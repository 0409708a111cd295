"""Decode steps as captured CUDA graphs, one per batch-size bucket, and the dispatch between graph and eager.

A decode step of a small model is hundreds of short kernels; launching them from Python costs more than they
run. Each bucket's graph reads its inputs from static buffers that `run` fills; its logits (the lm_head GEMM's
output, model dtype) stay in the graph's memory pool, where every replay writes them again. Rows past the real
batch are padding: they write no KV (slot -1) and attend to one token.

Decode steps with shared-prefix groups (StepContext.shared) replay a second graph per bucket, captured the first
time a step of that bucket has groups: its static buffers hold up to bucket / 2 groups (a group has two or more
members), unused ones padded with empty prefixes. Batches without groups never pay for them. With `fine_groups`
(the PF_SHARED kernel's wide groups) a graph is captured per (batch bucket, group bucket), group buckets powers of
two up to bucket / 2, so a step with a few groups (hundreds of lines behind one system prompt) launches no
attention CTAs for a hundred empty ones.

Large buckets have a third kind of graph, for steps whose sequences all attend to few tokens (StepContext.longest
at most the backend's WARP_AUTO_MAX_CONTEXT past their shared blocks): captured with that bound, so that the
decode attention takes its warp plan (one warp per sequence and kv head); the plan a graph launches is fixed at
capture, so a step with a longer context replays the graph captured without it. Captured the first time such a
step comes, only for buckets of at least the backend's warp_min_batch rows, where the bound changes the plan.

At start-up the plain graphs of the buckets up to EAGER_MAX_BATCH and of the largest one are captured (the
largest first: its memory pool then holds every smaller graph's work space); the buckets between them are captured
the first time a step needs one. A job's batches visit few of the large buckets (a full batch, and the tail's
as lines finish), so with max_num_seqs 512 or 1,024 start-up does not capture 16 or 48 graphs that may never run
(start-up grew by 0.77 s at 512 and 1.5-2.2 s at 1,024 over 256 in the extract and synth jobs on an H100,
2026-12-07; how much of that was these captures was not measured apart), and no memory is held for their
logits. A capture during a job (a warm-up forward and the capture, on the step's own inputs) is counted in
late_captures.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from flashgen.engine.step_packing import SHARED_GROUP
from flashgen.models.decoder import DecoderLM, StepContext
from flashgen.ops.backend import SharedPrefix
from flashgen.ops.cuda_attention import WARP_AUTO_MAX_CONTEXT, warp_auto


def _groups(bs: int) -> int:
    """The most shared-prefix groups a decode batch of `bs` rows has: a group has two or more members."""
    return max(1, bs // 2)


def group_buckets(bs: int, fine: bool = True) -> list[int]:
    """The group counts grouped graphs of batch bucket `bs` are captured for: powers of two, then _groups(bs);
    only _groups(bs) unless `fine`."""
    top = _groups(bs)
    return sorted({1 << i for i in range(top.bit_length()) if fine and 1 << i < top} | {top})


def warp_batch(model: DecoderLM) -> int | None:
    """The least batch at which the model's decode attention takes the warp plan on short contexts (the CUDA
    backend's auto rule, cuda_attention.warp_min_batch); None where no bound changes the plan: another backend, a
    plan forced by $FLASHGEN_DECODE_PLAN, or a head_dim the warp plan is not compiled for."""
    ops, spec = model.ops, model.spec
    if not hasattr(ops, "warp_min_batch") or ops.decode_plan() != "auto":
        return None
    hq = model.tp.q_heads(spec)[1] if model.tp else spec.num_heads
    hkv = model.num_kv_heads_local
    sms = torch.cuda.get_device_properties(model.device).multi_processor_count
    return ops.warp_min_batch(hkv, hq // hkv, spec.head_dim, sms)


EAGER_MAX_BATCH = 256  # buckets up to this batch are captured at start-up (the module's docstring)


def buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 16))
    return sorted({b for b in sizes if b <= max_bs} | {max_bs})


class DecodeGraphs:
    def __init__(self, model: DecoderLM, max_bs: int, max_blocks_per_seq: int, group: int = SHARED_GROUP,
                 fine_groups: bool = False):
        dev = model.device
        i32 = torch.int32
        self.model = model
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=i32, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=i32, device=dev)
        self.context_lens = torch.ones(max_bs, dtype=i32, device=dev)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=i32, device=dev)
        ng = _groups(max_bs)
        self.fine_groups = fine_groups
        self.shared = SharedPrefix(q_rows=torch.full((ng, group), -1, dtype=i32, device=dev),
                                   lens=torch.zeros(ng, dtype=i32, device=dev),
                                   tables=torch.zeros(ng, max_blocks_per_seq, dtype=i32, device=dev),
                                   skip=torch.zeros(max_bs, dtype=i32, device=dev),
                                   suffix_lens=torch.ones(max_bs, dtype=i32, device=dev))
        # keyed by (batch bucket, group bucket, short): group bucket 0 is the plain graph, without groups; short:
        # captured for steps of short contexts (the module's docstring)
        self.logits: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.sizes = buckets(max_bs)
        self.warp_batch = warp_batch(model)
        self.pool: Any = None  # the graphs' shared memory pool, once the first is captured
        # graphs captured after start-up, the first time a step needs one (groups, short steps, the buckets
        # between EAGER_MAX_BATCH and the largest): how many, and their host seconds (inside that step's time)
        self.late_captures, self.late_capture_s, self._started = 0, 0.0, False
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            if bs <= EAGER_MAX_BATCH or bs == self.sizes[-1]:
                self._capture(bs, 0, False)
        torch.cuda.synchronize()
        self._started = True

    def _capture(self, bs: int, ng: int, short: bool) -> None:
        t0 = time.perf_counter()
        ctx = self._ctx(bs, ng, short)
        self._forward(bs, ctx)  # warm-up outside capture: compiles kernels, sets up cuBLAS handles
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, self.pool):
            self.logits[bs, ng, short] = self._forward(bs, ctx)
        self.pool = g.pool()
        self.graphs[bs, ng, short] = g
        if self._started:
            self.late_captures += 1
            self.late_capture_s += time.perf_counter() - t0

    def _ctx(self, bs: int, ng: int = 0, short: bool = False) -> StepContext:
        """The static buffers as the StepContext of batch bucket `bs` with `ng` shared-prefix groups (0: none),
        `short`: bounded by the backend's WARP_AUTO_MAX_CONTEXT (else by the tables' width)."""
        sp = None
        if ng:
            s = self.shared
            sp = SharedPrefix(s.q_rows[:ng], s.lens[:ng], s.tables[:ng], s.skip[:bs], s.suffix_lens[:bs])
        return StepContext(is_prefill=False, positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
                           context_lens=self.context_lens[:bs], block_tables=self.block_tables[:bs], shared=sp,
                           longest=WARP_AUTO_MAX_CONTEXT if short else None)

    def _forward(self, bs: int, ctx: StepContext) -> torch.Tensor:
        hidden, residual = self.model.forward(self.input_ids[:bs], ctx)
        return self.model.logits(hidden, residual)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Inputs of n sequences (already on the device) -> (n, vocab) logits (model dtype; valid until the
        next replay)."""
        n = input_ids.shape[0]
        bs = self.bucket(n)
        if bs is None:
            raise ValueError(f"decode batch of {n} is larger than the largest captured graph ({self.sizes[-1]})")
        self.input_ids[:n] = input_ids
        self.positions[:n] = ctx.positions
        self.slot_mapping[:n] = ctx.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.context_lens[:n] = ctx.context_lens
        self.context_lens[n:bs] = 1
        w = ctx.block_tables.shape[1]
        self.block_tables[:n, :w] = ctx.block_tables
        self.block_tables[n:bs, 0] = 0
        ngb = 0  # the group bucket
        if ctx.shared is not None:
            sp, ng = self.shared, ctx.shared.lens.shape[0]
            ngb = next(b for b in group_buckets(bs, self.fine_groups) if b >= ng)
            sp.q_rows[:ng] = ctx.shared.q_rows
            sp.q_rows[ng:ngb] = -1
            sp.lens[:ng] = ctx.shared.lens
            sp.lens[ng:ngb] = 0
            sp.tables[:ng, :w] = ctx.shared.tables
            sp.skip[:n] = ctx.shared.skip
            sp.skip[n:bs] = 0
            sp.suffix_lens[:n] = ctx.shared.suffix_lens
            sp.suffix_lens[n:bs] = 1
        short = ctx.longest is not None and warp_auto(bs, ctx.longest, self.warp_batch)
        if (bs, ngb, short) not in self.graphs:
            self._capture(bs, ngb, short)  # the first step of this kind (the buffers hold it)
        self.graphs[bs, ngb, short].replay()
        return self.logits[bs, ngb, short][:n]


def run_step(model: DecoderLM, graphs: DecodeGraphs | None, input_ids: torch.Tensor, ctx: StepContext,
             rows: torch.Tensor, on_hidden: Callable[[torch.Tensor, torch.Tensor], None] | None = None
             ) -> torch.Tensor | None:
    """Logits (model dtype) of the `rows` to sample, or None when there are none: a decode batch that fits a
    captured bucket replays its graph (all its rows), anything else runs eagerly. `on_hidden(hidden, residual)`
    (eager steps) sees every token's hidden state first (prompt logprobs)."""
    if not ctx.is_prefill and graphs is not None and graphs.bucket(input_ids.shape[0]) is not None:
        return graphs.run(input_ids, ctx)
    hidden, residual = model.forward(input_ids, ctx)
    if on_hidden is not None:
        on_hidden(hidden, residual)
    if rows.numel() == 0:
        return None
    return model.logits(hidden[rows], residual[rows])
