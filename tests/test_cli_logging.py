"""The `flashgen` logger: the CLI sends its records to stderr (INFO and up; warnings only when quiet), never to
stdout, where results go; the library installs no handler of its own."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from test_cli_support import FAST, cli, proc, proc_env, tiny_model

NOTE = "a note from the engine"
SMALL_KV = ["--kv-cache-gb", "0.0001"]  # 384 tokens of the tiny model: the engine warns that it caps max_model_len
CAPPED = "flashgen: warning: KV cache holds 384 tokens; max_model_len capped from 2048"


@pytest.fixture
def engine_note(monkeypatch):
    """The engine logs an INFO record as the model loads (its own, the KV cache plan, is logged on a GPU only)."""
    import flashgen.jobs.generate as generate

    load = generate._load_model

    def load_and_note(*args, **kwargs):
        logging.getLogger("flashgen.engine.model_runner").info(NOTE)
        return load(*args, **kwargs)

    monkeypatch.setattr(generate, "_load_model", load_and_note)


def run(tmp_path, *extra):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hello"}\n')
    r = cli(["generate", src, "--model", tiny_model(), *FAST, *extra], cwd=tmp_path)  # results on stdout
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [1]
    return r


def test_info_records_go_to_stderr_and_quiet_keeps_warnings_only(tmp_path, engine_note):
    r = run(tmp_path, *SMALL_KV)
    assert f"flashgen: {NOTE}\n" in r.stderr and CAPPED in r.stderr
    r = run(tmp_path, *SMALL_KV, "--quiet")
    assert NOTE not in r.stderr and CAPPED in r.stderr
    (tmp_path / "flashgen.toml").write_text("[job]\nquiet = true\n")  # quiet from a config file: the same
    r = run(tmp_path, *SMALL_KV)
    assert NOTE not in r.stderr and CAPPED in r.stderr
    assert NOTE in run(tmp_path, "--no-quiet").stderr


def test_records_leave_stdout_to_the_results(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hello"}\n{"id": 2, "prompt": "bye"}\n')
    p = proc(["generate", "in.jsonl", "--model", tiny_model(), *FAST, *SMALL_KV], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(line)["id"] for line in p.stdout.splitlines()) == [1, 2]
    assert CAPPED in p.stderr.decode()


def test_the_library_installs_no_handler(tmp_path):
    code = ("import logging\nfrom flashgen import LLM\n"
            f"LLM({tiny_model()!r}, device='cpu', kv_cache_gb=0.0001)\n"
            "assert not logging.getLogger('flashgen').handlers and not logging.getLogger().handlers\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=proc_env(), capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    # with no handler anywhere Python's last resort still prints a warning, bare, to stderr
    assert b"KV cache holds 384 tokens" in p.stderr and b"flashgen: warning" not in p.stderr and not p.stdout


@pytest.mark.gpu
def test_the_kv_cache_plan_is_logged_on_a_gpu(tmp_path):
    from checkpoints import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "qwen3", hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64,
                            dtype="bfloat16")  # a head size the CUDA kernels take
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hello"}\n')
    args = ["generate", src, "--model", model, "--device", "cuda", "--max-tokens", "4"]
    r = cli(args, cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "flashgen: activation peak" in r.stderr and "KV cache gets" in r.stderr and "KV cache" not in r.stdout
    assert "activation peak" not in cli([*args, "--quiet"], cwd=tmp_path).stderr
