"""logit_bias and allowed_token_ids in the sampler (CPU), and processed_logits: the distribution a token is drawn
from. Expected values come from numpy, not from the code under test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashgen.engine import sampler
from flashgen.engine.sampler import build_sampling_batch, gumbel_noise, merge_masks, processed_logits, sample
from flashgen.engine.sequence import Sequence
from flashgen.sampling_params import SamplingParams

CPU = torch.device("cpu")


def seqs_of(params: list[SamplingParams], seeds: list[int] | None = None, outputs: int = 0) -> list[Sequence]:
    out = []
    for i, p in enumerate(params):
        s = Sequence(f"r{i}", None, [1, 2, 3], p, 16, 1000 + 17 * i if seeds is None else seeds[i])
        for t in range(outputs):
            s.token_ids.append(t)
            s.output_counts[t] = s.output_counts.get(t, 0) + 1
        out.append(s)
    return out


def batch_of(params: list[SamplingParams], V: int, seeds: list[int] | None = None, outputs: int = 0,
             eos: set[int] | None = None):
    return build_sampling_batch(seqs_of(params, seeds, outputs), V, eos or set(), CPU)


def rand_logits(B: int, V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal((B, V)) * scale).astype(np.float32))


def pack(allowed: np.ndarray) -> torch.Tensor:
    """(M, V) bool -> (M, ceil(V / 32)) int32 in llguidance's layout, with numpy's packbits."""
    M, V = allowed.shape
    bits = np.zeros((M, 32 * (-(-V // 32))), dtype=bool)
    bits[:, :V] = allowed
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view("<i4").copy())


# ---------------------------------------------------------------------------------------------- logit_bias
@pytest.mark.parametrize("V", [97, 1000])
def test_plus_100_makes_greedy_pick_the_token_and_minus_100_the_runner_up(V):
    B = 16
    logits = rand_logits(B, V, seed=V)
    rng = np.random.default_rng(1)
    targets = rng.integers(V, size=B)
    order = np.argsort(-logits.numpy(), axis=1)
    ps = [SamplingParams(temperature=0.0, logit_bias={int(targets[i]): 100.0}) for i in range(B // 2)]
    ps += [SamplingParams(temperature=0.0, logit_bias={int(order[i, 0]): -100.0}) for i in range(B // 2, B)]
    toks = sample(logits.clone(), batch_of(ps, V)).numpy()
    assert (toks[:B // 2] == targets[:B // 2]).all()
    assert (toks[B // 2:] == order[B // 2:, 1]).all()


@pytest.mark.parametrize("V", [97, 1000])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_a_bias_changes_its_own_row_alone(V, temperature):
    """Rows without a bias sample bit-identical tokens (and processed logits) to a batch with no bias at all."""
    B = 12
    logits = rand_logits(B, V, seed=3)
    kw = dict(temperature=temperature, top_k=20 if temperature else -1)
    plain = [SamplingParams(**kw) for _ in range(B)]
    biased = [SamplingParams(**kw, logit_bias={int(t): 30.0 for t in range(i, V, 7)}) if i % 3 == 0
              else SamplingParams(**kw) for i in range(B)]
    bp, bb = batch_of(plain, V), batch_of(biased, V)
    assert bp.bias_index is None and bb.bias_index is not None
    before = logits.clone()
    a, b = sample(logits, bp), sample(logits, bb)
    assert torch.equal(logits, before)  # the caller's logits are left as they were
    free = torch.tensor([i % 3 != 0 for i in range(B)])
    assert torch.equal(a[free], b[free])
    assert not torch.equal(a[~free], b[~free])
    assert torch.equal(processed_logits(logits, bp)[free], processed_logits(logits, bb)[free])


@pytest.mark.parametrize("V", [97, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_biased_sampling_is_the_argmax_of_biased_logits_over_t_plus_the_noise(V, temperature):
    """Sampling with a seed: argmax((logits + bias) / T + Gumbel(seed, step)), computed with numpy (float32 like
    the sampler, so the picks match exactly)."""
    B = 40
    logits = rand_logits(B, V, seed=V + 5)
    rng = np.random.default_rng(7)
    bias = np.zeros((B, V), dtype=np.float32)
    ps = []
    for i in range(B):
        ids = rng.choice(V, size=int(rng.integers(0, 12)), replace=False)
        vals = rng.uniform(-100, 100, size=len(ids)).astype(np.float32)
        vals[: len(ids) // 3] = rng.uniform(-3, 3, size=len(ids) // 3)  # small biases: near ties with the noise
        bias[i, ids] = vals
        ps.append(SamplingParams(temperature=temperature, seed=int(rng.integers(2**64, dtype=np.uint64)),
                                 logit_bias={int(t): float(v) for t, v in zip(ids, vals, strict=True)} or None))
    seqs = seqs_of(ps, seeds=[p.seed for p in ps], outputs=2)
    b = build_sampling_batch(seqs, V, set(), CPU)
    toks = sample(logits.clone(), b).numpy()
    noise = gumbel_noise(b.seeds, b.steps, V).numpy()
    want = ((logits.numpy() + bias) / np.float32(temperature) + noise).argmax(1)
    assert (toks == want).all(), np.flatnonzero(toks != want)
    assert not (toks == ((logits.numpy() / np.float32(temperature)) + noise).argmax(1)).all()


def test_bias_batch_is_sparse_and_unbiased_batches_pay_nothing():
    V = 97
    ps = [SamplingParams(logit_bias={3: 1.5, 96: -2.0, 500: 4.0}), SamplingParams(),
          SamplingParams(logit_bias={0: 0.0}), SamplingParams(logit_bias={7: -100.0})]
    b = batch_of(ps, V)
    assert b.bias_index is not None and b.bias_values is not None
    assert b.bias_index.tolist() == [[0, 0, 3], [3, 96, 7]]  # zero biases and ids outside the vocabulary dropped
    assert b.bias_values.tolist() == [1.5, -2.0, -100.0]
    plain = batch_of([SamplingParams(logit_bias={0: 0.0}), SamplingParams(logit_bias={})], V)
    for f in ("bias_index", "bias_values", "allowed_bitmask", "allowed_rows", "bitmask", "mask_rows"):
        assert getattr(plain, f) is None, f
    assert merge_masks(plain) == (None, None)


def test_bias_with_penalties_comes_first_as_in_vllm():
    """vLLM: logit_bias is a logits processor, applied before the penalties: a positive logit pushed below zero
    by its bias is multiplied by the repetition penalty, not divided."""
    V = 97
    logits = torch.zeros(1, V)
    logits[0, 5] = 2.0
    b = batch_of([SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={5: -3.0})], V)
    assert b.seen_prompt is not None and not bool(b.seen_prompt[0, 5])
    b.seen_prompt[0, 5] = True
    assert processed_logits(logits, b)[0, 5].item() == pytest.approx((2.0 - 3.0) * 2.0)


def test_fused_path_gets_the_biased_float32_logits_and_the_merged_mask(monkeypatch):
    """On the fused path a bias needs the float32 copy (as penalties do); the mask is left to the kernel, which
    gets the merged (allowed_token_ids AND grammar) bitmask. The kernel is replaced by the torch reference."""
    from flashgen.ops import cuda_ops

    calls = []

    def fake_kernel(logits, temperature, seeds, steps, *, bitmask=None, mask_rows=None, checked=None,
                    slot_ids=None, slot_tokens=None):
        assert checked is None and slot_ids is None and slot_tokens is None  # sample() asks for no epilogue
        calls.append((logits, bitmask, mask_rows))
        b = sampler.SamplingBatch(temperature=temperature, top_k=None, top_p=None, min_p=None, seeds=seeds,
                                  steps=steps, all_greedy=False, bitmask=bitmask, mask_rows=mask_rows)
        return sample(logits.float(), b)

    monkeypatch.setattr(cuda_ops, "gumbel_argmax", fake_kernel)
    V, B = 97, 6
    logits = rand_logits(B, V, seed=9).to(torch.bfloat16)
    ps = [SamplingParams(temperature=0.8, logit_bias={4: 50.0}), SamplingParams(temperature=0.8),
          SamplingParams(temperature=0.0, allowed_token_ids=[1, 2, 3]), SamplingParams(temperature=0.0)] * 2
    ps = ps[:B]
    b = batch_of(ps, V)
    assert torch.equal(sample(logits, b, fused=True), sample(logits.float(), b))
    x, bitmask, mask_rows = calls[0]
    assert x.dtype == torch.float32 and x[0, 4].item() == logits[0, 4].float().item() + 50.0
    assert torch.equal(bitmask, b.allowed_bitmask) and torch.equal(mask_rows, b.allowed_rows)
    assert torch.isfinite(x).all()  # the kernel applies the mask
    # no bias, penalty or filter: the model-dtype logits go to the kernel as they are
    calls.clear()
    b2 = batch_of([SamplingParams(temperature=0.8, allowed_token_ids=[5, 6])] * B, V)
    sample(logits, b2, fused=True)
    assert calls[0][0] is logits or calls[0][0].data_ptr() == logits.data_ptr()


# ---------------------------------------------------------------------------------------- allowed_token_ids
@pytest.mark.parametrize("V", [97, 1000])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_are_the_only_tokens_drawn(V, temperature):
    B = 24
    rng = np.random.default_rng(V)
    lists = [sorted(rng.choice(V, size=int(rng.integers(1, 9)), replace=False).tolist()) for _ in range(B)]
    ps = [SamplingParams(temperature=temperature, allowed_token_ids=lists[i]) if i % 4 else
          SamplingParams(temperature=temperature) for i in range(B)]
    free = np.array([i % 4 == 0 for i in range(B)])
    for trial in range(25):  # many seeds and logits
        logits = rand_logits(B, V, seed=100 * trial + V)
        seeds = rng.integers(2**64, size=B, dtype=np.uint64).tolist()
        b = batch_of(ps, V, seeds=seeds)
        plain = sample(logits.clone(), batch_of([SamplingParams(temperature=temperature)] * B, V, seeds=seeds))
        toks = sample(logits.clone(), b).numpy()
        for i in np.flatnonzero(~free):
            assert toks[i] in lists[i], (trial, i, toks[i])
        assert (toks[free] == plain.numpy()[free]).all()
        ok = np.zeros((B, V), dtype=bool)
        for i in range(B):
            ok[i, lists[i] if not free[i] else slice(None)] = True
        score = logits.numpy() / np.float32(temperature or 1)
        if temperature:
            score = score + gumbel_noise(b.seeds, b.steps, V).numpy()
        assert (toks == np.where(ok, score, -np.inf).argmax(1)).all()


def test_allowed_bitmask_layout_and_shared_lists():
    V = 97
    same = [0, 31, 32, 96, 200]  # 200 is outside the vocabulary: dropped
    ps = [SamplingParams(allowed_token_ids=same), SamplingParams(), SamplingParams(allowed_token_ids=[5, 5, 64])]
    ps.append(ps[0])  # a request's second sample shares the params (and the list)
    b = batch_of(ps, V)
    assert b.allowed_bitmask is not None and b.allowed_rows is not None
    assert b.allowed_bitmask.dtype == torch.int32 and b.allowed_bitmask.shape == (2, 4)
    assert b.allowed_rows.dtype == torch.int32 and b.allowed_rows.tolist() == [0, -1, 1, 0]
    want = np.zeros((2, V), dtype=bool)
    want[0, [0, 31, 32, 96]] = True
    want[1, [5, 64]] = True
    assert torch.equal(b.allowed_bitmask, pack(want))
    assert np.array_equal(sampler._unpack_bitmask(b.allowed_bitmask, V).numpy(), want)
    assert merge_masks(b) == (b.allowed_bitmask, b.allowed_rows)  # no grammar: used as they are


@pytest.mark.parametrize("V", [97, 1000])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_ids_and_a_grammar_mask_allow_only_the_intersection(V, temperature):
    """The runner sets bitmask / mask_rows (the grammar's) after build_sampling_batch: rows with both draw from
    the intersection, rows with one from that one, an empty intersection gives -1."""
    B = 8
    rng = np.random.default_rng(V + 1)
    lists = [sorted(rng.choice(V, size=20, replace=False).tolist()) for _ in range(B)]
    has_list = [True, True, False, True, False, True, True, False]
    has_grammar = [True, False, True, True, False, True, True, True]
    ps = [SamplingParams(temperature=temperature, allowed_token_ids=lists[i] if has_list[i] else None)
          for i in range(B)]
    grammar = rng.random((B, V)) < 0.4
    for i in range(B):
        grammar[i, lists[i][:3]] = True  # a non-empty intersection...
    grammar[5, lists[5]] = False  # ...except row 5: none of its allowed ids is in its grammar
    grammar[6] = False
    grammar[6, lists[6][4]] = True  # row 6: exactly one token in common
    g_rows = [i for i in range(B) if has_grammar[i]]
    for trial in range(10):
        logits = rand_logits(B, V, seed=trial)
        b = batch_of(ps, V, seeds=[trial * 31 + i for i in range(B)])
        mask_rows = torch.full((B,), -1, dtype=torch.int32)
        mask_rows[g_rows] = torch.arange(len(g_rows), dtype=torch.int32).flip(0)  # any order of bitmask rows
        b.bitmask, b.mask_rows = pack(grammar[[g_rows[::-1][j] for j in range(len(g_rows))]]), mask_rows
        ok = np.ones((B, V), dtype=bool)
        for i in range(B):
            if has_list[i]:
                ok[i] &= np.isin(np.arange(V), lists[i])
            if has_grammar[i]:
                ok[i] &= grammar[i]
        toks = sample(logits.clone(), b).numpy()
        score = logits.numpy() / np.float32(temperature or 1)
        if temperature:
            score = score + gumbel_noise(b.seeds, b.steps, V).numpy()
        want = np.where(ok, score, -np.inf).argmax(1)
        want[~ok.any(1)] = -1  # the documented no-allowed-token result
        assert toks[5] == -1 and toks[6] == lists[6][4]
        assert (toks == want).all(), (trial, np.flatnonzero(toks != want))
        merged, rows = merge_masks(b)
        assert merged is not None and rows is not None
        assert rows.tolist() == [i if has_list[i] or has_grammar[i] else -1 for i in range(B)]
        got = sampler._unpack_bitmask(merged.index_select(0, rows.clamp(min=0)), V).numpy()
        constrained = rows.numpy() >= 0
        assert np.array_equal(got[constrained], ok[constrained])
        # both row strategies (the GPU's sync-free one, the CPU's) mask alike
        assert torch.equal(sampler._mask_every_row(logits, merged, rows),
                           sampler._mask_constrained_rows(logits, merged, rows))


def test_merge_masks_pads_a_narrower_grammar_bitmask():
    """A bitmask narrower than the vocabulary forbids the tokens past it (as the kernel does), also after the
    merge; an empty grammar bitmask (no rows) is no grammar."""
    V = 150
    allowed_ids = [3, 40, 100, 149]
    b = batch_of([SamplingParams(temperature=0.0, allowed_token_ids=allowed_ids), SamplingParams(temperature=0.0)],
                 V)
    grammar = np.ones((1, 96), dtype=bool)  # 3 words: tokens 96.. forbidden
    b.bitmask, b.mask_rows = pack(grammar), torch.tensor([0, -1], dtype=torch.int32)
    merged, rows = merge_masks(b)
    assert merged is not None and rows is not None and merged.shape == (2, 5)
    got = sampler._unpack_bitmask(merged, V).numpy()
    assert np.flatnonzero(got[0]).tolist() == [3, 40]
    assert rows.tolist() == [0, -1]
    b.bitmask, b.mask_rows = torch.zeros(0, 5, dtype=torch.int32), torch.full((2,), -1, dtype=torch.int32)
    assert merge_masks(b) == (b.allowed_bitmask, b.allowed_rows)


# ------------------------------------------------------------------------------------------- processed_logits
@pytest.mark.parametrize("V", [97, 1000])
@pytest.mark.parametrize("filt", [dict(top_k=7), dict(top_p=0.6), dict(min_p=0.2), {}])
def test_processed_logits_are_the_distribution_drawn_from(V, filt):
    """log_softmax of processed_logits is -inf exactly on the tokens the bias-free mask, the grammar, the bans and
    the filters drop (numpy), its argmax is the greedy pick, and a sampled row's token is
    argmax(processed + noise)."""
    B = 16
    rng = np.random.default_rng(V)
    logits = rand_logits(B, V, seed=V + 2)
    temps = [0.0 if i % 4 == 0 else 0.5 + i / 16 for i in range(B)]
    lists = [rng.choice(V, size=40, replace=False).tolist() for _ in range(B)]
    eos = 11
    ps = []
    for i in range(B):
        kw: dict = dict(temperature=temps[i], **filt)
        if i % 2:
            kw["allowed_token_ids"] = lists[i] + [eos]
        if i % 3 == 0:
            kw["logit_bias"] = {int(lists[i][0]): 5.0, int(lists[i][1]): -100.0}
        if i % 5 == 0:
            kw["min_tokens"], kw["max_tokens"] = 3, 5  # eos banned
        ps.append(SamplingParams(**kw))
    b = batch_of(ps, V, outputs=1, eos={eos})
    grammar = rng.random((B, V)) < 0.7
    g_rows = [i for i in range(B) if i % 3 != 1]
    b.bitmask = pack(grammar[g_rows])
    b.mask_rows = torch.full((B,), -1, dtype=torch.int32)
    b.mask_rows[g_rows] = torch.arange(len(g_rows), dtype=torch.int32)
    before = logits.clone()
    x = processed_logits(logits, b)
    assert torch.equal(logits, before) and x.dtype == torch.float32

    # numpy: bias, masks, bans, temperature (1 for greedy rows), then the filter over what is left
    y = logits.numpy().astype(np.float64)
    ok = np.ones((B, V), dtype=bool)
    for i, p in enumerate(ps):
        for t, v in (p.logit_bias or {}).items():
            y[i, t] += v
        if p.allowed_token_ids is not None:
            ok[i] &= np.isin(np.arange(V), p.allowed_token_ids)
        if i in g_rows:
            ok[i] &= grammar[i]
        if i % 5 == 0:
            ok[i, eos] = False
        y[i] /= p.temperature or 1.0
    y = np.where(ok, y, -np.inf)
    keep = ok.copy()
    for i in range(B):
        order = np.argsort(-y[i], kind="stable")
        pr = np.exp(y[i] - y[i].max())
        pr /= pr.sum()
        if "top_k" in filt:
            keep[i, order[filt["top_k"]:]] = False
        if "top_p" in filt:
            before_mass = np.cumsum(pr[order]) - pr[order]
            keep[i, order[before_mass > filt["top_p"] + 1e-6]] = False
        if "min_p" in filt:
            keep[i] &= pr >= filt["min_p"] * pr.max() - 1e-7
    lp = torch.log_softmax(x, -1).numpy()
    assert np.array_equal(np.isneginf(lp), ~keep)
    assert np.isfinite(lp[keep]).all()
    np.testing.assert_allclose(x.numpy()[keep], y[keep], rtol=1e-5, atol=1e-4)

    toks = sample(logits.clone(), b).numpy()
    greedy = np.array([t == 0 for t in temps])
    xn = x.numpy()
    assert (toks[greedy] == xn[greedy].argmax(1)).all()
    want = (xn + gumbel_noise(b.seeds, b.steps, V).numpy()).argmax(1)
    assert (toks[~greedy] == want[~greedy]).all()
    # all greedy: the same argmax (sample() skips the filters then; they never drop a row's maximum)
    bg = batch_of([SamplingParams(temperature=0.0, **{k: v for k, v in p.__dict__.items()
                                                     if k in ("allowed_token_ids", "logit_bias", "min_tokens",
                                                              "max_tokens", *filt)}) for p in ps],
                  V, outputs=1, eos={eos})
    bg.bitmask, bg.mask_rows = b.bitmask, b.mask_rows
    xg = processed_logits(logits, bg)
    assert (sample(logits.clone(), bg).numpy() == xg.numpy().argmax(1)).all()


def test_processed_logits_without_settings_are_the_scaled_logits():
    V = 97
    logits = rand_logits(3, V, seed=0)
    b = batch_of([SamplingParams(temperature=0.5), SamplingParams(temperature=0.0), SamplingParams()], V)
    x = processed_logits(logits, b)
    assert torch.equal(x, logits / torch.tensor([0.5, 1.0, 1.0])[:, None])
    g = batch_of([SamplingParams(temperature=0.0)] * 3, V)
    assert torch.equal(processed_logits(logits, g), logits)


# ------------------------------------------------------------------------------------ through the engine (CPU)
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from checkpoints import make_checkpoint
    from flashgen import LLM

    d = make_checkpoint(tmp_path_factory.mktemp("bias"), "qwen3", hidden_size=64, num_heads=2, num_kv_heads=1,
                        head_dim=32, num_layers=2)
    return LLM(model=str(d), device="cpu", dtype="float32", block_size=16)


def test_engine_requests_with_bias_and_allowed_ids_leave_their_neighbours_alone(llm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=int(rng.integers(2, 30))).tolist() for _ in range(6)]
    allowed = [7, 19, 300, 401]

    def sp(i: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=8, ignore_eos=True, **kw)

    plain = llm.generate(prompts, [sp(i) for i in range(6)])
    mixed = llm.generate(prompts, [sp(0, allowed_token_ids=allowed), sp(1, logit_bias={123: 100.0}), sp(2),
                                   sp(3), sp(4, logit_bias={5: 40.0, 6: -100.0}, allowed_token_ids=[5, 6, 8]),
                                   sp(5, allowed_token_ids=[42])])
    assert all(t in allowed for t in mixed[0].token_ids) and len(mixed[0].token_ids) == 8
    assert mixed[1].token_ids == [123] * 8
    assert mixed[4].token_ids == [5] * 8  # +40 beats anything the tiny model gives token 8; 6 is at -100
    assert mixed[5].token_ids == [42] * 8
    for i in (2, 3):
        assert mixed[i].token_ids == plain[i].token_ids
