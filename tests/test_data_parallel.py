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
        assert min(dp.dispatched) >= 3 and sum(dp.dispatched) == len(prompts)  # both workers did real work
        assert dp._load == [0, 0] and dp.stats.generated_tokens == sum(len(o.token_ids) for o in two)
    finally:
        dp.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert [o.text for o in two] == [o.text for o in one]


def test_cli_data_parallel_same_lines_errors_resume_and_exit_code(tmp_path):
    """Through the real CLI: --data-parallel 2 writes the same lines as one process (greedy), keeps error
    records and exit code 1, and --resume after a truncated output finishes every id exactly once."""
    from test_cli_support import gen, read_jsonl

    lines = [{"id": f"a{i}", "prompt": f"the quick brown fox {i} " * (i % 7 + 1), "max_tokens": 3 + i % 5}
             for i in range(30)]
    lines.insert(7, {"id": "bad", "prompt": ""})
    r1, one = gen(tmp_path, lines, name="one.jsonl")
    r2, two = gen(tmp_path, lines, "--data-parallel", "2", name="two.jsonl")
    assert r1.exit_code == r2.exit_code == 1
    assert one == two and len(two) == 31
    assert [x["id"] for x in two if "error" in x] == ["bad"]
    # kill-like truncation: keep 10 whole lines and a torn one, then resume with 2 workers
    out = tmp_path / "two.jsonl.out"
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:10]) + text[10][:15])
    from test_cli_support import FAST, cli, tiny_model
    r3 = cli(["generate", tmp_path / "two.jsonl", "-o", out, "--model", tiny_model(), *FAST,
              "--data-parallel", "2", "--resume"], cwd=tmp_path)
    assert r3.exit_code == 1
    done = read_jsonl(out)
    assert sorted(x["id"] for x in done) == sorted(x["id"] for x in one)
    assert {x["id"]: x.get("text") for x in done} == {x["id"]: x.get("text") for x in one}
