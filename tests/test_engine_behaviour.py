"""Scheduler, cache and sampling behaviour of the engine on a tiny random checkpoint (CPU)."""
from __future__ import annotations

import random

import pytest

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_heads=4, num_kv_heads=1, head_dim=32))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=model_dir, device="cpu", dtype="float32")


def rand_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_greedy_batch_invariance(llm):
    rng = random.Random(7)
    batch = rand_prompts([rng.choice([1, 2, 15, 16, 17, 33, 97, 200]) for _ in range(37)], seed=8)
    together = llm.generate(batch, GREEDY)
    for i in (0, 5, 36):
        alone = llm.generate([batch[i]], GREEDY)[0]
        assert alone.token_ids == together[i].token_ids


def test_seeded_sampling_batch_invariance(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, ignore_eos=True, seed=1234)
    target = rand_prompts([40], seed=9)[0]
    others = rand_prompts([5, 77, 130, 3], seed=10)
    alone = llm.generate([target], sp)[0].token_ids
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)] * 2 + [sp]
                         + [SamplingParams(temperature=0, max_tokens=5)] * 2)[2].token_ids
    assert alone == mixed
    other_seed = llm.generate([target], SamplingParams(**{**_kw(sp), "seed": 4321}))[0].token_ids
    assert other_seed != alone  # the seed matters: 20 tokens from a ~50-way choice never all agree by chance


def _kw(sp: SamplingParams) -> dict:
    return {k: getattr(sp, k) for k in ("temperature", "top_p", "top_k", "max_tokens", "ignore_eos", "seed")}


def test_preemption_with_tiny_cache_loses_nothing(model_dir, llm):
    prompts = rand_prompts([50, 60, 45, 70, 33, 52, 64, 40], seed=11)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = llm.generate(prompts, sp)
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16  # k+v, 2 layers, 1 kv head, d=32, fp32, 16 tokens
    small = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, kv_cache_gb=12 * block_bytes / 2**30)
    assert small.engine.runner.num_blocks == 12
    outs = small.generate(prompts, sp)
    assert small.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_admission_reserves_what_running_sequences_will_grow_by(model_dir, llm):
    """With max_tokens known (ignore_eos), a prompt waits until the cache also holds what the running sequences
    will still write: no preemption, where admitting by prompt blocks alone (the old policy) preempts; the same
    tokens either way."""
    prompts = rand_prompts([30, 20, 25, 35, 28, 22, 31, 26], seed=13)
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = llm.generate(prompts, sp)
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16
    runs = {}
    for ratio in (None, 0.0):
        small = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16,
                    kv_cache_gb=24 * block_bytes / 2**30)
        if ratio is not None:
            small.engine.scheduler.reserve_ratio = ratio
        outs = small.generate(prompts, sp)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        runs[ratio] = small.stats.preemptions
    assert runs[None] == 0 and runs[0.0] > 0, runs


def _prefill_starts(eng) -> list[tuple[int, int, int, int]]:
    """Record each prefill step the scheduler of LLM `eng` starts: (prompts in it, free slots before it, prompts
    waiting before it, how many steps were scheduled before it)."""
    sched, seen, calls = eng.engine.scheduler, [], [0]
    launch = sched.schedule

    def schedule():
        free, waiting = sched.max_num_seqs - len(sched.running), len(sched.waiting)
        batch = launch()
        if batch is not None and batch.is_prefill:
            seen.append((len(batch.seqs), free, waiting, calls[0]))
        calls[0] += batch is not None
        return batch

    sched.schedule = schedule
    return seen


