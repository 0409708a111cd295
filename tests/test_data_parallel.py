"""Data parallelism on the CPU: 2 reference-backend workers give the same outputs as one engine."""
from __future__ import annotations

import random

from checkpoints import make_checkpoint
from flashgen import LLM, EngineConfig, SamplingParams
from flashgen.engine.data_parallel import DataParallelLLM


def test_dp2_matches_one_engine_greedy_and_seeded(tmp_path):
    path = str(make_checkpoint(tmp_path, "llama", hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32,
                               num_layers=1))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in range(6)] + \
          [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=15, ignore_eos=True) for _ in range(6)]
    one = LLM(model=path, device="cpu", dtype="float32").generate(prompts, sps)
    dp = DataParallelLLM(EngineConfig(model=path, device="cpu", dtype="float32"), 2)
    try:
        two = dp.generate(prompts, sps)
        assert len(set(dp._load)) >= 1 and dp.stats.generated_tokens == sum(len(o.token_ids) for o in two)
    finally:
        dp.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert [o.text for o in two] == [o.text for o in one]
