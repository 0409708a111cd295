"""Sampling on the logits' device with no host round trip until the tokens are read.

Randomness is a counter-based hash of (request seed, output position, token id) turned into Gumbel noise, so a
request's samples depend on its seed alone, never on its batch neighbours or on a generator's state, and the
whole step stays a fixed sequence of tensor ops (CUDA-graph friendly).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flashgen.sampling_params import SamplingParams

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
    # in (0, 1): 2**24 - 1 + 0.5 rounds up to 2**24 in float32, so clamp below 1 (else the noise is +inf)
    u = (((x >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp(max=1 - 2**-24)
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
    # structured outputs: both None unless some row is constrained (then unconstrained batches pay nothing)
    bitmask: torch.Tensor | None = None         # (M, W) int32, W = ceil(V / 32): llguidance's allowed-token bits
    mask_rows: torch.Tensor | None = None       # (B,) int32: each row's bitmask row, -1 = unconstrained
    # logit_bias, sparse: both None unless some row has a non-zero bias
    bias_index: torch.Tensor | None = None      # (2, N) int64: [logits row; token id] of each bias
    bias_values: torch.Tensor | None = None     # (N,) float32: added to those logits
    # allowed_token_ids, in the bitmask's layout but apart from it (the runner sets bitmask / mask_rows from the
    # grammar after build_sampling_batch; merge_masks ANDs the two): both None unless some row has the list
    allowed_bitmask: torch.Tensor | None = None  # (M2, W) int32, W = ceil(V / 32): bit t & 31 of word t >> 5
    allowed_rows: torch.Tensor | None = None     # (B,) int32: each row's allowed_bitmask row, -1 = any token
    # pipelined decode (TokenSlots): the device slot each row's token is written to as well (sample_checked), and
    # the slots' tensor; both None when slots are off
    slots: torch.Tensor | None = None            # (B,) int32
    slot_tokens: torch.Tensor | None = None      # (max slots,) int64


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """vLLM's meanings: repetition over prompt + output (divide positive, multiply negative logits);
    presence and frequency over the output only."""
    if b.rep_penalty is not None:
        assert b.seen_prompt is not None, "rep_penalty comes with seen_prompt"
        p = b.rep_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(b.seen_prompt, penalized, logits)
    if b.frequency is not None:
        assert b.presence is not None and b.out_counts is not None, "frequency comes with presence and out_counts"
        logits = logits - b.frequency[:, None] * b.out_counts - b.presence[:, None] * (b.out_counts > 0)
    return logits


def _unpack_bitmask(words: torch.Tensor, V: int) -> torch.Tensor:
    """(R, W) int32 words -> (R, V) bool, True = allowed: token t is bit t & 31 of word t >> 5 (llguidance's
    layout). Bits past V are ignored; tokens at or past 32 W are not allowed."""
    R, W = words.shape
    dev = words.device
    # bytes first, then bits: one byte per token at the widest instead of an int32; the shifts are made on the
    # device (a host tensor's blocking copy up would wait for the stream)
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=dev)
    by = ((words[:, :, None] >> shifts) & 0xFF).to(torch.uint8)
    bits = (by[..., None] >> torch.arange(8, dtype=torch.uint8, device=dev)) & 1  # (R, W, 4, 8)
    n = min(V, 32 * W)
    if n == V:
        return bits.view(R, 32 * W)[:, :V] != 0
    allowed = torch.zeros(R, V, dtype=torch.bool, device=dev)
    allowed[:, :n] = bits.view(R, 32 * W)[:, :n] != 0
    return allowed


def _mask_every_row(logits: torch.Tensor, bitmask: torch.Tensor, mask_rows: torch.Tensor) -> torch.Tensor:
    # no host sync: every row's words are unpacked, and the -1 rows' mask nothing
    drop = ~_unpack_bitmask(bitmask.index_select(0, mask_rows.clamp(min=0)), logits.shape[-1])
    return logits.masked_fill(drop & (mask_rows >= 0)[:, None], float("-inf"))


def _mask_constrained_rows(logits: torch.Tensor, bitmask: torch.Tensor, mask_rows: torch.Tensor) -> torch.Tensor:
    # the constrained rows alone (finding them reads mask_rows on the host)
    rows = (mask_rows >= 0).nonzero().squeeze(1)
    if not rows.numel():
        return logits
    allowed = _unpack_bitmask(bitmask.index_select(0, mask_rows[rows]), logits.shape[-1])
    return logits.index_copy(0, rows, logits.index_select(0, rows).masked_fill(~allowed, float("-inf")))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor | None,
                        mask_rows: torch.Tensor | None) -> torch.Tensor:
    """-inf at the tokens a row's bitmask row does not allow (mask_rows[i]: row i's bitmask row, -1 for none);
    out of place, unconstrained rows as they were. On the CPU only the constrained rows' bits are unpacked; on
    a GPU finding those rows would cost a host sync (the sampler never waits for the device), so every row's
    are."""
    if bitmask is None or not bitmask.shape[0]:  # no bitmask row: no row can be constrained
        return logits
    if mask_rows is None:
        raise ValueError("a token bitmask needs mask_rows (each row's bitmask row, -1 for none)")
    if logits.device.type == "cpu":
        return _mask_constrained_rows(logits, bitmask, mask_rows)
    return _mask_every_row(logits, bitmask, mask_rows)


def _rows_or_all(words: torch.Tensor, rows: torch.Tensor, W: int) -> torch.Tensor:
    """(B, W) int32: row i's words (zero-padded to W words: tokens past a bitmask's width are not allowed), or
    all bits set where rows[i] is -1."""
    w = words.index_select(0, rows.clamp(min=0))
    if w.shape[1] < W:
        w = F.pad(w, (0, W - w.shape[1]))
    return torch.where(rows[:, None] >= 0, w, -1)


def merge_masks(b: SamplingBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (bitmask, mask_rows) pair sample() and processed_logits() use: the grammar's (b.bitmask,
    b.mask_rows) and allowed_token_ids' (b.allowed_bitmask, b.allowed_rows), ANDed where a row has both. With
    one of them alone it is returned as it is (no allowed_token_ids: exactly the grammar's pair); with both,
    one merged bitmask row per logits row (B, max W), built on the device with no host sync. b is not changed."""
    if b.allowed_bitmask is None:
        return b.bitmask, b.mask_rows
    if b.allowed_rows is None:
        raise ValueError("allowed_bitmask needs allowed_rows (each row's allowed_bitmask row, -1 for none)")
    if b.bitmask is None or not b.bitmask.shape[0]:
        return b.allowed_bitmask, b.allowed_rows
    if b.mask_rows is None:
        raise ValueError("a token bitmask needs mask_rows (each row's bitmask row, -1 for none)")
    W = max(b.bitmask.shape[1], b.allowed_bitmask.shape[1])
    words = _rows_or_all(b.bitmask, b.mask_rows, W) & _rows_or_all(b.allowed_bitmask, b.allowed_rows, W)
    own = torch.arange(words.shape[0], dtype=torch.int32, device=words.device)
    return words, torch.where((b.mask_rows >= 0) | (b.allowed_rows >= 0), own, -1)


