"""Sampling on the logits' device with no host round trip until the tokens are read.

Randomness is a counter-based hash of (request seed, output position, token id) turned into Gumbel noise, so a
request's samples depend on its seed alone, never on its batch neighbours or on a generator's state, and the
whole step stays a fixed sequence of tensor ops (CUDA-graph friendly).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 without int64 overflow: split c into 16-bit halves
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) seeds, (B,) output positions -> (B, vocab) float32 Gumbel(0, 1) noise."""
    base = _mix32((_mix32(seeds & M32) ^ _mix32((seeds >> 32) & M32)) + steps & M32)
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _mix32((_mix32(base[:, None] ^ idx[None, :]) + 0x9E3779B9) & M32)
    u = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors on the logits' device (filled by the ModelRunner)."""
    temperature: torch.Tensor            # (B,) float32; rows with 0 are greedy
    top_k: torch.Tensor | None           # (B,) int64, vocab for "off"
    top_p: torch.Tensor | None           # (B,) float32
    min_p: torch.Tensor | None           # (B,) float32
    seeds: torch.Tensor                  # (B,) int64
    steps: torch.Tensor                  # (B,) int64, output tokens so far
    all_greedy: bool
    rep_penalty: torch.Tensor | None = None     # (B,) float32
    presence: torch.Tensor | None = None        # (B,) float32
    frequency: torch.Tensor | None = None       # (B,) float32
    seen_prompt: torch.Tensor | None = None     # (B, V) bool: token occurs in prompt or output
    out_counts: torch.Tensor | None = None      # (B, V) float32: occurrences in the output
    banned: torch.Tensor | None = None          # (B, V) bool: stop tokens masked until min_tokens


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """vLLM's meanings: repetition over prompt + output (divide positive, multiply negative logits);
    presence and frequency over the output only."""
    if b.rep_penalty is not None:
        p = b.rep_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(b.seen_prompt, penalized, logits)
    if b.frequency is not None:
        logits = logits - b.frequency[:, None] * b.out_counts - b.presence[:, None] * (b.out_counts > 0)
    return logits


def _filter(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """-inf where top-k / top-p / min-p (judged on the temperature-scaled distribution) drop a token."""
    t = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    x = logits / t[:, None]
    drop = torch.zeros_like(x, dtype=torch.bool)
    if b.top_k is not None or b.top_p is not None:
        sx, order = x.sort(dim=-1, descending=True)
        sdrop = torch.zeros_like(sx, dtype=torch.bool)
        if b.top_k is not None:
            kth = sx.gather(1, (b.top_k - 1).clamp(min=0)[:, None])
            sdrop |= sx < kth
        if b.top_p is not None:
            probs = sx.masked_fill(sdrop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs  # mass strictly above each token
            sdrop |= before > b.top_p[:, None]
        sdrop[:, 0] = False
        drop = drop.scatter(1, order, sdrop)
    if b.min_p is not None:
        probs = x.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= probs < b.min_p[:, None] * probs.max(-1, keepdim=True).values
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, b: SamplingBatch, fused: bool = False) -> torch.Tensor:
    """logits (B, V), any float dtype -> (B,) int64 tokens. `fused`: one CUDA kernel for noise + argmax, reading
    the logits in their own dtype when nothing has to change them first (a float32 copy otherwise)."""
    filtered = not b.all_greedy and (b.top_k is not None or b.top_p is not None or b.min_p is not None)
    if not (fused and not filtered and b.banned is None and b.rep_penalty is None and b.frequency is None):
        logits = logits.float()
    logits = apply_penalties(logits, b)
    if b.banned is not None:
        logits = logits.masked_fill(b.banned, float("-inf"))
    if b.all_greedy and not fused:
        return logits.argmax(-1)
    if filtered:
        logits = _filter(logits, b)
    if fused:  # greedy rows too: torch's argmax took 27 us per 128,256-wide row in a batch-1 profile
        from flashgen.ops.cuda_ops import gumbel_argmax

        return gumbel_argmax(logits.contiguous(), b.temperature, b.seeds, b.steps)
    t = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    sampled = (logits / t[:, None] + gumbel_noise(b.seeds, b.steps, logits.shape[-1])).argmax(-1)
    return torch.where(b.temperature > 0, sampled, logits.argmax(-1))


def _as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same 64 bits (the hash reads the bits, so no two seeds collide)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def build_sampling_batch(seqs: list, V: int, eos_ids: set[int], dev) -> SamplingBatch:
    """Per-row settings of the sequences about to sample (V: the vocabulary size), as tensors on `dev`."""
    ps = [s.params for s in seqs]
    f32 = dict(dtype=torch.float32)
    b = SamplingBatch(
        temperature=torch.tensor([p.temperature for p in ps], **f32),
        # top_k above the vocabulary means all tokens: clamp, so no value can index past the logits
        top_k=torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in ps])
        if any(0 < p.top_k < V for p in ps) else None,
        top_p=torch.tensor([p.top_p for p in ps], **f32) if any(p.top_p < 1 for p in ps) else None,
        min_p=torch.tensor([p.min_p for p in ps], **f32) if any(p.min_p > 0 for p in ps) else None,
        seeds=torch.tensor([_as_int64(s.seed) for s in seqs], dtype=torch.int64),
        steps=torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64),
        all_greedy=all(p.temperature == 0 for p in ps),
    )
    if any(p.repetition_penalty != 1 for p in ps):
        b.rep_penalty = torch.tensor([p.repetition_penalty for p in ps], **f32)
        b.seen_prompt = torch.zeros(len(seqs), V, dtype=torch.bool)
        for i, s in enumerate(seqs):
            b.seen_prompt[i, torch.tensor(s.token_ids, dtype=torch.int64)] = True
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        b.presence = torch.tensor([p.presence_penalty for p in ps], **f32)
        b.frequency = torch.tensor([p.frequency_penalty for p in ps], **f32)
        b.out_counts = torch.zeros(len(seqs), V, **f32)
        for i, s in enumerate(seqs):
            if s.output_counts:
                b.out_counts[i, torch.tensor(list(s.output_counts))] = torch.tensor(
                    list(s.output_counts.values()), **f32)
    banned = [(i, s) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
    if banned:
        b.banned = torch.zeros(len(seqs), V, dtype=torch.bool)
        for i, s in banned:
            stop = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else eos_ids)
            b.banned[i, [t for t in stop if 0 <= t < V]] = True  # ids outside the vocabulary never occur
    for f in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps", "rep_penalty", "presence",
              "frequency", "seen_prompt", "out_counts", "banned"):
        v = getattr(b, f)
        if v is not None:
            setattr(b, f, v.to(dev, non_blocking=True))
    return b