def test_admission_held_for_free_slots_batches_prompts_and_keeps_tokens(model_dir, llm, monkeypatch):
    """Beside running sequences, waiting prompts start only once N slots are free (or as many as are waiting): fewer,
    larger prefill steps, the same tokens. N is a quarter of max_num_seqs unless FLASHGEN_ADMIT_MIN_FREE says
    otherwise; 0 admits into every free slot (the old policy)."""
    from flashgen.engine.scheduler import admit_min_free

    rng = random.Random(21)
    prompts = rand_prompts([rng.randint(5, 40) for _ in range(24)], seed=22)
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(2, 12), ignore_eos=True) for _ in prompts]
    ref = llm.generate(prompts, sps)
    sizes = {}
    for n in ("0", "4", None):
        if n is None:
            monkeypatch.delenv("FLASHGEN_ADMIT_MIN_FREE", raising=False)
        else:
            monkeypatch.setenv("FLASHGEN_ADMIT_MIN_FREE", n)
        eng = LLM(model=model_dir, device="cpu", dtype="float32", max_num_seqs=8)
        assert eng.engine.scheduler.admit_min_free == (2 if n is None else int(n))  # default: 8 // 4
        seen = _prefill_starts(eng)
        outs = eng.generate(prompts, sps)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        sizes[n] = seen
    for n, need in (("4", 4), (None, 2)):
        assert sizes[n][0][0] == 8  # nothing running: the first step fills every slot
        # held back: each later prefill step starts with at least N free slots, or every waiting prompt fitting
        assert all(free >= min(need, waiting) for _, free, waiting, _ in sizes[n][1:]), sizes[n]
        assert len(sizes[n]) < len(sizes["0"])  # fewer prefill steps than admitting into every free slot
    assert any(k < 2 for k, _, _, _ in sizes["0"][1:])  # where admitting at once starts steps of a single prompt
    for bad in ("-1", "few"):
        monkeypatch.setenv("FLASHGEN_ADMIT_MIN_FREE", bad)
        with pytest.raises(ValueError, match="FLASHGEN_ADMIT_MIN_FREE must be a whole number"):
            admit_min_free(8)


def test_admission_not_held_while_filling_or_for_long(model_dir, monkeypatch):
    """The hold-back never slows a batch that is filling (each prefill step spends its whole token budget: long
    prompts), and slots left free long enough (HOLD_STEPS * N slot-steps) admit anyway: lines that finish rarely."""
    from flashgen.engine.scheduler import HOLD_STEPS

    monkeypatch.setenv("FLASHGEN_ADMIT_MIN_FREE", "4")
    long_prompts = rand_prompts([64] * 12, seed=23)
    eng = LLM(model=model_dir, device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=128)
    seen = _prefill_starts(eng)
    eng.generate(long_prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    # the first 8 prompts fill the batch two to a full step of 128 tokens, in the first four steps, although only 2
    # slots are free before the fourth
    assert [(k, free, before) for k, free, _, before in seen[:4]] == [(2, 8, 0), (2, 6, 1), (2, 4, 2), (2, 2, 3)]
    # one slow line among quick ones: a freed slot does not wait for 4 to free up for more than the bound
    sched = eng.engine.scheduler
    steps = []
    launch = sched.schedule

    def schedule():
        batch = launch()
        steps.append((batch is not None and batch.is_prefill, sched.held_slot_steps))
        return batch

    sched.schedule = schedule
    sps = [SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)] * 7 + [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)] + [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * 4
    eng.generate(rand_prompts([10] * 12, seed=24), sps)
    held = [h for is_prefill, h in steps if not is_prefill]
    assert max(held) >= HOLD_STEPS * 4 - 3  # it waited up to the bound (slot-steps grow by at most 3 a step) ...
    assert max(held) < HOLD_STEPS * 4 + 8   # ... and no longer


def test_admission_not_held_where_the_cache_binds(model_dir, monkeypatch):
    """A cache too small for N more prompts like the head: the slots are not what limits admission, so it is not
    held (waiting for slots would leave freed blocks idle): the same prefill steps as admitting at once."""
    rng = random.Random(25)
    prompts = rand_prompts([rng.randint(20, 40) for _ in range(16)], seed=26)
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(5, 40), ignore_eos=True) for _ in prompts]
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16  # k+v, 2 layers, 1 kv head, d=32, fp32, 16 tokens
    starts, tokens = {}, {}
    for n in ("0", "6"):
        monkeypatch.setenv("FLASHGEN_ADMIT_MIN_FREE", n)
        eng = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, max_num_seqs=8,
                  kv_cache_gb=16 * block_bytes / 2**30)  # ~4 sequences' worth of blocks for 8 slots
        seen = _prefill_starts(eng)
        tokens[n] = [o.token_ids for o in eng.generate(prompts, sps)]
        starts[n] = seen
    assert tokens["6"] == tokens["0"]
    assert starts["6"] == starts["0"]
    # prompts started beside running ones with fewer than 6 slots free: a hold for slots alone would have waited
    assert any(free < 6 for _, free, waiting, _ in starts["0"][1:] if waiting >= 6), starts["0"]


