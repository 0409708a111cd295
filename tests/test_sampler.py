"""The sampler's maths on the CPU, and the fused CUDA kernel against it on the GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashgen.engine.sampler import SamplingBatch, gumbel_noise, sample, sample_checked


def batch(B, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, steps=None):
    def full(v):
        return torch.full((B,), float(v))

    return SamplingBatch(
        temperature=full(temperature), top_k=None if top_k is None else torch.full((B,), top_k),
        top_p=None if top_p is None else full(top_p), min_p=None if min_p is None else full(min_p),
        seeds=torch.arange(B, dtype=torch.int64) * 7919 + 1 if seeds is None else seeds,
        steps=torch.zeros(B, dtype=torch.int64) if steps is None else steps, all_greedy=temperature == 0)


def test_samples_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    B = 40000
    toks = sample(logits.expand(B, -1).clone(), batch(B, temperature=0.7))
    freq = torch.bincount(toks, minlength=5).float() / B
    want = (logits / 0.7).softmax(-1)
    assert (freq - want).abs().max() < 0.01, (freq, want)


def test_filters_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    for kw, allowed in [
        (dict(top_k=5), lambda row: row >= row.topk(5).values[-1]),
        (dict(min_p=0.2), lambda row: (row.softmax(-1) >= 0.2 * row.softmax(-1).max())),
    ]:
        toks = sample(logits.clone(), batch(64, **kw))
        assert all(allowed(logits[i])[t] for i, t in enumerate(toks.tolist())), kw
    # top_p: the chosen token lies inside the smallest set reaching p
    toks = sample(logits.clone(), batch(64, top_p=0.5))
    for i, t in enumerate(toks.tolist()):
        p = logits[i].softmax(-1)
        assert (p[p > p[t]]).sum() <= 0.5 + 1e-6


def test_noise_is_a_function_of_seed_step_and_token():
    a = gumbel_noise(torch.tensor([5, 6]), torch.tensor([3, 3]), 100)
    b = gumbel_noise(torch.tensor([9, 5]), torch.tensor([3, 3]), 100)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], gumbel_noise(torch.tensor([5]), torch.tensor([4]), 100)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,V,B", [(torch.float32, 151936, 256), (torch.bfloat16, 151936, 256),
                                       (torch.float16, 128256, 256), (torch.bfloat16, 50257, 256),
                                       (torch.float32, 50257, 256), (torch.bfloat16, 151936, 9),
                                       (torch.float32, 128256, 1)])
def test_fused_kernel_matches_torch_sampler(dtype, V, B):
    """The fused kernel reads float32 or model-dtype logits (vector loads, or a scalar loop when V is not a
    multiple of the vector), spreads the rows of a small batch over several CTAs, and picks what the torch
    sampler picks on their float32 values."""
    torch.manual_seed(1)
    logits = (torch.randn(B, V, device="cuda") * 2).to(dtype)
    if B > 5:
        logits[3, :] = float("-inf")
        logits[3, 17] = 0.0  # only one finite token
        logits[5, 1000:] = float("-inf")
    temps = torch.rand(B, device="cuda") + 0.2
    temps[::7] = 0.0  # greedy rows
    b = SamplingBatch(temperature=temps, top_k=None, top_p=None, min_p=None,
                      seeds=torch.randint(0, 2**62, (B,), device="cuda"),
                      steps=torch.randint(0, 5000, (B,), device="cuda"), all_greedy=False)
    ref = sample(logits.float(), b, fused=False)
    out = sample(logits.clone(), b, fused=True)
    if B > 5:
        assert out[3].item() == 17 and out[5].item() < 1000
    agree = (ref == out).float().mean().item()
    assert agree >= 0.99, agree  # fast logarithms differ from torch's log by a few ulp: a rare near-tie flips
    assert torch.equal(ref[temps == 0], out[temps == 0])


def test_apply_penalties_matches_hand_computed_vllm_rules():
    """Repetition over prompt + output (positive logits divided, negative multiplied, zero unchanged);
    presence once per token in the output; frequency per occurrence in the output. Expected values come from
    plain-Python loops, not from the function under test."""
    from flashgen.engine.sampler import apply_penalties

    V = 7
    logits_rows = [
        [3.0, -2.0, 0.0, 1.5, -0.5, 2.5, -4.0],
        [-1.0, 4.5, 0.0, -3.0, 2.0, 0.75, -0.25],
        [1.0, -1.0, 0.0, 2.0, -2.0, 3.0, 0.5],
    ]
    # (prompt, output, repetition, presence, frequency); row 2 has every penalty off
    rows = [
        ([0, 1, 2], [3, 3, 4, 0], 2.0, 0.5, 0.25),   # 1 (negative) and 2 (zero) only in the prompt
        ([4, 3, 6], [1, 1, 1, 2], 1.5, 0.0, 1.0),    # 4 (positive), 3 and 6 (negative) only in the prompt
        ([0, 5], [3, 3, 6], 1.0, 0.0, 0.0),
    ]

    seen, counts, want = [], [], []
    for logit_row, (prompt, output, rep, pres, freq) in zip(logits_rows, rows, strict=True):
        seen_row = [False] * V
        for t in prompt + output:
            seen_row[t] = True
        count_row = [0.0] * V
        for t in output:
            count_row[t] += 1.0
        want_row = []
        for t in range(V):
            x = logit_row[t]
            if seen_row[t]:
                if x > 0:
                    x = x / rep
                else:
                    x = x * rep
            x = x - freq * count_row[t]
            if count_row[t] > 0:
                x = x - pres
            want_row.append(x)
        seen.append(seen_row)
        counts.append(count_row)
        want.append(want_row)

    # spot checks of the hand rules on a few entries
    assert want[0][0] == 3.0 / 2.0 - 0.25 - 0.5       # prompt + output, positive
    assert want[0][1] == -2.0 * 2.0                   # prompt only, negative: repetition alone
    assert want[0][2] == 0.0                          # prompt only, zero
    assert want[0][3] == 1.5 / 2.0 - 2 * 0.25 - 0.5   # output twice
    assert want[1][4] == 2.0 / 1.5                    # prompt only, positive
    assert want[1][1] == 4.5 / 1.5 - 3 * 1.0          # output three times, presence 0
    assert want[2] == logits_rows[2]                  # all penalties off

    f32 = dict(dtype=torch.float32)
    b = SamplingBatch(
        temperature=torch.ones(3), top_k=None, top_p=None, min_p=None,
        seeds=torch.arange(3, dtype=torch.int64), steps=torch.tensor([len(r[1]) for r in rows]),
        all_greedy=False,
        rep_penalty=torch.tensor([r[2] for r in rows], **f32),
        presence=torch.tensor([r[3] for r in rows], **f32),
        frequency=torch.tensor([r[4] for r in rows], **f32),
        seen_prompt=torch.tensor(seen, dtype=torch.bool),
        out_counts=torch.tensor(counts, **f32),
    )
    logits = torch.tensor(logits_rows, **f32)
    before = logits.clone()
    out = apply_penalties(logits, b)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, torch.tensor(want, **f32), rtol=0, atol=1e-6)
    assert torch.equal(logits, before)  # input left as it was


# ---------------------------------------------------------------- structured outputs: the token bitmask
def pack_bitmask(allowed: np.ndarray, rng: np.random.Generator, words: int | None = None) -> torch.Tensor:
    """(M, V) bool -> (M, W) int32 in llguidance's layout (token t: bit t & 31 of word t >> 5), packed with numpy
    (not the code under test). The bits past V are random: the sampler must ignore them."""
    M, V = allowed.shape
    W = -(-V // 32) if words is None else words
    bits = rng.random((M, 32 * W)) < 0.5
    n = min(V, 32 * W)
    bits[:, :n] = allowed[:, :n]
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view("<i4").copy())


def random_mask_case(B: int, V: int, seed: int):
    """Logits, an allowed-token table per bitmask row (some rows with one token allowed), and mask_rows with
    some rows unconstrained (-1) and two rows sharing a bitmask row."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * 3)
    M = B - B // 4
    allowed = rng.random((M, V)) < rng.uniform(0.02, 0.5, (M, 1))
    for m in range(0, M, 5):  # one token allowed
        allowed[m] = False
        allowed[m, rng.integers(V)] = True
    allowed[:, 0] |= rng.random(M) < 0.5  # token 0 (the -inf tie rule's pick) sometimes allowed, sometimes not
    allowed[allowed.sum(1) == 0, rng.integers(V)] = True
    rows = rng.permutation(M).astype(np.int32)
    mask_rows = np.full(B, -1, dtype=np.int32)
    constrained = rng.permutation(B)[:M]
    mask_rows[constrained] = rows
    free = np.flatnonzero(mask_rows == -1)
    if len(free) > 1:
        mask_rows[free[0]] = rows[0]  # shares a bitmask row with another logits row
    return logits, allowed, pack_bitmask(allowed, rng), torch.from_numpy(mask_rows)


