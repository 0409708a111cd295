"""Logprobs of sampled tokens, computed on the logits' device in the sampling step.

For the rows that asked for them, one pass of log-sum-exp and one top-k over the row's logits give the chosen
token's logprob, its rank (1 + the tokens with a strictly larger logit, as vLLM counts) and the k most likely
tokens. They travel back packed in one float32 tensor with the step's tokens (same copy, same event): no host
sync beyond reading the tokens. The engine unpacks them into RequestOutput.logprobs.
"""
from __future__ import annotations

from collections import abc
from itertools import repeat
from typing import NamedTuple

import numpy as np
import torch

from flashgen.outputs import Logprob


def pack_logprobs(x: torch.Tensor, tokens: torch.Tensor, k: int, fused: bool = False) -> torch.Tensor:
    """x (R, V) logits of the rows (any float dtype), tokens (R,) the chosen ids -> (R, 2 + 2k) float32:
    chosen logprob, rank, then the top-k logprobs and the top-k ids (exact in float32 below 2**24). `fused`
    (the CUDA backend): one kernel pass over the logits in their own dtype (flashgen.ops.cuda_sampling
    .logprobs_pack); this function's torch code is its reference."""
    if fused:
        from flashgen.ops.cuda_sampling import logprobs_pack

        return logprobs_pack(x, tokens, k)
    x = x.float()
    lse = torch.logsumexp(x, -1, keepdim=True)
    chosen = x.gather(1, tokens.clamp(min=0)[:, None])
    rank = (x > chosen).sum(-1, keepdim=True).float() + 1
    parts = [chosen - lse, rank]
    if k:
        values, ids = x.topk(k, dim=-1)
        parts += [values - lse, ids.float()]
    return torch.cat(parts, 1)


def unpack_logprobs(row: list[float], token: int, k: int, text) -> dict[int, Logprob]:
    """One row of pack_logprobs (computed with some k' >= k) -> {token id: Logprob}, the chosen token first,
    then this request's top k. `text(id)` gives a token's text (None: no text)."""
    k_packed = (len(row) - 2) // 2
    out = {token: Logprob(row[0], int(row[1]), text(token))}
    for j in range(k):
        tid = int(row[2 + k_packed + j])
        if tid not in out:
            out[tid] = Logprob(row[2 + j], j + 1, text(tid))
    return out


class _Block(NamedTuple):
    """Packed rows appended at once (LogprobsList.extend_packed): position `start + r` is row r of `rows`."""
    rows: np.ndarray
    start: int


class LogprobsList(abc.Sequence):
    """A request's logprobs (or prompt logprobs) as vLLM gives them, a list of {token id: Logprob} per position
    (None where the engine has nothing), kept as the packed rows the GPU sent: a position's dict and its tokens'
    texts are made when it is first read. Building 6 to 21 Logprob objects and texts per token on the engine's
    thread cost more than the GPU work (BENCHMARKS.md, "Logprobs"); a caller that never reads a position never
    pays for it. Pickles (for data-parallel engines) as a plain list; equal to a list of the same entries."""

    def __init__(self, entries: list | None = None):
        # a packed row (list[float]), a _Block holding the position's row, a built dict, or None
        self._rows: list = list(entries or [])
        self._tokens: list[int] = [-1] * len(self._rows)
        self._k, self._text = 0, None

    def append_row(self, row: list[float], token: int, k: int, text) -> None:
        """One position: its packed row (pack_logprobs), its token, the request's k and a token-text function."""
        self._rows.append(row)
        self._tokens.append(token)
        self._k, self._text = k, text

    def extend_packed(self, rows: torch.Tensor | np.ndarray, tokens: abc.Sequence[int], k: int, text) -> None:
        """Positions len(self) on at once: (n, 2 + 2k') float32 packed rows (pack_logprobs, k' >= k), their n
        tokens, the request's k and a token-text function. A prompt chunk brings up to 16k positions: the rows stay
        one array (a copy, so a pinned host buffer of the caller's is not held) and each position costs only a
        reference until it is read, not a Python list of floats and a call per position on the engine's thread."""
        block = _Block(np.array(rows.numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.float32),
                       len(self._rows))
        if len(block.rows) != len(tokens):
            raise ValueError(f"{len(block.rows)} packed rows for {len(tokens)} tokens")
        self._rows.extend(repeat(block, len(block.rows)))
        self._tokens.extend(tokens)
        self._k, self._text = k, text

    def __len__(self) -> int:
        return len(self._rows)

    def _get(self, i: int) -> dict[int, Logprob] | None:
        row = self._rows[i]
        if isinstance(row, _Block):
            row = row.rows[i - row.start].tolist()
        if isinstance(row, list):
            row = self._rows[i] = unpack_logprobs(row, self._tokens[i], self._k, self._text)
        return row

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
            if i < 0:  # as a list: a block's row is found from the position, which must be a real one
                raise IndexError("LogprobsList index out of range")
        return self._get(i)

    def __eq__(self, other) -> bool:
        return isinstance(other, abc.Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self):
        return (list, (list(self),))
