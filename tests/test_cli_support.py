"""Shared helpers for the CLI / jobs tests: a tiny real checkpoint, CLI runners, and a fake engine.

Not a conftest (other engineers own that): the test modules import what they need from here. The checkpoint
is made once per test process (hidden 64, 1 layer) so every CLI test runs the real engine in well under a second.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"


@functools.cache
def tiny_model(vocab_size: int = 512, max_position_embeddings: int = 2048) -> str:
    from checkpoints import make_checkpoint

    root = tempfile.mkdtemp(prefix="flashgen-cli-test-")
    atexit.register(shutil.rmtree, root, True)
    make_checkpoint(Path(root) / "tiny", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                    intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)
    return str(Path(root) / "tiny")


# Flags that keep the tiny CPU runs fast and deterministic.
FAST = ["--device", "cpu", "--temperature", "0", "--max-tokens", "4", "--max-num-seqs", "16"]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def cli(args: list[str], cwd: str | Path, input: str | bytes | None = None) -> Result:
    """Run the real CLI in-process (typer's CliRunner) from `cwd`, so no ./flashgen.toml leaks in from the repo."""
    from flashgen.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
    finally:
        os.chdir(old)
    return Result(r.exit_code, r.stdout, r.stderr)


def gen(tmp: Path, lines, *extra, name: str = "in.jsonl", model: str | None = None) -> tuple[Result, list[dict]]:
    """Write `lines` (dicts or raw str/bytes) to a file, run `generate` on it, return the result and the records."""
    src = tmp / name
    with open(src, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    out = tmp / (name + ".out")
    if out.exists():
        out.unlink()
    r = cli(["generate", src, "-o", out, "--model", model or tiny_model(), *FAST, *extra], cwd=tmp)
    return r, read_jsonl(out) if out.exists() else []


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def proc_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def proc(args: list[str], cwd: str | Path, **kw) -> subprocess.CompletedProcess:
    """Run `python -m flashgen` as a separate process (for stdout purity and signals)."""
    return subprocess.run([sys.executable, "-m", "flashgen", *map(str, args)], cwd=cwd, env=proc_env(),
                          capture_output=True, timeout=120, **kw)


def wait_for_lines(p: subprocess.Popen, out, n: int, timeout: float = 90) -> None:
    """Wait until the running job `p` has written `n` lines to `out` (it must not exit first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        assert p.poll() is None, f"exited early: {p.returncode} {p.stderr.read().decode()}"
        time.sleep(0.005)
    p.kill()
    raise AssertionError("no output in time")


# Lines of each format, with a short prompt, for the parsing tests
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"


def native(**fields) -> dict:
    return {"id": "n", "prompt": "hi", **fields}


def chat(**body) -> dict:
    return {"custom_id": "c", "method": "POST", "url": CHAT_URL,
            "body": {"messages": [{"role": "user", "content": "hi"}], **body}}


def completion(**body) -> dict:
    return {"custom_id": "m", "method": "POST", "url": COMPLETIONS_URL, "body": {"prompt": "hi", **body}}


class FakeTokenizer:
    vocab_size = 512
    eos_token_ids = [0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + list(text.encode())  # byte ids: < 256, fast

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>" * add_generation_prompt


class FakeLLM:
    """The engine's incremental API, minus the model: request i finishes after `steps(i)` steps with one token
    per step. Fast enough to push 100k lines through the job layer in seconds."""

    def __init__(self, max_num_seqs: int = 64, steps=lambda rid: 1, max_model_len: int = 4096):
        from types import SimpleNamespace

        self.tokenizer, self.max_model_len, self.model_name = FakeTokenizer(), max_model_len, "fake"
        self.max_num_seqs, self._steps = max_num_seqs, steps
        self._running: dict[str, list] = {}
        self._waiting: list = []
        self.max_unfinished = 0
        self.stats = SimpleNamespace(prompt_tokens=0, generated_tokens=0, prefill_seconds=0.0, decode_seconds=0.0)

    def add_request(self, request_id, prompt, params) -> None:
        if not prompt:
            raise ValueError("empty prompt")
        self._waiting.append([request_id, prompt, params, self._steps(request_id), []])
        self.max_unfinished = max(self.max_unfinished, self.num_unfinished_requests())

    def step(self):
        from flashgen.outputs import RequestOutput

        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting.pop(0)
            self._running[r[0]] = r
        done = []
        for rid, r in list(self._running.items()):
            r[4].append(7)
            if len(r[4]) >= min(r[3], r[2].max_tokens or 10**9):
                del self._running[rid]
                done.append(RequestOutput(rid, None, list(r[1]), "x" * len(r[4]), list(r[4]), "length"))
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def num_unfinished_requests(self) -> int:
        return len(self._running) + len(self._waiting)


class BrokenLLM(FakeLLM):
    """A FakeLLM whose `fail_at`-th step raises, as an engine failure (CUDA out of memory) would."""

    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.fail_at, self.calls = fail_at, 0

    def step(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory")
        return super().step()


def test_fake_llm_finishes_everything():
    from flashgen.sampling_params import SamplingParams

    llm = FakeLLM(max_num_seqs=2, steps=lambda rid: int(rid) + 1)
    for i in range(4):
        llm.add_request(str(i), [1, 2], SamplingParams(max_tokens=8))
    finished = []
    while llm.has_unfinished_requests():
        finished += [o.request_id for o in llm.step()]
    assert sorted(finished) == ["0", "1", "2", "3"]


def check_engine_choice(model: str | Path, tmp_path: Path, flag: str, good: str, bad: str) -> None:
    """An engine option through the real CLI: a two-line job with `flag good` answers both lines; `flag bad` exits 2
    naming the option and the good choice."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hello"}\n{"id": 2, "prompt": "a b c"}\n')
    r = cli(["generate", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(model), *FAST, flag, good],
            tmp_path)
    assert r.exit_code == 0, r.stderr
    assert [x["id"] for x in read_jsonl(tmp_path / "out.jsonl")] == [1, 2]
    refused = cli(["generate", str(src), "-o", str(tmp_path / "o2.jsonl"), "--model", str(model), *FAST, flag, bad],
                  tmp_path)
    name = flag.lstrip("-").replace("-", "_")
    assert refused.exit_code == 2 and name in refused.stderr and good in refused.stderr
