"""Where a sampled token lives between the step that samples it and the host reading it.

A launched step's tokens are not known on the host until the copy back completes. Each sequence that will get
a token holds a placeholder at that position in its token list (Sequence.reserve_token); SampledTokens is the
future that fills them. With pipelined decode each running sequence also owns a device slot holding its latest
token, so the next decode step can read its input on the GPU before the host has seen it. The runner owns one
TokenSlots; nothing else touches placeholders or slots.
"""
from __future__ import annotations

import torch

from flashgen.engine.sequence import Sequence


class SampledTokens:
    """The tokens of one launched step, read back without blocking the GPU: a pinned host copy and an event
    (CUDA), or the values themselves (CPU). `deferrable`: the engine may read them after launching the next
    step (only decode steps with device slots)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None, deferrable: bool):
        self.seqs = seqs
        # where each sequence's token will go; none for one that finished after this step was launched (its
        # token is speculative and dropped)
        self.idx = [None if seq.is_finished else seq.reserve_token() for seq in seqs]
        self.deferrable = deferrable
        self._event = None
        if tokens is None:
            self._host = torch.empty(0, dtype=torch.int64)
        elif tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens

    def read(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, position, token) for each sequence still expecting one; token -1 marks a non-finite logit
        (or, for a constrained row, no allowed token)."""
        if self._event is not None:
            self._event.synchronize()
        return [(s, i, t) for s, i, t in zip(self.seqs, self.idx, self._host.tolist(), strict=True)
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

    def publish(self, seqs: list[Sequence], tokens: torch.Tensor, checked: torch.Tensor,
                is_prefill: bool) -> SampledTokens:
        """Store a step's sampled `tokens` in the sequences' slots and return the future of the `checked` ones
        (-1 where the logit was not finite; the slot keeps the sampled id, a valid embedding index)."""
        if self.tokens is not None:
            for s in seqs:
                if s.seq_id not in self._slot and not s.is_finished:
                    self._slot[s.seq_id] = self._free.pop()
            # a sequence that finished after the step was launched has given its slot back: its token goes to
            # the scratch slot
            scratch = self.tokens.shape[0] - 1
            slots = torch.tensor([self._slot.get(s.seq_id, scratch) for s in seqs], dtype=torch.int64)
            self.tokens[slots.to(self.tokens.device, non_blocking=True)] = tokens
        return SampledTokens(seqs, checked, deferrable=self.on and not is_prefill)

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: its slot is free again."""
        slot = self._slot.pop(seq.seq_id, None)
        if slot is not None:
            self._free.append(slot)