def allowed_of(allowed: np.ndarray, mask_rows: torch.Tensor, V: int) -> np.ndarray:
    """(B, V) bool: what each logits row may pick (all tokens for an unconstrained row)."""
    mr = mask_rows.numpy()
    return np.where(mr[:, None] >= 0, allowed[np.maximum(mr, 0)][:, :V], True)


@pytest.mark.parametrize("V", [1000, 97])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bitmask_sampling_picks_the_best_allowed_token(V, temperature):
    """Greedy: the argmax over the allowed tokens; temperature 1: the argmax of logits + the request's Gumbel
    noise over the allowed tokens (both computed with numpy); unconstrained rows exactly as with no mask."""
    B = 48
    logits, allowed, bitmask, mask_rows = random_mask_case(B, V, seed=V + int(temperature))
    b = batch(B, temperature=temperature, steps=torch.arange(B, dtype=torch.int64) * 3)
    plain = sample(logits.clone(), b)
    b.bitmask, b.mask_rows = bitmask, mask_rows
    before = logits.clone()
    toks = sample(logits, b).numpy()
    assert torch.equal(logits, before)  # the caller's logits are left as they were
    ok = allowed_of(allowed, mask_rows, V)
    score = logits.numpy().astype(np.float64)
    if temperature:
        score = score / temperature + gumbel_noise(b.seeds, b.steps, V).numpy()
    want = np.where(ok, score, -np.inf).argmax(1)
    assert ok[np.arange(B), toks].all()
    assert (toks == want).all(), np.flatnonzero(toks != want)
    free = mask_rows.numpy() < 0
    assert free.any() and (toks[free] == plain.numpy()[free]).all()


