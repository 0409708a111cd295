"""Continuous batching: prefill batches packed under a token budget, decode batches up to max_num_seqs,
preemption by recompute when KV blocks run out.

A prompt longer than the remaining budget is prefilled in chunks; the partly prefilled sequence stays at the
head of `waiting` with its blocks until its last chunk is done. Preempted sequences free their blocks and go
back to `waiting`, to be recomputed (prompt + what they generated so far) when blocks free up.

Admission looks ahead: a prompt is admitted only if the free blocks still cover, after its prompt, the growth the
running sequences and it are expected to need (blocks up to max_tokens or the context, times `reserve_ratio`).
Admitting by prompt blocks alone filled the cache with more sequences than it can finish and then preempted
them over and over (8B shape, 1000/1000, max_num_seqs 1024: 400 preemptions, 10% slower than 256). The ratio is
what finished sequences actually used of their limit (a moving average from 1: exact for ignore_eos jobs, lower
where EOS comes early), and a preemption raises it again; preemption stays the safety net.

Beside running sequences, admission is held back until a quarter of the sequence slots are free (`admit_min_free`,
N; $FLASHGEN_ADMIT_MIN_FREE overrides, 0 admits as soon as one is), or as many as there are prompts waiting, or
until the free slots have waited HOLD_STEPS * N slot-steps since the last admission. It is not held while the batch
is filling: when the last prefill step was full (its token budget spent), the next one admits at once, so long
prompts that fill a step each (summarize) or a wave of lines that finished together start as before. Nor where the
KV cache, not the slots, limits admission (it could not take N prompts like the head of `waiting` beside what the
running sequences will grow by): there waiting for slots would only leave freed blocks idle.

Why: a job whose lines stop at different places (EOS) frees a few slots nearly every step, and admitting into each
made a small prefill step per decode step, each launched op by op: ~15 ms for ~1,600 tokens of a 0.6B model on an
H100, where their FLOPs need ~3 ms (a scheduler-only count on the extract job's shape: 523 prefill steps beside 588
decode steps; tools/probes/admission_steps_probe.py). Measured on the extract job with 8-64 tokens per line
(`flashgen bench jobs --lengths spread`, BENCHMARKS.md): 13.0 and 14.3 s admitting at once, 10.3 s at N = 16, 10.0
and 10.0 s at 32, 9.35 s at 64. An idle slot costs a decode step 1 / max_num_seqs of its work, a small prefill step
several decode steps' time, so waiting is cheap; the slot-step bound keeps a job whose lines finish rarely from
leaving slots empty for long.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from flashgen.config import EngineConfig
from flashgen.engine.block_manager import BlockManager
from flashgen.engine.sequence import Sequence, Status


@dataclass
class Batch:
    """One step's work: prefill chunks or one decode token per sequence (seq.num_scheduled_tokens each)."""
    seqs: list[Sequence]
    is_prefill: bool
    cached_tokens: int = 0  # prompt tokens served by the prefix cache to the sequences starting here

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.seqs)


class StepTokens(Protocol):
    """A launched step's sampled tokens (see token_slots.SampledTokens)."""

    def read(self) -> list[tuple[Sequence, int, int, list[float] | None]]: ...


