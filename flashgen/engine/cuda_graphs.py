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

A graph reads its step from one fixed device buffer: the packed step (step_packing's int32 layout) is copied there
and the graph's first node, kernels/step_inputs.cu, writes the static buffers from it (the ids through the token
slots), reading the step's sizes from its header on the device. So a decode step costs the engine's thread one copy
and one replay, not ~20 tensor ops (docs/design.md, "CUDA graphs").
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from flashgen.engine.step_packing import HEADER, SHARED_GROUP, STEP_DTYPE
from flashgen.models.decoder import DecoderLM, StepContext
from flashgen.ops import jit
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


def packed_capacity(max_bs: int, max_blocks_per_seq: int, group: int) -> int:
    """The most int32 values a packed decode step of at most `max_bs` rows takes (step_packing's layout: header,
    ids, positions, slots, context lengths, cu_seqlens, tables, logits rows, then the groups' fields)."""
    ng = _groups(max_bs)
    return (HEADER + 3 * max_bs + 2 * max_bs + 1 + max_bs * max_blocks_per_seq + max_bs
            + ng * group + ng + ng * max_blocks_per_seq + 2 * max_bs)


class DecodeGraphs:
    def __init__(self, model: DecoderLM, max_bs: int, max_blocks_per_seq: int, group: int = SHARED_GROUP,
                 fine_groups: bool = False, slot_tokens: torch.Tensor | None = None):
        """`slot_tokens`: the token slots a packed step's id column indexes (pipelined decode), None when the
        column holds the token ids themselves."""
        dev = model.device
        i32 = torch.int32
        self.model = model
        self.group = group
        self.slot_tokens = slot_tokens
        # the packed step a graph reads (its first node, kernels/step_inputs.cu): zeros are a step of no rows
        self.packed = torch.zeros(packed_capacity(max_bs, max_blocks_per_seq, group), dtype=STEP_DTYPE, device=dev)
        self._inputs_kernel = jit.get_kernel("step_inputs.cu", "decode_graph_inputs_kernel", torch.bfloat16, 0,
                                             dev.index if dev.index is not None else torch.cuda.current_device())
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
        self._inputs(bs, ng)
        self._forward(bs, ctx)  # warm-up outside capture: compiles kernels, sets up cuBLAS handles
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, self.pool):
            self._inputs(bs, ng)
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

    def _inputs(self, bs: int, ng: int) -> None:
        """The static buffers of batch bucket `bs` and group bucket `ng` from the packed step (the graph's first
        node): kernels/step_inputs.cu."""
        sp = self.shared
        jit.launch(self._inputs_kernel, (bs + ng,), (128,), (
            jit.ptr(self.packed), jit.i32(bs), jit.i32(ng), jit.ptr(self.slot_tokens), jit.ptr(self.input_ids),
            jit.ptr(self.positions), jit.ptr(self.slot_mapping), jit.ptr(self.context_lens),
            jit.ptr(self.block_tables), jit.i32(self.block_tables.shape[1]), jit.ptr(sp.q_rows),
            jit.i32(self.group), jit.ptr(sp.lens), jit.ptr(sp.tables), jit.ptr(sp.skip), jit.ptr(sp.suffix_lens)),
            self.model.device)

    def _forward(self, bs: int, ctx: StepContext) -> torch.Tensor:
        hidden, residual = self.model.forward(self.input_ids[:bs], ctx)
        return self.model.logits(hidden, residual)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(self, buf: torch.Tensor) -> torch.Tensor | None:
        """A packed step (step_packing.pack_step: a host tensor, or a device one as tensor parallelism's ranks
        receive it) -> (n, vocab) logits (model dtype; valid until the next replay) when it is a decode step that
        fits a bucket; None otherwise (the caller runs it eagerly)."""
        head = (buf[:HEADER] if buf.is_cuda else buf.numpy()[:HEADER]).tolist()
        is_prefill, n, ng, longest = head[0], head[2], head[6], head[8]
        bs = None if is_prefill else self.bucket(n)
        if bs is None:
            return None
        if ng and head[7] != self.group:
            raise ValueError(f"a packed step's shared-prefix groups have {head[7]} members; the graphs were "
                             f"captured for {self.group}")
        self.packed[:buf.shape[0]].copy_(buf, non_blocking=True)
        ngb = next(b for b in group_buckets(bs, self.fine_groups) if b >= ng) if ng else 0  # the group bucket
        short = warp_auto(bs, longest, self.warp_batch)
        if (bs, ngb, short) not in self.graphs:
            self._capture(bs, ngb, short)  # the first step of this kind (the packed buffer holds it)
        self.graphs[bs, ngb, short].replay()
        return self.logits[bs, ngb, short][:n]


def run_step(model: DecoderLM, input_ids: torch.Tensor, ctx: StepContext, rows: torch.Tensor,
             on_hidden: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """An eager step: logits (model dtype) of the `rows` to sample, or None when there are none.
    `on_hidden(hidden, residual)` sees every token's hidden state first (prompt logprobs)."""
    hidden, residual = model.forward(input_ids, ctx)
    if on_hidden is not None:
        on_hidden(hidden, residual)
    if rows.numel() == 0:
        return None
    return model.logits(hidden[rows], residual[rows])