def apply_logit_bias(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """float32 logits + each row's logit_bias (sparse: one index_add over the N biases, no dense (B, V) bias);
    out of place."""
    if b.bias_index is None:
        return logits
    assert b.bias_values is not None, "bias_index comes with bias_values"
    flat = b.bias_index[0] * logits.shape[1] + b.bias_index[1]
    return logits.reshape(-1).index_add(0, flat, b.bias_values).view(logits.shape)


def _no_allowed_token(logits: torch.Tensor, tokens: torch.Tensor, bitmask: torch.Tensor | None,
                      mask_rows: torch.Tensor | None) -> torch.Tensor:
    """-1 for the constrained rows whose chosen (masked) logit is -inf or NaN: nothing allowed was left, and
    the argmax fell on an arbitrary token (the fused kernel's rule; O(B))."""
    if bitmask is None:
        return tokens
    assert mask_rows is not None, "bitmask comes with mask_rows"
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)
    return torch.where((mask_rows >= 0) & ~(chosen > float("-inf")), -1, tokens)


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


def _has_filters(b: SamplingBatch) -> bool:
    return b.top_k is not None or b.top_p is not None or b.min_p is not None


def _changes_logits(b: SamplingBatch) -> bool:
    """Something besides the mask, the temperature and the filters changes the logits (a float32 copy)."""
    return b.bias_index is not None or b.banned is not None or b.rep_penalty is not None or b.frequency is not None