@pytest.mark.parametrize("V", [1000, 97])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_unconstrained_mask_rows_change_nothing(V, temperature):
    """A bitmask with every mask_rows entry -1 samples exactly what no bitmask samples."""
    B = 32
    logits, _, bitmask, _ = random_mask_case(B, V, seed=7)
    b = batch(B, temperature=temperature, top_k=50 if temperature else None)
    plain = sample(logits.clone(), b)
    b.bitmask, b.mask_rows = bitmask, torch.full((B,), -1, dtype=torch.int32)
    assert torch.equal(sample(logits.clone(), b), plain)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.3), dict(min_p=0.3), dict(top_k=20, top_p=0.5)])
def test_filters_are_judged_over_the_allowed_tokens(kw):
    """The mask comes before top-k / top-p / min-p (vLLM's order): the pick is allowed, and among the filter's
    survivors computed over the allowed tokens alone (numpy), even where the unmasked top tokens are all
    forbidden."""
    B, V = 64, 1000
    logits, allowed, bitmask, mask_rows = random_mask_case(B, V, seed=11)
    ok = allowed_of(allowed, mask_rows, V)
    b = batch(B, temperature=0.8, **kw)
    b.bitmask, b.mask_rows = bitmask, mask_rows
    toks = sample(logits.clone(), b).numpy()
    x = np.where(ok, logits.numpy().astype(np.float64) / 0.8, -np.inf)
    for i, t in enumerate(toks):
        assert ok[i, t], (i, t)
        order = np.argsort(-x[i], kind="stable")
        rank = int(np.flatnonzero(order == t)[0])
        if "top_k" in kw:
            assert rank < kw["top_k"], (i, rank)
        p = np.exp(x[i] - x[i].max())
        p /= p.sum()
        if "top_p" in kw:
            assert p[order[:rank]].sum() <= kw["top_p"] + 1e-5, (i, rank)
        if "min_p" in kw:
            assert p[t] >= kw["min_p"] * p.max() - 1e-6, (i, p[t])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_with_no_allowed_token_left_gets_minus_one(temperature):
    """No token allowed, or every allowed logit -inf (in the logits or after min_tokens' ban): -1, as the fused
    kernel writes, so the runner can fail that request. An unconstrained row of -inf keeps the old rule (0)."""
    V = 97
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.standard_normal((5, V)).astype(np.float32))
    allowed = np.zeros((3, V), dtype=bool)
    allowed[1, [5, 9]] = True
    allowed[2, 40] = True
    logits[1, [5, 9]] = float("-inf")  # row 1: its allowed tokens are -inf
    logits[4] = float("-inf")  # unconstrained row of -inf
    b = batch(5, temperature=temperature)
    b.bitmask, b.mask_rows = pack_bitmask(allowed, rng), torch.tensor([0, 1, 2, -1, -1], dtype=torch.int32)
    toks = sample(logits.clone(), b).tolist()
    assert toks[0] == -1 and toks[1] == -1 and toks[2] == 40 and toks[4] == 0
    assert toks[3] == int(logits[3].argmax()) or temperature
    b.banned = torch.zeros(5, V, dtype=torch.bool)
    b.banned[2, 40] = True  # min_tokens bans the one allowed token (an end of grammar at EOS)
    assert sample(logits.clone(), b).tolist()[2] == -1