def test_chunked_prefill_matches_whole_prefill(model_dir, llm):
    prompts = rand_prompts([300, 5, 129], seed=12)
    chunked = LLM(model=model_dir, device="cpu", dtype="float32", max_num_batched_tokens=64)
    a = chunked.generate(prompts, GREEDY)
    b = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


@pytest.mark.parametrize("block_size", [16, 64])
def test_prefix_cache_hits_and_same_tokens(model_dir, block_size):
    shared = rand_prompts([100], seed=13)[0]
    prompts = [shared + p for p in rand_prompts([10, 20, 30], seed=14)]
    on = LLM(model=model_dir, device="cpu", dtype="float32", enable_prefix_caching=True, block_size=block_size)
    off = LLM(model=model_dir, device="cpu", dtype="float32", enable_prefix_caching=False, block_size=block_size)
    first = on.generate(prompts[:1], GREEDY)
    later = on.generate(prompts[1:], GREEDY)
    # the full blocks of the shared 100 tokens: 6 of 16, or 1 of 64
    assert all(o.num_cached_tokens == 100 // block_size * block_size for o in later)
    ref = off.generate(prompts, GREEDY)
    assert [o.token_ids for o in first + later] == [o.token_ids for o in ref]
    again = on.generate(prompts[:1], GREEDY)[0]  # whole prompt cached: its last token is still recomputed
    assert again.token_ids == first[0].token_ids and again.num_cached_tokens > 0


def test_max_tokens_and_min_tokens_and_eos(llm):
    ids = rand_prompts([12], seed=15)[0]
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert len(free.token_ids) == 40 and free.finish_reason == "length"
    # make the 5th greedy token a stop token: generation ends there, token included, reason "stop"
    stop_tok = free.token_ids[4]
    first_hit = free.token_ids.index(stop_tok)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == free.token_ids[:first_hit + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens masks stop tokens until reached
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, min_tokens=first_hit + 3,
                                             stop_token_ids=[stop_tok]))[0]
    assert len(out.token_ids) >= first_hit + 3
    assert stop_tok not in out.token_ids[:first_hit + 2]


def test_tokens_that_skip_the_stop_check_end_requests_as_checked_ones_do(llm, monkeypatch):
    """The engine skips check_stop and the detokenizer for a token that is no stop id, not the last and builds no
    text (detokenizer.quick_stop); every request ends as it does with every token checked: stop ids before and
    after min_tokens, EOS at temperature 3 with and without ignore_eos, max_tokens, the context's end, stop
    strings, logprobs, n samples."""
    from flashgen.engine import detokenizer

    prompts = rand_prompts([12, 5, 30, 1, 17, 64], seed=22)
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    params = []
    for i, o in enumerate(free):
        stop_tok = o.token_ids[3 + i]
        params += [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok]),
                   SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok], min_tokens=6 + i),
                   SamplingParams(temperature=3.0, max_tokens=40 + i, seed=i, n=2),
                   SamplingParams(temperature=3.0, max_tokens=40, seed=i, ignore_eos=True, logprobs=2 * (i % 2)),
                   SamplingParams(temperature=0, max_tokens=None, stop=[o.text[4:7]] if len(o.text) > 7 else None)]
    batch = [p for p in prompts for _ in range(5)]
    real, quick = detokenizer.quick_stop, []

    def counted(seq, eos_ids, max_model_len):
        quick.append(real(seq, eos_ids, max_model_len))
        return quick[-1]

    monkeypatch.setattr(detokenizer, "quick_stop", counted)
    fast = llm.generate(batch, params)
    assert sum(end > 0 for _, end in quick) >= 25  # most sequences took the quick path
    monkeypatch.setattr(detokenizer, "quick_stop", lambda *a: (frozenset(), 0))  # every token checked
    checked = llm.generate(batch, params)
    ends = [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs is not None and len(c.logprobs))
            for o in fast for c in o.outputs]
    assert ends == [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs is not None and len(c.logprobs))
                    for o in checked for c in o.outputs]
    reasons = {e[2] for e in ends}
    assert reasons == {"stop", "length"}


