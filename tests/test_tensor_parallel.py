"""Tensor parallelism on the CPU (gloo, 2 processes): greedy tokens identical to one process."""
from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams


# kv heads split, and replicated (1 < 2 ranks); int8k: each rank writes and reads its own heads' per-token scales
@pytest.mark.parametrize("heads,kv_heads,kv", [(4, 2, "auto"), (4, 1, "auto"), (4, 2, "int8k")])
def test_tp2_greedy_matches_tp1(tmp_path, heads, kv_heads, kv):
    path = str(make_checkpoint(tmp_path, "qwen3", hidden_size=128, num_heads=heads, num_kv_heads=kv_heads,
                               head_dim=32, vocab_size=511))  # odd vocab: the last lm_head shard is padded
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 17, 97)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    one = LLM(model=path, device="cpu", dtype="float32", kv_cache_dtype=kv).generate(prompts, sp)
    tp = LLM(model=path, device="cpu", dtype="float32", tensor_parallel_size=2, kv_cache_dtype=kv)
    try:
        assert (tp.engine.runner.kv_dtype == torch.int8) == (kv == "int8k")
        two = tp.generate(prompts, sp)
        assert (tp.prompt_logits(prompts[2]) - LLM(model=path, device="cpu", dtype="float32", kv_cache_dtype=kv)
                .prompt_logits(prompts[2])).abs().max() < 1e-4
    finally:
        tp.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
