"""`flashgen info` and `flashgen convert-gguf`: thin commands over flashgen.info and flashgen.gguf_convert."""
from __future__ import annotations

import json
import shutil

from flashgen.jobs.errors import ExitCode
from test_cli_support import cli, proc, tiny_model


def test_info_describes_a_checkpoint(tmp_path):
    r = cli(["info", tiny_model()], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout and "KV cache per token" in r.stdout
    r = cli(["info", tiny_model(), "--memory-gb", "1", "--json"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["num_layers"] == 1 and d["hidden_size"] == 64 and d["kv_cache_tokens"] > 0
    # the 8-bit caches: fp8 one byte per element, int8k one byte plus two float32 scales per token and kv head
    heads = d["num_layers"] * d["num_kv_heads"]
    assert d["kv_bytes_per_token_fp8"] == heads * 2 * d["head_dim"]
    assert d["kv_bytes_per_token_int8k"] == heads * (2 * d["head_dim"] + 8)
    assert d["kv_cache_tokens"] < d["kv_cache_tokens_int8k"] < d["kv_cache_tokens_fp8"]


def test_info_reads_the_checkpoint_as_the_engine_does(tmp_path):
    """describe_model's numbers are load_spec's, and a weights file the loader refuses is refused by info too."""
    from flashgen.info import describe_model
    from flashgen.models.spec import DTYPES, load_spec

    spec = load_spec(tiny_model())
    d = describe_model(tiny_model(), dtype="bf16")
    assert d["dtype"] == "bfloat16" and d["kv_bytes_per_token"] == spec.kv_bytes_per_token(DTYPES["bfloat16"])
    assert (d["num_kv_heads"], d["head_dim"], d["vocab_size"]) == (spec.num_kv_heads, spec.head_dim, spec.vocab_size)
    broken = shutil.copytree(tiny_model(), tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    r = cli(["info", broken], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "model.safetensors: truncated" in r.stderr, r.stderr


def test_info_and_convert_errors_are_fatal_and_named(tmp_path):
    r = cli(["info", str(tmp_path / "nope")], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "nope" in r.stderr
    r = cli(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "missing.gguf" in r.stderr


def test_help_lists_the_commands_and_exit_codes(tmp_path):
    p = proc(["--help"], cwd=tmp_path)
    assert p.returncode == 0 and b"generate" in p.stdout and b"info" in p.stdout and b"convert-gguf" in p.stdout
    p = proc(["generate", "--help"], cwd=tmp_path)
    assert p.returncode == 0 and b"130" in p.stdout and b"--max-errors" in p.stdout
