"""Pipelined decode (the host reads step n's tokens while step n + 1 runs) gives exactly the tokens, texts and
finish reasons of step-by-step decoding. On the CPU the same code path is forced on."""
from __future__ import annotations

import random

import pytest

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("pipe"), "qwen3", hidden_size=64, num_heads=2,
                               num_kv_heads=1, head_dim=32, num_layers=2))


def _pair(model_dir, **kw):
    plain = LLM(model=model_dir, device="cpu", dtype="float32", **kw)
    piped = LLM(model=model_dir, device="cpu", dtype="float32", **kw)
    piped.engine.runner.enable_pipelining()
    return plain, piped


def _same(a, b):
    assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in a] == \
           [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in b]


def test_pipelined_matches_plain_on_mixed_requests(model_dir):
    plain, piped = _pair(model_dir, block_size=16)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 90))] for _ in range(24)]
    free = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    sps = []
    for i, o in enumerate(free):
        kind = i % 6
        if kind == 0:
            sps.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True))
        elif kind == 1:  # a stop token that does occur
            sps.append(SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[o.token_ids[5]]))
        elif kind == 2 and len(o.text) > 8:  # a stop string that does occur
            sps.append(SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=o.text[3:6]))
        elif kind == 3:
            sps.append(SamplingParams(temperature=1.0, top_p=0.9, max_tokens=35, seed=i))
        elif kind == 4:
            sps.append(SamplingParams(temperature=0.8, max_tokens=30, min_tokens=10, seed=i,
                                      stop_token_ids=[o.token_ids[2]]))
        else:
            sps.append(SamplingParams(temperature=0, max_tokens=33, ignore_eos=True, repetition_penalty=1.3))
    _same(plain.generate(prompts, sps), piped.generate(prompts, sps))


def test_pipelined_with_preemption_and_prefix_hits(model_dir):
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16
    plain, piped = _pair(model_dir, block_size=16, kv_cache_gb=20 * block_bytes / 2**30)
    for llm in (plain, piped):  # admit by prompt blocks alone: the preemption path is what this test checks
        llm.engine.scheduler.reserve_ratio = 0.0
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(rng.randint(1, 30))] for _ in range(10)]
    sp = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)
    a, b = plain.generate(prompts, sp), piped.generate(prompts, sp)
    _same(a, b)
    assert piped.stats.preemptions > 0
    again = piped.generate(prompts[:3], sp)  # prefix blocks registered by pipelined steps are hit and right
    _same(again, a[:3])
    assert all(o.num_cached_tokens >= 32 for o in again)


def test_pipelined_hits_context_limit(model_dir):
    plain, piped = _pair(model_dir, max_model_len=64)
    prompts = [[5] * 50, [7] * 10]
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    a, b = plain.generate(prompts, sp), piped.generate(prompts, sp)
    _same(a, b)
    assert [len(o.prompt_token_ids) + len(o.token_ids) for o in b] == [64, 64]


def test_pipelined_runs_ahead_with_prompts_queued(model_dir):
    """More requests than max_num_seqs: the next step is scheduled before the last decode step's tokens are read,
    a decode step while the running set is full, a prefill of queued prompts when there is room (the unread
    tokens are read while the GPU runs it); a request that ends at an unread token frees its place a step later.
    Outputs are those of step-by-step decoding, stops and limits included."""
    plain, piped = _pair(model_dir, block_size=16, max_num_seqs=4)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(14)]
    free = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    sps = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[o.token_ids[3 + i % 9]]) if i % 3 == 0
           else SamplingParams(temperature=0.9, max_tokens=rng.randint(1, 30), ignore_eos=True, seed=i)
           for i, o in enumerate(free)]
    sched = piped.engine.scheduler
    ahead = []
    decide = sched.can_run_ahead

    def spy():
        ok = decide()
        ahead.append((ok, len(sched.waiting), len(sched.running)))
        return ok

    sched.can_run_ahead = spy
    launch = piped.engine.runner.launch
    prefills_ahead = []

    def spy_launch(batch):
        if batch.is_prefill and piped.engine._last is not None:
            prefills_ahead.append(len(batch.seqs))  # a prefill launched with a decode step's tokens unread
        return launch(batch)

    piped.engine.runner.launch = spy_launch
    _same(plain.generate(prompts, sps), piped.generate(prompts, sps))
    assert any(ok and waiting and running == 4 for ok, waiting, running in ahead), ahead  # decode, set full
    assert prefills_ahead, ahead  # prefills of queued prompts ahead of the unread tokens