def _pre_temperature(logits: torch.Tensor, b: SamplingBatch, bitmask: torch.Tensor | None,
                     mask_rows: torch.Tensor | None, *, mask: bool, filters: bool) -> torch.Tensor:
    """float32 logits with everything before the temperature applied, out of place, in vLLM's order: logit_bias
    (a logits processor in vLLM, before penalties), the token mask (`mask`: grammar and allowed_token_ids; the
    fused kernel reads it itself), repetition / presence / frequency penalties, min_tokens' bans, then (`filters`)
    top-k / top-p / min-p judged on the temperature-scaled distribution over the tokens left. The bias and the
    mask commute (a masked token is -inf whatever its bias), and so do the penalties and the bans."""
    logits = apply_logit_bias(logits.float(), b)
    if mask:
        logits = apply_token_bitmask(logits, bitmask, mask_rows)
    logits = apply_penalties(logits, b)
    if b.banned is not None:
        logits = logits.masked_fill(b.banned, float("-inf"))
    if filters:
        logits = _filter(logits, b)
    return logits


def _scaled(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits / T per row, greedy rows (T = 0) divided by 1."""
    if b.all_greedy:
        return logits
    t = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    return logits / t[:, None]


def processed_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """(B, V) float32: the logits after everything sample() applies before it draws (logit_bias, the grammar and
    allowed_token_ids masks, penalties, bans, temperature (1 for greedy rows), top-k / top-p / min-p with -inf
    for the dropped tokens), so that log_softmax of a row is the distribution its token was drawn from (vLLM's
    processed_logprobs), and its argmax is a greedy row's pick. The filters apply to greedy rows too, so a row's
    result never depends on its neighbours (sample() skips them when every row is greedy: they never drop a
    row's maximum, so only exactly tied maxima could pick differently). The caller's logits are not changed."""
    bitmask, mask_rows = merge_masks(b)
    return _scaled(_pre_temperature(logits, b, bitmask, mask_rows, mask=True, filters=_has_filters(b)), b)


def _draw(logits: torch.Tensor, b: SamplingBatch, fused: bool, checked: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, the logits they were drawn from): sample()'s work. With `checked` (fused only) the kernel runs the
    step's epilogue (sample_checked) and fills it, with b.slots' writes."""
    bitmask, mask_rows = merge_masks(b)
    filtered = not b.all_greedy and _has_filters(b)
    if fused:  # greedy rows too: torch's argmax took 27 us per 128,256-wide row in a batch-1 profile
        from flashgen.ops.cuda_ops import gumbel_argmax

        if filtered or _changes_logits(b):
            # filters are judged over the allowed tokens, so they need the mask first (vLLM's order); with bias,
            # penalties or bans alone the kernel applies the mask (it reads the bitmask itself either way) and
            # the temperature
            logits = _pre_temperature(logits, b, bitmask, mask_rows, mask=filtered, filters=filtered)
        slots = b.slots if checked is not None else None
        logits = logits.contiguous()
        return gumbel_argmax(logits, b.temperature, b.seeds, b.steps, bitmask=bitmask, mask_rows=mask_rows,
                             checked=checked, slot_ids=slots,
                             slot_tokens=b.slot_tokens if slots is not None else None), logits
    pre = _pre_temperature(logits, b, bitmask, mask_rows, mask=True, filters=filtered)
    x = _scaled(pre, b)  # processed_logits(logits, b), less the filters when every row is greedy
    greedy = x.argmax(-1)
    if b.all_greedy:
        return _no_allowed_token(pre, greedy, bitmask, mask_rows), pre
    sampled = (x + gumbel_noise(b.seeds, b.steps, x.shape[-1])).argmax(-1)
    return _no_allowed_token(pre, torch.where(b.temperature > 0, sampled, greedy), bitmask, mask_rows), pre


def sample(logits: torch.Tensor, b: SamplingBatch, fused: bool = False) -> torch.Tensor:
    """logits (B, V), any float dtype -> (B,) int64 tokens. `fused`: one CUDA kernel for noise + argmax, reading
    the logits in their own dtype when nothing has to change them first (a float32 copy otherwise: logit_bias,
    penalties, bans or filters).
    Rows constrained by b.bitmask (the grammar's) or b.allowed_bitmask (allowed_token_ids; both: their
    intersection, see merge_masks) draw only allowed tokens, and get -1 when no allowed token is left with a
    logit above -inf (after bias, penalties, bans and filters), on both paths. The non-fused path draws from
    processed_logits' distribution (the same code)."""
    return _draw(logits, b, fused)[0]


def sample_checked(logits: torch.Tensor, b: SamplingBatch, fused: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's draw as the runner hands it on: (tokens, checked), both (B,) int64. tokens are valid ids (0 where
    sample() gives -1): what a device slot may hold and logprobs may index. checked is sample()'s token, or -1
    where the logit it was drawn from is not finite: a NaN or inf row, which the engine fails alone (the logits
    drawn from: the model's, or their float32 copy after bias, penalties, bans and filters, where a token is
    -inf only if every token of its row was). With b.slots, b.slot_tokens[b.slots[i]] = tokens[i] too. On the
    fused path this is one kernel with the draw (kernels/sampling.cu's epilogue), not ten tensor ops after it."""
    if fused:
        checked = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        tokens, _ = _draw(logits, b, True, checked)
        return tokens, checked
    tokens, drawn = _draw(logits, b, False)
    safe = tokens.clamp(min=0)
    finite = torch.isfinite(drawn.gather(1, safe[:, None])).squeeze(1)
    checked = torch.where((tokens >= 0) & finite, tokens, -1)
    if b.slots is not None:
        assert b.slot_tokens is not None, "slots come with slot_tokens"
        b.slot_tokens[b.slots.long()] = safe
    return safe, checked


# What a row's SamplingParams asks of a sampling step beyond temperature and seed, as bits (sampling_flags):
# computed once a sequence, so that a step of rows that ask for none of it makes one pass over them, not one a
# feature. LOGPROBS and STRUCTURED are the runner's (ModelRunner._sample: the logprobs rows; launch: whether a
# grammar mask must wait for the previous step's tokens)
(SAMPLED, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE_FREQUENCY, MIN_TOKENS, LOGIT_BIAS, ALLOWED, LOGPROBS,
 STRUCTURED) = (1 << i for i in range(11))


def sampling_flags(p: SamplingParams | None) -> int:
    """The bits of the features `p` uses (0 for None: the engine's own scoring passes)."""
    if p is None:
        return 0
    return ((SAMPLED if p.temperature != 0 else 0) | (TOP_K if p.top_k > 0 else 0) | (TOP_P if p.top_p < 1 else 0)
            | (MIN_P if p.min_p > 0 else 0) | (REPETITION if p.repetition_penalty != 1 else 0)
            | (PRESENCE_FREQUENCY if p.presence_penalty or p.frequency_penalty else 0)
            | (MIN_TOKENS if p.min_tokens else 0) | (LOGIT_BIAS if p.logit_bias else 0)
            | (ALLOWED if p.allowed_token_ids is not None else 0) | (LOGPROBS if p.logprobs is not None else 0)
            | (STRUCTURED if p.structured_outputs is not None else 0))


def batch_flags(seqs: list) -> int:
    """The sequences' sampling_flags ORed: the features any of them uses."""
    flags = 0
    for s in seqs:
        flags |= s.sampling_flags
    return flags


def _as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same 64 bits (the hash reads the bits, so no two seeds collide)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _seeds(seqs: list) -> torch.Tensor:
    """The rows' seeds as int64 with the same 64 bits (_as_int64), converted by NumPy where they are in [0, 2**64),
    as SamplingParams and sample_seed make them; one by one otherwise."""
    seeds = [s.seed for s in seqs]
    try:
        return torch.from_numpy(np.array(seeds, dtype=np.uint64).view(np.int64))
    except (OverflowError, TypeError, ValueError):
        return torch.tensor([_as_int64(v) for v in seeds], dtype=torch.int64)


def _allowed_bitmask(ps: list, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed_token_ids as (M2, ceil(V / 32)) int32 words in llguidance's layout (ids outside [0, V) dropped:
    they never occur) and (B,) int32 rows (-1: any token), on the host. Rows whose params carry the same list
    object (a request's n samples) share a bitmask row."""
    W = (V + 31) // 32
    rows = np.full(len(ps), -1, dtype=np.int32)
    packed: list[np.ndarray] = []
    seen: dict[int, int] = {}  # id of a list -> its bitmask row
    for i, p in enumerate(ps):
        if p.allowed_token_ids is None:
            continue
        if id(p.allowed_token_ids) not in seen:
            seen[id(p.allowed_token_ids)] = len(packed)
            ids = np.asarray(p.allowed_token_ids, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < V)]
            w = np.zeros(W, dtype=np.uint32)
            np.bitwise_or.at(w, ids >> 5, (1 << (ids & 31)).astype(np.uint32))
            packed.append(w)
        rows[i] = seen[id(p.allowed_token_ids)]
    words = np.stack(packed)
    return torch.from_numpy(words.view(np.int32)), torch.from_numpy(rows)


def _rows_to_device(temperature: list[float], seeds: torch.Tensor, steps: list[int], slots: np.ndarray | None,
                    dev) -> tuple[torch.Tensor, ...]:
    """The per-row arrays every step has (temperature, seeds, steps and the token slots, if any) in one copy to
    `dev`: one byte buffer, seeds and steps first (8-byte aligned), then temperature and slots; views of it on
    the device. One copy, not four, each of which costs its launch on the engine's thread."""
    B = len(temperature)
    parts = [seeds.numpy().view(np.uint8), np.asarray(steps, dtype=np.int64).view(np.uint8),
             np.asarray(temperature, dtype=np.float32).view(np.uint8)]
    if slots is not None:
        parts.append(np.asarray(slots, dtype=np.int32).view(np.uint8))
    buf = torch.from_numpy(np.concatenate(parts)).to(dev, non_blocking=True)
    out = [buf[:8 * B].view(torch.int64), buf[8 * B:16 * B].view(torch.int64),
           buf[16 * B:20 * B].view(torch.float32)]
    if slots is not None:
        out.append(buf[20 * B:24 * B].view(torch.int32))
    return tuple(out)


def build_sampling_batch(seqs: list, V: int, eos_ids: set[int], dev, slots: np.ndarray | None = None,
                         slot_tokens: torch.Tensor | None = None, flags: int | None = None) -> SamplingBatch:
    """Per-row settings of the sequences about to sample (V: the vocabulary size), as tensors on `dev`. `slots`:
    each row's device token slot (TokenSlots.assign), into `slot_tokens` (sample_checked writes them). `flags`:
    batch_flags(seqs), when the caller has it."""
    ps = [s.params for s in seqs]
    f32 = torch.float32
    if flags is None:
        flags = batch_flags(seqs)
    seeds, steps, temperature, *slot = _rows_to_device(
        [p.temperature for p in ps], _seeds(seqs),
        # each row's output tokens so far (Sequence.num_output_tokens, without a property call a row)
        [len(s.token_ids) - s.num_prompt_tokens for s in seqs], slots, dev)
    b = SamplingBatch(
        temperature=temperature,
        # top_k above the vocabulary means all tokens: clamp, so no value can index past the logits
        top_k=torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in ps])
        if flags & TOP_K and any(0 < p.top_k < V for p in ps) else None,
        top_p=torch.tensor([p.top_p for p in ps], dtype=f32) if flags & TOP_P else None,
        min_p=torch.tensor([p.min_p for p in ps], dtype=f32) if flags & MIN_P else None,
        seeds=seeds,
        steps=steps,
        all_greedy=not flags & SAMPLED,
        slots=slot[0] if slot else None,
        slot_tokens=slot_tokens if slot else None,
    )
    if flags & REPETITION:
        b.rep_penalty = torch.tensor([p.repetition_penalty for p in ps], dtype=f32)
        b.seen_prompt = torch.zeros(len(seqs), V, dtype=torch.bool)
        for i, s in enumerate(seqs):
            b.seen_prompt[i, torch.from_numpy(np.array(s.token_ids, dtype=np.int64))] = True
    if flags & PRESENCE_FREQUENCY:
        b.presence = torch.tensor([p.presence_penalty for p in ps], dtype=f32)
        b.frequency = torch.tensor([p.frequency_penalty for p in ps], dtype=f32)
        b.out_counts = torch.zeros(len(seqs), V, dtype=f32)
        for i, s in enumerate(seqs):
            if s.output_counts:
                b.out_counts[i, torch.tensor(list(s.output_counts))] = torch.tensor(
                    list(s.output_counts.values()), dtype=f32)
    banned = [(i, s) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens] \
        if flags & MIN_TOKENS else []
    if banned:
        b.banned = torch.zeros(len(seqs), V, dtype=torch.bool)
        for i, s in banned:
            stop = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else eos_ids)
            b.banned[i, [t for t in stop if 0 <= t < V]] = True  # ids outside the vocabulary never occur
    # a zero bias changes nothing; ids outside the vocabulary never occur
    biases = [(i, t, v) for i, p in enumerate(ps) if p.logit_bias for t, v in p.logit_bias.items()
              if v and 0 <= t < V] if flags & LOGIT_BIAS else []
    if biases:
        b.bias_index = torch.tensor([[i for i, _, _ in biases], [t for _, t, _ in biases]], dtype=torch.int64)
        b.bias_values = torch.tensor([v for _, _, v in biases], dtype=f32)
    if flags & ALLOWED:
        b.allowed_bitmask, b.allowed_rows = _allowed_bitmask(ps, V)
    for f in ("top_k", "top_p", "min_p", "rep_penalty", "presence",
              "frequency", "seen_prompt", "out_counts", "banned", "bias_index", "bias_values", "allowed_bitmask",
              "allowed_rows"):
        v = getattr(b, f)
        if v is not None:
            setattr(b, f, v.to(dev, non_blocking=True))
    return b