def test_eos_stops_unless_ignored(llm):
    ids = rand_prompts([20], seed=16)[0]
    eos = sorted(llm.engine.eos_ids)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))[0]
    assert len(out.token_ids) == 200
    # sample at high temperature until some seed meets an EOS; with ignore_eos it never stops early
    for seed in range(40):
        o = llm.generate([ids], SamplingParams(temperature=3.0, max_tokens=300, seed=seed))[0]
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in eos and not any(t in eos for t in o.token_ids[:-1])
            ign = llm.generate([ids], SamplingParams(temperature=3.0, max_tokens=300, seed=seed, ignore_eos=True))[0]
            assert ign.token_ids[:len(o.token_ids)] == o.token_ids and len(ign.token_ids) == 300
            return
    pytest.fail("no EOS in 40 samples of 300 tokens at temperature 3")


def test_stop_strings_cross_token_boundaries_and_are_left_out(llm):
    ids = rand_prompts([8], seed=17)[0]
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 12
    stop = text[5:9]  # 4 characters that may span tokens
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"])
    out = llm.generate([ids], sp)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)]


def test_text_is_whole_utf8_and_equals_decode(llm):
    tok = llm.tokenizer
    prompts = rand_prompts([3, 9, 27], seed=18)
    for seed in range(6):
        for o in llm.generate(prompts, SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=seed)):
            assert o.text == tok.decode(o.token_ids)
            o.text.encode("utf-8")  # raises on lone surrogates


def test_text_decoded_at_the_end_equals_the_incremental_text(llm):
    """A request without stop strings is decoded once when it finishes; one with a stop string (here one that never
    matches) token by token, for the stop check. Both must give the same text, byte-level pieces included
    (temperature 1.5: many tokens that split characters), and for every sample of n."""
    prompts = rand_prompts([3, 9, 27], seed=21)
    for seed in range(4):
        plain = SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=seed, n=2)
        watched = SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=seed, n=2,
                                 stop=["\x00never"])
        a, b = llm.generate(prompts, plain), llm.generate(prompts, watched)
        for x, y in zip(a, b, strict=True):
            assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]  # the same samples
            assert [c.text for c in x.outputs] == [c.text for c in y.outputs]
            assert all(c.text for c in x.outputs)


def test_penalties_change_greedy_choice(llm):
    ids = rand_prompts([16], seed=19)[0]
    base = llm.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    rep = llm.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                             repetition_penalty=5.0))[0].token_ids
    freq = llm.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                              frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    assert rep != base and freq != base
    assert len(set(rep)) >= len(set(base)) and len(set(freq)) >= len(set(base))