def test_pipelined_n_samples_and_prefix_hits_with_prompts_queued(model_dir):
    """n samples fork from sample 0 when its prefill is launched, and queued prompts hit cached prefix blocks,
    while prefills run ahead of unread decode tokens: the same outputs as step-by-step decoding."""
    plain, piped = _pair(model_dir, block_size=16, max_num_seqs=5)
    rng = random.Random(3)
    shared = [rng.randrange(3, 500) for _ in range(37)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(rng.randint(1, 25))] for _ in range(9)]
    sps = [SamplingParams(temperature=0.8, seed=i, n=1 + i % 3, max_tokens=5 + 3 * i, ignore_eos=True)
           for i in range(9)]
    a, b = plain.generate(prompts, sps), piped.generate(prompts, sps)
    assert [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in a] == \
           [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in b]
    assert sum(o.num_cached_tokens for o in b) >= 32 * 4  # later prompts hit the shared blocks


def test_pipelined_reads_a_prefills_tokens_after_launching_the_next_step(model_dir):
    """A prefill step's first tokens go to the device slots like a decode step's: the next step (a prefill of
    more queued prompts, or the decode of the new sequences) is launched before they are read, and the outputs
    are those of step-by-step decoding."""
    plain, piped = _pair(model_dir, block_size=16, max_num_seqs=6, max_num_batched_tokens=64)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(20, 60))] for _ in range(10)]
    sps = [SamplingParams(temperature=0.7, seed=i, max_tokens=1 + i % 7, ignore_eos=True) for i in range(10)]
    engine = piped.engine
    launch = engine.runner.launch
    kinds: list[tuple[bool, bool]] = []  # (this launch is a prefill, the step launched before it was a prefill
    last_prefill = [False]               # whose tokens are still unread)

    def spy_launch(batch):
        kinds.append((batch.is_prefill, last_prefill[0] and engine._last is not None))
        last_prefill[0] = batch.is_prefill
        return launch(batch)

    engine.runner.launch = spy_launch
    _same(plain.generate(prompts, sps), piped.generate(prompts, sps))
    assert any(ahead and prefill for prefill, ahead in kinds), kinds  # a prefill behind an unread prefill
    assert any(ahead and not prefill for prefill, ahead in kinds), kinds  # a decode behind an unread prefill


def test_pipelined_wave_end_launches_the_next_prefill_before_reading_the_wave(model_dir):
    """When every running sequence is held at its limit (a fixed-length job's wave ends), their places go to the
    prompts waiting for them at once: the next prefill is launched before the wave's last tokens are read (they
    end those sequences whatever they are), in the step() that reads them and hands the finished outputs back.
    Outputs are those of step-by-step decoding."""
    plain, piped = _pair(model_dir, block_size=16, max_num_seqs=4)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 30))] for _ in range(12)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = piped.engine
    launch, step = engine.runner.launch, engine.step
    calls: list[tuple[int, int]] = []  # (prefills launched in the call with a decode step's tokens unread, outputs)
    launched: list[bool] = []

    def spy_launch(batch):
        launched.append(batch.is_prefill and engine._last is not None)
        return launch(batch)

    def spy_step():
        launched.clear()
        outs = step()
        calls.append((sum(launched), len(outs)))
        return outs

    engine.runner.launch, engine.step = spy_launch, spy_step
    _same(plain.generate(prompts, sp), piped.generate(prompts, sp))
    # waves of 4: the two wave ends with prompts waiting each launch the next prefill ahead of the unread tokens,
    # then finish the wave's 4 lines
    assert sum(1 for prefills, outs in calls if prefills and outs == 4) == 2, calls
    assert engine.scheduler.held == set()  # every held sequence was finished when its token was read
