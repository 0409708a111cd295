"""Logprobs and prompt logprobs from the engine, against the log-softmax of the same model's logits computed
independently (LLM.prompt_logits: one full forward of the whole sequence), on the CPU in float32."""
from __future__ import annotations

import math
import random

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams

TOL = 2e-4  # float32, same model: the paged step-by-step path against one full forward


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("lp"), "qwen3", hidden_size=64, num_heads=2,
                               num_kv_heads=1, head_dim=32, num_layers=2))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)


def reference(llm, ids: list[int]) -> torch.Tensor:
    """(len, vocab) log-softmax of the logits at every position of `ids`."""
    return torch.log_softmax(llm.prompt_logits(ids).double(), -1)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(1, 70))] for _ in range(n)]


def check_generated(llm, out, k: int) -> None:
    ids = out.prompt_token_ids + out.token_ids
    ref = reference(llm, ids[:-1])
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(out.prompt_token_ids) - 1 + j]
        assert tok in entry
        assert math.isclose(entry[tok].logprob, row[tok].item(), abs_tol=TOL)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(k)
        for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            if t in entry and t != tok:
                assert math.isclose(entry[t].logprob, v, abs_tol=TOL) and entry[t].rank == r + 1
        assert len([t for t in entry if t != tok]) <= k and len(entry) >= k
        total += entry[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generated_logprobs_match_the_models_log_softmax(llm, temperature):
    sps = [SamplingParams(temperature=temperature, seed=i, max_tokens=12, ignore_eos=True, logprobs=k)
           for i, k in enumerate([0, 1, 5, 20] * 3)]
    outs = llm.generate(prompts(len(sps)), sps)
    for out, sp in zip(outs, sps, strict=True):
        check_generated(llm, out, sp.logprobs)
        if temperature == 0:
            assert all(e[t].rank == 1 for t, e in zip(out.token_ids, out.logprobs, strict=True))
        assert all(e[t].decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
                   for t, e in zip(out.token_ids, out.logprobs, strict=True))


def test_logprobs_off_gives_none_and_neighbours_unchanged(llm):
    ps = prompts(6, seed=3)
    plain = llm.generate(ps, SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    mixed = llm.generate(ps, [SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True,
                                             logprobs=3 if i % 2 else None) for i in range(6)])
    for i, (a, b) in enumerate(zip(plain, mixed, strict=True)):
        assert a.token_ids == b.token_ids and a.logprobs is None and a.prompt_logprobs is None
        assert (b.logprobs is not None) == bool(i % 2)


def test_processed_logprobs_are_of_the_distribution_sampled_from(llm):
    sp = SamplingParams(temperature=0.7, top_k=5, seed=11, max_tokens=8, ignore_eos=True, logprobs=5,
                        logprobs_mode="processed_logprobs")
    [out] = llm.generate([[5, 6, 7, 8]], sp)
    ids = out.prompt_token_ids + out.token_ids
    logits = llm.prompt_logits(ids[:-1]).double()
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = logits[len(out.prompt_token_ids) - 1 + j] / 0.7
        kth = row.topk(5).values[-1]
        lp = torch.log_softmax(row.masked_fill(row < kth, -math.inf), -1)
        assert math.isclose(entry[tok].logprob, lp[tok].item(), abs_tol=TOL)
        assert sum(math.exp(e.logprob) for e in entry.values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("chunk", [16384, 32])
def test_prompt_logprobs_match_across_chunks_slices_and_cache_hits(model_dir, monkeypatch, chunk):
    from flashgen.engine import model_runner

    monkeypatch.setattr(model_runner, "PROMPT_LP_ROWS", 24)  # several slices per chunk
    llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, max_num_batched_tokens=chunk)
    rng = random.Random(5)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    ps = [shared + [rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(4)] + [[9]]
    llm.generate(ps[:1], SamplingParams(max_tokens=2))  # the shared prefix is now in the prefix cache
    outs = llm.generate(ps, [SamplingParams(max_tokens=3, prompt_logprobs=k) for k in (0, 2, 5, 20, 3)])
    for out, k in zip(outs, (0, 2, 5, 20, 3), strict=True):
        ids = out.prompt_token_ids
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[0] is None
        if len(ids) > 1:
            ref = reference(llm, ids)
        for p in range(1, len(ids)):
            entry = out.prompt_logprobs[p]
            assert entry is not None and ids[p] in entry
            assert math.isclose(entry[ids[p]].logprob, ref[p - 1][ids[p]].item(), abs_tol=TOL)
            assert len(entry) >= k


def test_logprobs_survive_pipelining_and_preemption(model_dir):
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16
    small = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, kv_cache_gb=12 * block_bytes / 2**30)
    small.engine.runner.enable_pipelining()
    big = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)
    ps = prompts(8, seed=9)
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True, logprobs=2, prompt_logprobs=1)
           for i in range(8)]
    a, b = small.generate(ps, sps), big.generate(ps, sps)
    assert small.stats.preemptions > 0
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and len(x.logprobs) == len(x.token_ids)
        for ex, ey in zip(x.logprobs, y.logprobs, strict=True):
            assert ex.keys() == ey.keys()
            assert all(math.isclose(ex[t].logprob, ey[t].logprob, abs_tol=TOL) for t in ex)
        assert len(x.prompt_logprobs) == len(x.prompt_token_ids)