def _checked_case(V: int, dev: str, dtype=torch.float32, seed: int = 11):
    """Rows: 0 normal, 1 greedy, 2 a NaN at its best logit, 3 +inf there, 4 all NaN, 5 constrained with nothing
    allowed, 6 constrained to two tokens, 7 all -inf; slots 3, 9, 1, 0, 4, 8, 2, 6 of ten."""
    rng = np.random.default_rng(seed)
    B = 8
    logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * 2)
    logits[2, int(logits[2].argmax())] = float("nan")
    logits[3, 7] = float("inf")
    logits[4] = float("nan")
    logits[7] = float("-inf")
    allowed = np.zeros((2, V), dtype=bool)
    allowed[1, [3, V - 1]] = True
    b = batch(B, temperature=0.9)
    b.temperature[1] = 0.0
    b.all_greedy = False
    b.bitmask = pack_bitmask(allowed, rng)
    b.mask_rows = torch.tensor([-1, -1, -1, -1, -1, 0, 1, -1], dtype=torch.int32)
    b.slots = torch.tensor([3, 9, 1, 0, 4, 8, 2, 6], dtype=torch.int32)
    b.slot_tokens = torch.full((10,), -5, dtype=torch.int64)
    for f in ("temperature", "seeds", "steps", "bitmask", "mask_rows", "slots", "slot_tokens"):
        setattr(b, f, getattr(b, f).to(dev))
    return logits.to(dev, dtype), b


def test_sample_checked_reports_what_the_engine_must_fail_and_fills_the_slots():
    """The step's epilogue on the torch path: tokens are valid ids, checked is -1 for a NaN or inf pick and for
    a constrained row with nothing allowed, the rest as sample() draws them; every row's slot gets its token and
    no other slot is written."""
    V = 97
    logits, b = _checked_case(V, "cpu")
    want = sample(logits.clone(), b)
    tokens, checked = sample_checked(logits.clone(), b)
    assert bool((tokens >= 0).all()) and bool((tokens < V).all())
    ok = [0, 1, 6]
    assert checked[ok].tolist() == want[ok].tolist() == tokens[ok].tolist()
    assert int(want[6]) in (3, V - 1)
    assert checked[[2, 3, 4, 5]].tolist() == [-1] * 4
    assert int(tokens[3]) == 7  # +inf wins the draw; reported, not hidden
    assert int(checked[7]) == -1  # every logit -inf: the pick is not finite
    slots = b.slot_tokens.tolist()
    for row, slot in enumerate(b.slots.tolist()):
        assert slots[slot] == int(tokens[row])
    assert slots[5] == slots[7] == -5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [97, 32000, 151936])
def test_fused_epilogue_matches_the_torch_epilogue(dtype, V):
    """gumbel_argmax's epilogue (one kernel: valid tokens, checked, the slots) against sample_checked's torch
    path on the same rows, with one CTA or several per row (small batch, wide rows) and scalar loads (V 97)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    logits, b = _checked_case(V, "cuda", dtype)
    ref_tokens, ref_checked = sample_checked(logits.float(), b, fused=False)
    ref_slots = b.slot_tokens.clone()
    b.slot_tokens.fill_(-5)
    tokens, checked = sample_checked(logits.clone(), b, fused=True)
    torch.cuda.synchronize()
    rows = [0, 1, 3, 4, 5, 6, 7]  # row 2: torch's argmax picks its NaN; the kernel never draws a NaN
    assert torch.equal(checked[rows] == -1, ref_checked[rows] == -1), (checked, ref_checked)
    assert torch.equal(checked[[1, 5, 6]], ref_checked[[1, 5, 6]])  # greedy and constrained rows: no near ties
    row2 = logits[2].float()
    assert int(checked[2]) == int(tokens[2]) and bool(torch.isfinite(row2[int(tokens[2])]))
    assert bool((tokens >= 0).all()) and bool((tokens < V).all())
    assert torch.equal(b.slot_tokens[b.slots.long()], tokens)
    assert torch.equal(b.slot_tokens == -5, ref_slots == -5)
    assert int(tokens[3]) == int(ref_tokens[3]) == 7


def test_logits_wider_than_the_bitmask_forbid_the_extra_columns():
    """Padded vocabularies: constrained rows never pick a column at or past 32 W, unconstrained rows still may;
    bits past V in the last word are ignored."""
    rng = np.random.default_rng(5)
    V, W = 150, 3  # 96 tokens covered by the bitmask
    logits = torch.from_numpy(rng.standard_normal((4, V)).astype(np.float32))
    logits[:, 96:] += 100.0  # the padding would win if it were allowed
    allowed = rng.random((2, 96)) < 0.3
    b = batch(4, temperature=0.0)
    b.bitmask, b.mask_rows = pack_bitmask(allowed, rng, words=W), torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    toks = sample(logits.clone(), b).tolist()
    for row, m in ((0, 0), (2, 1)):
        assert toks[row] == int(np.where(allowed[m], logits[row, :96].numpy(), -np.inf).argmax())
    assert toks[1] >= 96 and toks[3] >= 96


@pytest.mark.parametrize("V", [1000, 97, 96])
def test_bitmask_unpacking_agrees_on_both_row_strategies(V):
    """The GPU's sync-free strategy (every row's words unpacked) and the CPU's (constrained rows only) mask the
    same logits, and the unpacked bits are numpy's."""
    from flashgen.engine import sampler

    logits, allowed, bitmask, mask_rows = random_mask_case(24, V, seed=V)
    a = sampler._mask_every_row(logits, bitmask, mask_rows)
    c = sampler._mask_constrained_rows(logits, bitmask, mask_rows)
    assert torch.equal(a, c)
    ok = allowed_of(allowed, mask_rows, V)
    assert np.array_equal(np.isfinite(c.numpy()), ok)
    assert np.array_equal(sampler._unpack_bitmask(bitmask, V).numpy(), allowed)


