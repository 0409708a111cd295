"""The batch job end to end on a GPU: CUDA kernels, CUDA graphs and pipelined decode behind the real CLI."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_generate_on_gpu_with_resume(tmp_path):
    from checkpoints import make_checkpoint
    from test_cli_support import PROMPTS, cli, read_jsonl

    model = make_checkpoint(tmp_path / "m", "qwen3", hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64,
                            dtype="bfloat16")
    src = tmp_path / "in.jsonl"
    lines = [json.loads(x) for x in (PROMPTS / "examples.jsonl").read_text().splitlines()]
    lines += [{"id": f"n{i}", "prompt": "paged attention " * (i + 1), "max_tokens": 20 + i} for i in range(40)]
    lines.insert(3, {"id": "bad", "prompt": 7})
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", src, "-o", out, "--model", model, "--device", "cuda", "--temperature", "0",
            "--max-tokens", "24", "--return-token-ids"]
    r = cli(args, cwd=tmp_path)
    assert r.exit_code == 1, r.stderr  # one bad line
    full = read_jsonl(out)
    assert len(full) == len(lines)
    good = [x for x in full if "error" not in x]
    assert len(good) == len(lines) - 1 and all(x["usage"]["completion_tokens"] >= 1 for x in good)
    assert all(len(x["token_ids"]) == x["usage"]["completion_tokens"] for x in good)
    # a cut-short run resumes to the same result
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:10]))
    r2 = cli(args + ["--resume"], cwd=tmp_path)
    assert r2.exit_code == 1
    again = {x["id"]: x.get("text") for x in read_jsonl(out)}
    assert again == {x["id"]: x.get("text") for x in full}