def packed_rows(n: int, seed: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(logits (n, 50), pack_logprobs of them with top k, the n chosen tokens) from a seeded generator."""
    from flashgen.engine.logprobs import pack_logprobs

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 50, generator=g, dtype=torch.float64).float()
    tokens = torch.randint(0, 50, (n,), generator=g)
    return logits, pack_logprobs(logits, tokens, k), tokens.tolist()


def test_a_packed_block_reads_back_as_its_rows_appended_one_by_one():
    import pickle

    from flashgen.engine.logprobs import LogprobsList

    logits, packed, tokens = packed_rows(40, seed=1)
    text = "<{}>".format
    rows = LogprobsList([None])
    for row, t in zip(packed.tolist(), tokens, strict=True):
        rows.append_row(row, t, 2, text)
    block = LogprobsList([None])
    block.extend_packed(packed[:25], tokens[:25], 2, text)  # a host tensor, then a numpy array
    block.extend_packed(packed[25:].numpy(), tokens[25:], 2, text)
    packed.fill_(0.0)  # the list holds its own copy of the rows
    assert len(block) == len(rows) == 41 and block[0] is None
    for i in (40, 3, 25, 24, 1):  # read out of order: a position is built from its own row
        assert block[i] == rows[i]
    ref = torch.log_softmax(logits.double(), -1)
    for i, t in enumerate(tokens):
        entry = block[i + 1]
        assert list(entry)[0] == t and len(entry) in (2, 3) and entry[t].decoded_token == f"<{t}>"
        assert type(entry[t].logprob) is float and math.isclose(entry[t].logprob, ref[i, t].item(), abs_tol=1e-5)
        assert entry[t].rank == int((ref[i] > ref[i, t]).sum()) + 1
        top = ref[i].topk(2).indices.tolist()
        assert all(entry[u].rank == r + 1 for r, u in enumerate(top) if u != t)
    assert block == rows and block == list(rows) and block != list(rows)[:-1]
    assert block[-1] == rows[40] and block[-41] is None and block[3:30:4] == list(rows)[3:30:4]
    assert repr(block) == repr(list(rows))
    with pytest.raises(IndexError):
        block[-42]
    with pytest.raises(IndexError):
        block[41]
    back = pickle.loads(pickle.dumps(block))
    assert type(back) is list and back == list(rows)


def test_a_chunk_recomputed_after_a_preemption_adds_nothing_twice(llm):
    """The engine appends only a chunk's rows past the end of the list: after a preemption the prompt is computed
    again from its first uncached block, and the rows of positions already there are dropped."""
    from flashgen.engine.logprobs import unpack_logprobs
    from flashgen.engine.sequence import Sequence
    from flashgen.engine.token_slots import SampledTokens

    _, packed, ids = packed_rows(30, seed=2)
    seq = Sequence("r", None, ids, SamplingParams(prompt_logprobs=2), 16, 0)
    _, other, _ = packed_rows(30, seed=3)  # what a recomputation would give: differs, so a second append shows

    def process(pos: int, rows: torch.Tensor) -> None:
        llm.engine._process(SampledTokens([], None, False, prompt_lp=[(seq, pos, rows)]), None)

    process(0, packed[:16])   # positions 0..15 predict tokens 1..16
    process(8, other[8:20])   # recomputed from position 8: only 16..19 are new
    process(0, other[:12])    # nothing new
    process(20, packed[20:29])  # the rest of the prompt (the last position predicts no prompt token)
    text = llm.engine._token_text
    expected = [None] + [unpack_logprobs((other if 16 <= p < 20 else packed)[p].tolist(), ids[p + 1], 2, text)
                         for p in range(29)]
    assert len(seq.prompt_logprobs) == 30 == seq.num_prompt_tokens
    assert seq.prompt_logprobs == expected
    assert expected[9] != unpack_logprobs(other[8].tolist(), ids[9], 2, text)  # the overlap would show


def test_ids_outside_the_vocabulary_are_refused(llm):
    V = llm.engine.spec.vocab_size
    with pytest.raises(ValueError, match="logit_bias: token id"):
        llm.generate([[5]], SamplingParams(logit_bias={V: 1.0}))
    with pytest.raises(ValueError, match="allowed_token_ids: token id"):
        llm.generate([[5]], SamplingParams(allowed_token_ids=[1, V + 3]))
    assert not llm.has_unfinished_requests()


def test_prompt_logits_leave_the_prefix_cache_honest(model_dir):
    """LLM.prompt_logits writes KV blocks 0..: a later request must not hit what those blocks held before."""
    llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)
    ps = prompts(4, seed=21)
    ps = [p + [7] * 40 for p in ps]  # whole blocks, so a cache hit is possible
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate(ps, sp)
    llm.prompt_logits(list(range(3, 200)))
    again = llm.generate(ps, sp)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert any(o.num_cached_tokens == 0 for o in again)  # the overwritten blocks were not served


def test_logprobs_equal_hf_transformers_log_softmax(model_dir):
    """The issue's oracle: HF transformers' own forward (fp32, CPU) of prompt + generated tokens."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)
    ps = prompts(4, seed=13)
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=5)
           for i in range(4)]
    for out in llm.generate(ps, sps):
        ids = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        n = len(out.prompt_token_ids)
        for p in range(1, n):
            entry = out.prompt_logprobs[p]
            assert abs(entry[ids[p]].logprob - ref[p - 1, ids[p]].item()) <= 1e-4
            top = set(ref[p - 1].topk(5).indices.tolist())
            assert {t for t, e in entry.items() if e.rank <= 5} == top  # top-5 sets equal (random logits: no ties)
        for j, tok in enumerate(out.token_ids):
            entry = out.logprobs[j]
            assert abs(entry[tok].logprob - ref[n - 1 + j, tok].item()) <= 1e-4
            assert {t for t, e in entry.items() if e.rank <= 5} >= set(ref[n - 1 + j].topk(5).indices.tolist())


def test_chat_renders_the_template_and_generates(llm):
    conv = [{"role": "user", "content": "Name a colour."}]
    [one] = llm.chat(conv, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    text = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    assert one.prompt == text
    [same] = llm.generate([llm.tokenizer.encode(text, add_special_tokens=False)],
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert one.token_ids == same.token_ids
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "More."}]],
                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(two) == 2 and two[0].token_ids == one.token_ids[:4]
