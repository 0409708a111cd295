"""Logprobs of sampled tokens, computed on the logits' device in the sampling step.

For the rows that asked for them, one pass of log-sum-exp and one top-k over the row's logits give the chosen
token's logprob, its rank (1 + the tokens with a strictly larger logit, as vLLM counts) and the k most likely
tokens. They travel back packed in one float32 tensor with the step's tokens (same copy, same event): no host
sync beyond reading the tokens. The engine unpacks them into RequestOutput.logprobs.
"""
from __future__ import annotations

import torch

from flashgen.outputs import Logprob


def pack_logprobs(x: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """x (R, V) logits of the rows (any float dtype), tokens (R,) the chosen ids -> (R, 2 + 2k) float32:
    chosen logprob, rank, then the top-k logprobs and the top-k ids (exact in float32 below 2**24)."""
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
