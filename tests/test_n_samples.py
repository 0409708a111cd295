"""n samples per request: the prompt is prefilled once (the samples share its full blocks), sample i's text
depends only on the request's seed and i, and the request's output holds every sample (vLLM's shape)."""
from __future__ import annotations

import random

import pytest

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams
from flashgen.sampling_params import sample_seed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("n"), "qwen3", hidden_size=64, num_heads=2,
                               num_kv_heads=1, head_dim=32, num_layers=2))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def test_sample_i_is_the_single_request_with_seed_i(llm):
    p = prompt(37)
    [out] = llm.generate([p], SamplingParams(temperature=1.0, seed=7, n=5, max_tokens=12, ignore_eos=True))
    assert [c.index for c in out.outputs] == list(range(5))
    assert (out.text, out.token_ids) == (out.outputs[0].text, out.outputs[0].token_ids)
    singles = llm.generate([p] * 5, [SamplingParams(temperature=1.0, seed=sample_seed(7, i), max_tokens=12,
                                                    ignore_eos=True) for i in range(5)])
    assert [c.token_ids for c in out.outputs] == [o.token_ids for o in singles]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the samples differ from each other
    [fewer] = llm.generate([p], SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in fewer.outputs] == [c.token_ids for c in out.outputs[:2]]  # n changes no sample


@pytest.mark.parametrize("length,chunk", [(200, 16384), (192, 16384), (5, 16384), (300, 64)])
def test_the_prompt_is_prefilled_once(model_dir, length, chunk):
    """Sample 0 computes the prompt (in chunks when it is longer than the token budget); samples 1..7 share its
    blocks, the last one copied, and compute only the last prompt token (whose logits start them)."""
    llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, max_num_batched_tokens=chunk)
    p = prompt(length, seed=1)
    sp = SamplingParams(temperature=1.0, seed=3, n=8, max_tokens=6, ignore_eos=True)
    [out] = llm.generate([p], sp)
    assert llm.stats.prompt_tokens == length + 7
    assert llm.stats.cached_tokens == 7 * (length - 1)
    alone = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, enable_prefix_caching=False)
    singles = alone.generate([p] * 8, [SamplingParams(temperature=1.0, seed=sample_seed(3, i), max_tokens=6,
                                                      ignore_eos=True) for i in range(8)])
    assert [c.token_ids for c in out.outputs] == [o.token_ids for o in singles]


def test_n_with_logprobs_prompt_logprobs_and_a_grammar(llm):
    from flashgen import StructuredOutputsParams

    sp = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=16, logprobs=2, prompt_logprobs=1,
                        structured_outputs=StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))
    [out] = llm.generate([prompt(20, seed=2)], sp)
    assert len(out.prompt_logprobs) == 20 and out.prompt_logprobs[0] is None
    for c in out.outputs:
        assert c.text in ("alpha", "beta", "gamma") and c.finish_reason == "stop"
        assert len(c.logprobs) == len(c.token_ids) and c.cumulative_logprob <= 0


def test_n_under_preemption_gives_the_same_samples(model_dir):
    block_bytes = 2 * 2 * 1 * 32 * 4 * 16
    small = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, kv_cache_gb=10 * block_bytes / 2**30)
    big = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16)
    ps = [prompt(30, seed=s) for s in range(3)]
    sp = SamplingParams(temperature=1.0, seed=9, n=4, max_tokens=24, ignore_eos=True)
    a, b = small.generate(ps, sp), big.generate(ps, sp)
    assert small.stats.preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]


def test_a_refused_request_leaves_no_sample_behind(llm):
    good = SamplingParams(n=4, max_tokens=4)
    with pytest.raises(ValueError):
        llm.generate([[5, 6], []], [good, good])
    assert not llm.has_unfinished_requests()
    [out] = llm.generate([[5, 6]], good)
    assert len(out.outputs) == 4


@pytest.mark.parametrize("n", [0, 129, 2.0])
def test_n_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match="n="):
        SamplingParams(n=n)


def test_fork_shares_all_but_the_last_block_and_needs_one_free():
    from flashgen.engine.block_manager import BlockManager
    from flashgen.engine.sequence import Sequence

    bm = BlockManager(num_blocks=4, block_size=4)
    sp = SamplingParams()
    leader, follower = (Sequence("r", None, list(range(10, 20)), sp, 4, 0, index=i) for i in range(2))
    bm.allocate(leader)  # 10 tokens: 3 blocks
    copies: list[tuple[int, int]] = []
    assert bm.fork(leader, follower, copies)
    assert follower.block_table[:2] == leader.block_table[:2] and follower.block_table[2] != leader.block_table[2]
    assert copies == [(leader.block_table[2], follower.block_table[2])]
    assert [bm.blocks[b].ref_count for b in leader.block_table] == [2, 2, 1]
    third = Sequence("r", None, list(range(10, 20)), sp, 4, 0, index=2)
    assert not bm.fork(leader, third, copies) and len(third.block_table) == 0  # no free block: nothing taken
    bm.free(follower)
    bm.free(leader)
    assert bm.num_free_blocks == 4