@pytest.mark.parametrize("feature,field", [
    (dict(top_k=5), "top_k"), (dict(top_p=0.9), "top_p"), (dict(min_p=0.1), "min_p"),
    (dict(repetition_penalty=1.2), "rep_penalty"), (dict(presence_penalty=0.5), "presence"),
    (dict(frequency_penalty=0.5), "frequency"), (dict(min_tokens=3), "banned"),
    (dict(logit_bias={7: 2.0}), "bias_index"), (dict(allowed_token_ids=[1, 2]), "allowed_bitmask")])
def test_one_row_with_a_feature_turns_it_on_for_the_batch(feature, field):
    """build_sampling_batch looks for a feature only where a row's flags (sampler.sampling_flags, made with its
    sequence) say it is used: one row of 64 that uses it gives the batch its tensor, none gives None; greedy only
    when no row samples."""
    from flashgen import SamplingParams
    from flashgen.engine.sampler import build_sampling_batch
    from flashgen.engine.sequence import Sequence

    def seqs(params):
        return [Sequence(str(i), None, [3, 4, 5], p, 16, seed=i) for i, p in enumerate(params)]

    plain = [SamplingParams(temperature=0.0, max_tokens=8) for _ in range(64)]
    one = plain[:40] + [SamplingParams(temperature=0.0, max_tokens=8, **feature)] + plain[41:]
    cpu = torch.device("cpu")
    b0, b1 = build_sampling_batch(seqs(plain), 100, {0}, cpu), build_sampling_batch(seqs(one), 100, {0}, cpu)
    assert getattr(b0, field) is None and getattr(b1, field) is not None
    assert b0.all_greedy and b1.all_greedy
    assert not build_sampling_batch(seqs(plain[:63] + [SamplingParams(temperature=0.5)]), 100, {0}, cpu).all_greedy


@pytest.mark.parametrize("feature, bit", [(dict(logprobs=2), "LOGPROBS"), (dict(logprobs=0), "LOGPROBS"),
                                          (dict(structured_outputs={"choice": ["a", "b"]}), "STRUCTURED")])
def test_the_runners_features_are_flagged_where_a_row_uses_them(feature, bit):
    """ModelRunner looks for logprobs rows and grammar matchers only where batch_flags says a row asks for them:
    one row of 64 sets the bit for the batch, none leaves it clear (logprobs=0 asks for the chosen token's)."""
    from flashgen import SamplingParams
    from flashgen.engine import sampler
    from flashgen.engine.sequence import Sequence
    from flashgen.sampling_params import StructuredOutputsParams

    if "structured_outputs" in feature:
        feature = {"structured_outputs": StructuredOutputsParams(**feature["structured_outputs"])}
    plain = [SamplingParams(temperature=0.0, max_tokens=8) for _ in range(64)]
    one = plain[:40] + [SamplingParams(temperature=0.0, max_tokens=8, **feature)] + plain[41:]
    flags = [sampler.batch_flags([Sequence(str(i), None, [3], p, 16, seed=i) for i, p in enumerate(ps)])
             for ps in (plain, one)]
    assert not flags[0] & getattr(sampler, bit) and flags[1] & getattr(sampler, bit)