def test_bad_requests_say_what_to_fix(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("a", "", SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request("b", [1, 10**6], SamplingParams())
    for not_id in (2.5, 3.0, True, "7"):  # refused, never truncated or coerced into another token
        with pytest.raises(ValueError, match=f"token id {not_id!r} is not an integer"):
            llm.add_request("b2", [1, not_id], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        llm.add_request("c", [5] * llm.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_incremental_api_returns_each_request_once(llm):
    prompts = rand_prompts([4, 50, 9], seed=20)
    for i, p in enumerate(prompts):
        llm.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=5 + 10 * i, ignore_eos=True))
    got = []
    while llm.has_unfinished_requests():
        got += [o.request_id for o in llm.step()]
    assert sorted(got) == ["r0", "r1", "r2"] and got[0] == "r0"


def test_prompt_ids_take_integer_types_and_name_the_first_bad_id():
    import numpy as np
    import torch

    from flashgen.engine.engine import prompt_ids

    plain = [5, 0, 9]
    got = prompt_ids(plain, 10)
    assert got.tolist() == plain and got.typecode == "i"  # a copy: the caller's list is not the sequence's
    got.append(1)
    assert plain == [5, 0, 9]
    assert prompt_ids(np.array([1, 2, 3]), 10).tolist() == [1, 2, 3]
    assert prompt_ids(torch.tensor([4, 5]), 10).tolist() == [4, 5]
    assert prompt_ids((6, 7), 10).tolist() == [6, 7] and len(prompt_ids([], 10)) == 0
    with pytest.raises(ValueError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        prompt_ids([1, 10, -1], 10)  # the first bad one in order, not the extreme
    with pytest.raises(ValueError, match="token id -1 is outside"):
        prompt_ids([1, -1, 10], 10)
    with pytest.raises(ValueError, match="outside"):
        prompt_ids([2**70], 10)
    with pytest.raises(ValueError, match="not an integer"):
        prompt_ids([1, np.float32(2)], 10)
    # an int32 array (a job's prepared prompt) is checked without int objects and passed on as it is; the
    # Sequence copies it, so the caller's array is not the sequence's
    from array import array

    from flashgen.engine.sequence import Sequence

    arr = array("i", [5, 0, 9])
    assert prompt_ids(arr, 10) is arr
    seq = Sequence("s", None, arr, SamplingParams(), 16, 0)
    seq.token_ids.append(3)
    assert list(arr) == [5, 0, 9] and seq.token_ids.tolist() == [5, 0, 9, 3] and seq.output_token_ids == [3]
    with pytest.raises(ValueError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        prompt_ids(array("i", [1, 10, -1]), 10)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        prompt_ids(array("i", [1, -1, 10]), 10)
    assert prompt_ids(array("q", [1, 2]), 10).tolist() == [1, 2]  # other integer arrays: as a list would
    with pytest.raises(ValueError, match=r"token id 4294967296 is outside"):
        prompt_ids(array("q", [1, 2**32]), 10)
    with pytest.raises(ValueError, match="not an integer"):
        prompt_ids([1, True], 10)


def test_running_reserve_is_the_growth_of_the_running_sequences():
    """The look-ahead admission's reserve (inlined for speed) is the reserve ratio times the sum of each running
    sequence's _growth: max_tokens or the context, whichever ends first, placeholders counted, never below 0."""
    from flashgen.config import EngineConfig
    from flashgen.engine.scheduler import Scheduler
    from flashgen.engine.sequence import PLACEHOLDER, Sequence

    rng = random.Random(31)
    sched = Scheduler(EngineConfig(model="unused", max_num_seqs=64, block_size=16), 10_000, 700)
    sched.reserve_ratio = 0.7
    for i in range(60):
        mt = rng.choice([None, 1, 5, 16, 17, 100, 1000])
        seq = Sequence(str(i), None, [3] * rng.randint(1, 690), SamplingParams(max_tokens=mt), 16, 0)
        seq.token_ids.extend([PLACEHOLDER] * rng.randint(0, 3))
        sched.running.append(seq)
    want = 0.7 * sum(sched._growth(s) for s in sched.running)
    assert want > 0
    assert sched._running_reserve() == pytest.approx(want)
    for seq in sched.running:  # the cached end is the uncached one
        assert seq.end_blocks == -(-sched._end(seq) // 16)