HOLD_STEPS = 8  # free slots admit anyway once they have waited this many steps times admit_min_free, in slot-steps


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.reserve_ratio = 1.0  # expected share of a sequence's remaining limit it will use (see the docstring)
        self.on_preempt = lambda seq: None  # the runner frees the sequence's device-side token slot
        self.on_copy = lambda pairs: None   # the runner copies KV blocks (src, dst) for forked samples
        # free slots before prompts are admitted beside running ones, and the slot-steps they have waited
        self.admit_min_free = admit_min_free(self.max_num_seqs)
        self.held_slot_steps = 0
        self.filling = False  # the last prefill step spent its whole token budget: the next admits at once
        # running sequences held at their limit by the last decode schedule, their last token unread (schedule)
        self.held: set[int] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        """The next step's batch: waiting prompts first (prefill), else one token for each running sequence. A
        running sequence held at its limit (max_tokens or the context, its last token still on the GPU) ends when
        that token is read, whatever it is: its place counts as free for waiting prompts (`held`), so when a wave
        of a fixed-length job ends, the next prefill is scheduled before the wave's last tokens are read."""
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> Batch | None:
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        reserve: float | None = None  # blocks the running sequences are expected to grow by
        while self.waiting and budget > 0 and (batch or self._admit_now()):
            seq = self.waiting[0]
            if not seq.block_table:
                if self.running and reserve is None:
                    reserve = self._running_reserve()
                grow = self._admission(seq, reserve)
                if grow is None:
                    break
                if reserve is not None:
                    reserve += grow
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
            self.held_slot_steps = 0
            self.filling = budget <= 0
            return Batch(batch, True)
        return None

    def _schedule_decode(self) -> Batch | None:
        batch: list[Sequence] = []
        bm = self.block_manager
        held: list[Sequence] = []  # at max_tokens / context with a token still on the GPU: nothing to compute
        bs = bm.block_size
        while self.running and len(batch) < self.max_num_seqs:
            seq = self.running.popleft()
            # max_tokens or the context is reached (placeholders count): no further token may be scheduled
            if len(seq.token_ids) >= (seq.end_len if seq.end_len is not None else seq.end_length(self.max_model_len)):
                held.append(seq)
                continue
            # most steps: the token neither opens a block (BlockManager.can_append / may_append: len % bs == 1)
            # nor fills one (register_full_block below: len % bs == 0), so the block manager has nothing to do
            if len(seq.token_ids) % bs > 1:
                seq.num_scheduled_tokens = 1
                batch.append(seq)
                continue
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.may_append(seq)
                if len(seq) % bm.block_size == 0 and seq.last_token_known:
                    # this step writes the K/V of the last token of a full block: from now on a prompt may hit
                    # it (a token still on the GPU registers its block when read: see postprocess)
                    bm.register_full_block(seq, len(seq) // bm.block_size - 1)
                seq.num_scheduled_tokens = 1
                batch.append(seq)
        self.running.extendleft(reversed(batch + held))
        self.held = {seq.seq_id for seq in held}
        if self.waiting:  # slots left free this step while prompts wait (held back, or no room in the cache)
            self.held_slot_steps += self.max_num_seqs - self._busy()
        if batch:
            return Batch(batch, False)
        return self._schedule_prefill() if held and self.waiting else None

    def _busy(self) -> int:
        """Sequence places taken: the running sequences less those held at their limit (schedule's docstring)."""
        return len(self.running) - len(self.held)

    def _end(self, seq: Sequence) -> int:
        """The length `seq` may reach (Sequence.end_length)."""
        return seq.end_length(self.max_model_len)

    def _end_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` holds at the length it may reach (_end), kept on the sequence: its prompt, max_tokens and
        the context never change."""
        if seq.end_blocks is None:
            seq.end_blocks = -(-self._end(seq) // self.block_manager.block_size)
        return seq.end_blocks

    def _growth(self, seq: Sequence) -> int:
        """Blocks `seq` still needs to reach its limit (max_tokens, or the context)."""
        return max(0, self._end_blocks(seq) - seq.num_blocks)

    def can_run_ahead(self) -> bool:
        """Whether the next batch can be scheduled before the last decode step's tokens are read. A prefill batch
        (schedule() would admit the head of `waiting`) always can: it computes waiting prompts and needs nothing
        from the running sequences' unread tokens, which the engine then reads while the GPU runs the prefill. A
        decode batch can when every running sequence has a free block (no preemption) and none has penalties
        (they count the latest token). A sequence that turns out to have finished at the unread token holds its
        place (and its blocks) until the tokens are read, so a prompt waiting for that place is admitted a step
        later; in exchange the host's work on a step's tokens is never on the GPU's critical path, whether the
        next step decodes or prefills (a job with more lines than max_num_seqs admits a few every few steps)."""
        if self._would_admit():
            return True
        return (self.block_manager.num_free_blocks >= len(self.running)
                and not any(seq.params.has_penalties for seq in self.running))

    def _would_admit(self) -> bool:
        """schedule() would start a prefill batch now: a partly prefilled head of `waiting`, or room for it
        (_admission)."""
        if not self.waiting:
            return False
        seq = self.waiting[0]
        if seq.block_table:
            return True
        return self._admit_now() and self._admission(seq, self._running_reserve() if self.running else None) is not None

    def _admit_now(self) -> bool:
        """Whether waiting prompts may start this step: always with nothing running, with a partly prefilled head of
        `waiting`, or while the batch is filling (the last prefill step was full); else once admit_min_free slots
        are free, or as many as there are prompts waiting (the job's tail), or once free slots have waited
        HOLD_STEPS * admit_min_free slot-steps (lines that finish rarely), or when the cache, not the slots, is what
        limits admission (it could not take admit_min_free prompts like the head)."""
        n = self.admit_min_free
        head = self.waiting[0]
        if not self._busy() or n <= 1 or self.filling or head.block_table:
            return True
        free = self.max_num_seqs - self._busy()
        if free >= min(n, len(self.waiting)) or (free > 0 and self.held_slot_steps >= HOLD_STEPS * n):
            return True
        # held only where slots bind: when the cache could not take n prompts like the head anyway (a KV-bound
        # batch of long sequences), waiting for slots would leave its freed blocks idle instead
        need = n * (head.num_blocks + self.reserve_ratio * self._growth(head))
        return self.block_manager.num_free_blocks - self._running_reserve() < need

    def _running_reserve(self) -> float:
        """Blocks the running sequences are expected to grow by (their growth times the reserve ratio): _growth
        summed, inlined. It runs on most steps of a job with lines waiting (can_run_ahead, schedule), over every
        running sequence: 98 us at 256 sequences through _growth and _end on a 2-core CPU, 17 us inlined."""
        bs = self.block_manager.block_size
        total = 0
        for seq in self.running:
            end = seq.end_blocks if seq.end_blocks is not None else self._end_blocks(seq)
            grow = end - (len(seq.token_ids) + bs - 1) // bs
            if grow > 0:
                total += grow
        return self.reserve_ratio * total

    def _admission(self, seq: Sequence, reserve: float | None) -> float | None:
        """The look-ahead admission of `seq`, waiting without blocks: None when it cannot start now (no sequence
        slot, too few free blocks for its prompt, or, with sequences running (`reserve`: their expected growth),
        too few left after its prompt for that growth and its own); else its own expected growth, in blocks. An
        empty running set always admits a prompt that fits: progress first."""
        bm = self.block_manager
        if self._busy() >= self.max_num_seqs or not bm.can_allocate(seq):
            return None
        grow = self.reserve_ratio * self._growth(seq) * (1 + len(seq.followers))
        if reserve is not None and bm.num_free_blocks - seq.num_blocks < reserve + grow:
            return None
        return grow

    def commit(self, batch: Batch) -> None:
        """Account a launched batch: its tokens' K/V are (being) computed."""
        for seq in batch.seqs:
            if batch.is_prefill and seq.num_computed_tokens == seq.num_cached_tokens:
                batch.cached_tokens += seq.num_cached_tokens
            seq.num_computed_tokens += seq.num_scheduled_tokens
            if seq.followers and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._fork(seq)

    def _fork(self, leader: Sequence) -> None:
        """The leader's prompt is computed (its last chunk is launched): its other samples share its blocks, the
        last one copied (each sample writes its own next tokens there), and wait at the head of `waiting` to
        compute only their last prompt token (its logits start their generation). Without a free block for the
        copy a sample takes the ordinary path (prefix-cache hits on the leader's full blocks)."""
        copies: list[tuple[int, int]] = []
        followers, leader.followers = leader.followers, []
        for f in followers:
            if self.block_manager.fork(leader, f, copies):
                f.num_cached_tokens = f.num_computed_tokens = f.num_tokens - 1
        if copies:
            self.on_copy(copies)
        self.waiting.extendleft(reversed(followers))

    def postprocess(self, tokens: StepTokens,
                    launched: Batch | None) -> list[tuple[Sequence, int, int, list[float] | None]]:
        """Read a step's tokens into their sequences; (sequence, position, token, packed logprobs) for the
        unfinished ones, token -1 (not stored) where the logit was not finite. `launched`: the batch already
        queued after that step, whose K/V writes make a block completed by a read token safe to share."""
        bs = self.block_manager.block_size
        after = {s.seq_id for s in launched.seqs} if launched is not None else set()
        read = []
        for seq, idx, token, lp in tokens.read():
            if seq.status is Status.FINISHED:  # ended by the step before; this token was computed speculatively
                continue
            if token >= 0:
                seq.set_token(idx, token)
                if (idx + 1) % bs == 0 and seq.seq_id in after:
                    self.block_manager.register_full_block(seq, idx // bs)
            read.append((seq, idx, token, lp))
        return read

    def _preempt(self, seq: Sequence) -> None:
        self.held.discard(seq.seq_id)
        self.num_preemptions += 1
        self.reserve_ratio = min(1.0, self.reserve_ratio + 0.1)  # admitted too much: reserve more again
        self.on_preempt(seq)
        seq.status = Status.WAITING
        self.block_manager.free(seq)
        # NOTE: a partly prefilled head of `waiting` owns blocks and must finish first, or it could starve us.
        pos = 1 if self.waiting and self.waiting[0].block_table else 0
        self.waiting.insert(pos, seq)

    def forget_cached(self, num_blocks: int) -> None:
        """Blocks 0..num_blocks-1 were overwritten outside the scheduler (LLM.prompt_logits): no prefix hit."""
        self.block_manager.forget(range(num_blocks))

    def find(self, request_id: str) -> Sequence | None:
        return next((s for q in (self.waiting, self.running) for s in q if s.request_id == request_id), None)

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence (a step in flight skips it: it is finished)."""
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.held.discard(seq.seq_id)
        seq.status = Status.FINISHED
        self.block_manager.free(seq)

    def finish(self, seq: Sequence, num_tokens: int) -> None:
        """End `seq` with its first `num_tokens` tokens (places reserved after them are dropped)."""
        seq.truncate(num_tokens)
        limit = self._end(seq) - seq.num_prompt_tokens
        if limit > 0:  # what this sequence used of its limit, into the moving average
            used = min(1.0, seq.num_output_tokens / limit)
            self.reserve_ratio = max(0.05, 0.95 * self.reserve_ratio + 0.05 * used)
        seq.status = Status.FINISHED
        self.block_manager.free(seq)
        self.running.remove(seq)
        self.held.discard(seq.seq_id)


def admit_min_free(max_num_seqs: int) -> int:
    """Sequence slots that must be free before waiting prompts are admitted beside running sequences (the module's
    docstring): a quarter of max_num_seqs, or $FLASHGEN_ADMIT_MIN_FREE (0 or 1: as soon as one is); checked."""
    raw = os.environ.get("FLASHGEN_ADMIT_MIN_FREE")
    if raw is None:
        return max(1, max_num_seqs // 4)
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"FLASHGEN_ADMIT_MIN_FREE must be a whole number >= 0 (0: admit as soon as a slot is free), "
                         f"got {raw!r}")
    return n
