"""Continuous batching: prefill batches packed under a token budget, decode batches up to max_num_seqs,
preemption by recompute when KV blocks run out.

A prompt longer than the remaining budget is prefilled in chunks; the partly prefilled sequence stays at the
head of `waiting` with its blocks until its last chunk is done. Preempted sequences free their blocks and go
back to `waiting`, to be recomputed (prompt + what they generated so far) when blocks free up.
"""
from __future__ import annotations

from collections import deque

from flashgen.config import EngineConfig
from flashgen.engine.block_manager import BlockManager
from flashgen.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.on_preempt = lambda seq: None  # the runner frees the sequence's device-side token slot

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                if len(self.running) >= self.max_num_seqs or not bm.can_allocate(seq):
                    break
                bm.allocate(seq)
                seq.num_computed_tokens = seq.num_cached_tokens
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.num_scheduled_tokens = n
            budget -= n
            batch.append(seq)
            if seq.num_computed_tokens + n < seq.num_tokens:
                break  # a chunk: the sequence stays at the head of `waiting`
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        if batch:
            return batch, True

        held: list[Sequence] = []  # at max_tokens / context with a token still on the GPU: nothing to compute
        while self.running and len(batch) < self.max_num_seqs:
            seq = self.running.popleft()
            if seq.at_limit(self.max_model_len):
                held.append(seq)
                continue
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.may_append(seq)
                seq.num_scheduled_tokens = 1
                batch.append(seq)
        self.running.extendleft(reversed(batch + held))
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.on_preempt(seq)
        seq.status = Status.WAITING
        self.block_manager.free(seq)
        # NOTE: a partly prefilled head of `waiting` owns blocks and must finish first, or it could starve us.
        pos = 1 if self.waiting and self.waiting[0].block_table else 0
        self.waiting.insert(pos, seq)

    def complete_prefill_chunk(self, seq: Sequence) -> bool:
        """Account a prefill chunk; True when the sequence's whole context is now cached."""
        seq.num_computed_tokens += seq.num_scheduled_tokens
        return seq.num_computed_tokens == seq.num_tokens

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.block_manager.free(seq)
        self.running.remove(seq)
