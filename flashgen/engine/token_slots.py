"""Where a sampled token lives between the step that samples it and the host reading it.

A launched step's tokens are not known on the host until the copy back completes. Each sequence that will get
a token holds a placeholder at that position in its token list (Sequence.reserve_token); SampledTokens is the
future that fills them. With pipelined decode each running sequence also owns a device slot holding its latest
token, so the next decode step can read its input on the GPU before the host has seen it. The runner owns one
TokenSlots; nothing else touches placeholders or slots.
"""
from __future__ import annotations

import numpy as np
import torch

from flashgen.engine.sequence import Sequence, Status


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, queued on the current stream (the CPU tensor itself on the CPU)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class SampledTokens:
    """The tokens of one launched step, read back without blocking the GPU: a pinned host copy and an event
    (CUDA), or the values themselves (CPU). `deferrable`: the engine may read them after launching the next
    step (with device slots; a prefill step's first tokens go to the slots as a decode step's do). `logprobs`:
    for the rows in `lp_rows`, what engine.logprobs.pack_logprobs computed (copied with the tokens)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None, deferrable: bool,
                 logprobs: torch.Tensor | None = None, lp_rows: list[int] | None = None,
                 prompt_lp: list | None = None):
        self.seqs = seqs
        # where each sequence's token will go; none for one that finished after this step was launched (its
        # token is speculative and dropped)
        self.idx = [None if seq.status is Status.FINISHED else seq.reserve_token() for seq in seqs]
        self.deferrable = deferrable
        self._event = None
        self._host = torch.empty(0, dtype=torch.int64) if tokens is None else _to_host(tokens)
        self._lp = None if logprobs is None else _to_host(logprobs)
        self._lp_rows = lp_rows or []
        self._prompt_lp = [(s, p, _to_host(t)) for s, p, t in prompt_lp or []]
        if (tokens is not None and tokens.is_cuda) or any(t.is_cuda for _, _, t in prompt_lp or []):
            self._event = torch.cuda.Event()
            self._event.record()

    def read_prompt_logprobs(self) -> list[tuple[Sequence, int, torch.Tensor]]:
        """(sequence, first prompt position, packed rows) of the prompt logprobs this step computed, the rows a host
        tensor: a chunk has up to 16k of them, which LogprobsList.extend_packed keeps as one array (no list of
        floats per position)."""
        if self._event is not None:
            self._event.synchronize()
        return list(self._prompt_lp)

    def read(self) -> list[tuple[Sequence, int, int, list[float] | None]]:
        """(sequence, position, token, packed logprobs or None) for each sequence still expecting a token; token
        -1 marks a non-finite logit (or, for a constrained row, no allowed token)."""
        if self._event is not None:
            self._event.synchronize()
        lps: list[list[float] | None] = [None] * len(self.seqs)
        if self._lp is not None:
            for r, values in zip(self._lp_rows, self._lp.tolist(), strict=True):
                lps[r] = values
        return [(s, i, t, lp) for s, i, t, lp in zip(self.seqs, self.idx, self._host.tolist(), lps, strict=True)
                if i is not None]


class TokenSlots:
    """Device slots of the running sequences' latest tokens (2 x max_num_seqs + 1: preempted sequences give
    theirs back), or, when off, decode inputs straight from the host's token lists."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self._slot: dict[int, int] = {}
        self._free: list[int] = []

    @property
    def on(self) -> bool:
        return self.tokens is not None

    def enable(self, max_num_seqs: int, device: torch.device) -> None:
        self.tokens = torch.zeros(2 * max_num_seqs + 1, dtype=torch.int64, device=device)
        self._free = list(range(self.tokens.shape[0] - 2, -1, -1))  # the last slot: scratch (see publish)

    def decode_inputs(self, seqs: list[Sequence]) -> list[int]:
        """The id column of a packed decode step: slot numbers (the token may still be on the GPU), or ids."""
        return [self._slot[s.seq_id] for s in seqs] if self.on else [s.token_ids[-1] for s in seqs]

    def gather(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Turn a decode step's unpacked id column into token ids (on the device)."""
        return self.tokens[input_ids] if self.tokens is not None else input_ids

    def assign(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Each row's device slot for the token the step is about to sample (the sampler writes it there:
        sampler.sample_checked), or None when slots are off. A sequence that finished after the step was
        launched has given its slot back: its token goes to the scratch slot."""
        if self.tokens is None:
            return None
        slot, free = self._slot, self._free
        for s in seqs:
            if s.seq_id not in slot and not s.is_finished:
                slot[s.seq_id] = free.pop()
        scratch = self.tokens.shape[0] - 1
        return np.fromiter((slot.get(s.seq_id, scratch) for s in seqs), dtype=np.int32, count=len(seqs))

    def publish(self, seqs: list[Sequence], checked: torch.Tensor, logprobs: torch.Tensor | None = None,
                lp_rows: list[int] | None = None, prompt_lp: list | None = None) -> SampledTokens:
        """The future of a step's `checked` tokens (-1 where the logit was not finite; the sampler has put the
        sampled ids, valid embedding indices, in the slots of assign)."""
        return SampledTokens(seqs, checked, self.on, logprobs, lp_rows, prompt_lp)

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: its slot is free again."""
        slot = self._slot.pop(seq.seq_id, None)
        if slot is not None:
            self._free.append(slot)
