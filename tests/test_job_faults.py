"""The line contract under faults: signals at several moments, a closed stdout, one request failing inside the
engine, and checks that must fail before the model loads."""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import FAST, cli, gen, proc_env, read_jsonl, tiny_model

# Lines slow enough that many are in flight when the signal comes (600 tokens each, 8 at a time), yet fast
# to start. A drained run would take seconds more than a stopped one.
BASE = ["--device", "cpu", "--temperature", "0", "--ignore-eos"]
SLOW = [*BASE, "--max-tokens", "600", "--max-num-seqs", "8"]


def write_input(path, n: int, prompt: str = "request number {i}") -> None:
    path.write_text("".join(json.dumps({"id": i, "prompt": prompt.format(i=i)}) + "\n" for i in range(n)))


def start(args, cwd, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flashgen", *map(str, args)], cwd=cwd, env=proc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_until(cond, p: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        assert p.poll() is None, f"exited early: {p.returncode} {p.stderr.read().decode()}"
        time.sleep(0.01)
    p.kill()
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_first_signal_stops_at_once_dropping_lines_in_flight(tmp_path, sig):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 24)
    p = start(["generate", src, "-o", out, "--model", tiny_model(), *SLOW], tmp_path)
    wait_until(out.exists, p)  # the output is opened right before the run loop starts
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert p.returncode == ExitCode.INTERRUPTED, err.decode()
    assert waited < 5, f"took {waited:.1f} s to stop"
    assert re.search(rb"\d+ lines in flight were dropped", err), err.decode()
    data = out.read_bytes()
    assert data == b"" or data.endswith(b"\n")  # only whole lines
    assert len(read_jsonl(out)) < 24
    # resume finishes the job: every id exactly once
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *BASE, "--max-tokens", "3"],
            cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert sorted(rec["id"] for rec in read_jsonl(out)) == list(range(24))


def test_drain_finishes_the_lines_in_flight_first(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 40)
    args = ["generate", src, "-o", out, "--model", tiny_model(), *BASE, "--max-tokens", "60",
            "--max-num-seqs", "4", "--drain"]
    p = start(args, tmp_path)
    wait_until(out.exists, p)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=90)
    m = re.search(rb"finishing (\d+) lines in flight", err)
    assert m, err.decode()
    recs = read_jsonl(out)
    assert all("text" in r for r in recs)
    assert len(recs) >= int(m.group(1))  # every line in flight at the signal was finished and written
    assert p.returncode == (ExitCode.OK if len(recs) == 40 else ExitCode.INTERRUPTED), err.decode()


def test_signal_during_start_up_exits_130_with_nothing_written(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 3)
    p = start(["generate", src, "-o", out, "--model", tiny_model(), *FAST], tmp_path)
    time.sleep(0.4)  # importing torch and loading the model take longer than this
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == ExitCode.INTERRUPTED, err.decode()
    assert b"SIGTERM" in err and b"Traceback" not in err
    assert not out.exists() or out.read_bytes() == b""


def test_closed_stdout_is_a_quiet_exit_141(tmp_path):
    src = tmp_path / "in.jsonl"
    write_input(src, 200)
    p = start(["generate", src, "--model", tiny_model(), *FAST, "--max-num-seqs", "4"], tmp_path)
    first = p.stdout.readline()
    assert json.loads(first)["id"] == 0
    p.stdout.close()  # `| head -1`
    p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert p.returncode == ExitCode.PIPE_CLOSED, err
    assert "Traceback" not in err and "error" not in err.lower()


# ---- one request failing inside the engine -------------------------------------------------------------------
def _job(llm, objs):
    defaults = defaults_from_settings(load_settings(None, {}, "/").sampling)
    defaults.update(temperature=0.0, max_tokens=6, ignore_eos=True)
    sink = io.BytesIO()
    runner = Runner(llm, LineParser(llm.tokenizer, llm.max_model_len, defaults), OrderedWriter(sink), JobStats(),
                    max_in_flight=8)
    status = runner.run(read_lines(io.BytesIO(b"".join(json.dumps(o).encode() + b"\n" for o in objs))), IdSet())
    return status, [json.loads(x) for x in sink.getvalue().splitlines()]


@pytest.fixture(scope="module")
def llm():
    from flashgen import LLM

    return LLM(model=tiny_model(), device="cpu", max_num_seqs=4)


def test_non_finite_logits_fail_only_their_line(llm):
    check_non_finite_logits_fail_only_their_line(llm)


@pytest.mark.gpu
def test_non_finite_logits_fail_only_their_line_on_the_gpu(tmp_path):
    """The CUDA path: the fused sampler (a NaN row picks index 0) and pipelined decode (the fault is read one
    step later, while the next step already runs)."""
    from checkpoints import make_checkpoint
    from flashgen import LLM

    make_checkpoint(tmp_path / "m", hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64,
                    intermediate_size=256, vocab_size=512)
    llm = LLM(model=str(tmp_path / "m"), dtype="bfloat16", kv_cache_gb=0.25, max_num_seqs=4)
    assert llm.engine.runner.backend == "cuda" and llm.engine.runner.async_capable
    check_non_finite_logits_fail_only_their_line(llm)


def check_non_finite_logits_fail_only_their_line(llm):
    poison = llm.tokenizer.encode("zzz poison", add_special_tokens=True)

    def hook(seqs, logits):
        for i, s in enumerate(seqs):
            if s.token_ids[:len(poison)].tolist() == poison and s.num_output_tokens >= 2:
                logits[i] = float("nan")

    llm.engine.runner.on_logits = hook
    try:
        objs = [{"id": i, "prompt": "zzz poison" if i in (3, 7) else f"line {i}"} for i in range(12)]
        status, recs = _job(llm, objs)
    finally:
        llm.engine.runner.on_logits = None
    assert status == "line_errors" and [r["id"] for r in recs] == list(range(12))
    for r in recs:
        if r["id"] in (3, 7):
            assert r["error"]["code"] == "non_finite_logits" and f"line {r['id'] + 1}:" in r["error"]["message"]
        else:
            assert "error" not in r and len(r["text"]) > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == llm.engine.runner.num_blocks  # the failed requests' blocks came back


@pytest.mark.parametrize("stop", [None, ["\x00never"]])
def test_an_exception_serving_one_request_fails_only_its_line(llm, monkeypatch, stop):
    """The detokenizer raises for one line: when its text is decoded at the end (no stop strings) and token by
    token (a stop string to watch for)."""
    from flashgen.engine import detokenizer

    target = llm.tokenizer.encode("explode here", add_special_tokens=True)

    def flaky(real):
        def call(tok, seq, *args):
            if seq.token_ids[:len(target)].tolist() == target:
                raise RuntimeError("detokenizer fault")
            return real(tok, seq, *args)
        return call

    monkeypatch.setattr(detokenizer, "detokenize_step", flaky(detokenizer.detokenize_step))
    monkeypatch.setattr(detokenizer, "decode_output", flaky(detokenizer.decode_output))
    objs = [{"id": i, "prompt": "explode here" if i == 5 else f"line {i}", **({"stop": stop} if stop else {})}
            for i in range(10)]
    status, recs = _job(llm, objs)
    assert status == "line_errors"
    assert [r["id"] for r in recs] == list(range(10))
    assert recs[5]["error"]["code"] == "engine_error" and "detokenizer fault" in recs[5]["error"]["message"]
    assert all("text" in r for i, r in enumerate(recs) if i != 5)


class CountedClose:
    """The job's engine, its close() counted; its `fail_step`th step raises `fail`."""

    def __init__(self, llm, fail_step: int = 0, fail: BaseException | None = None):
        self._llm, self._fail_step, self._fail = llm, fail_step, fail
        self.steps = self.closed = 0

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        self.steps += 1
        if self.steps == self._fail_step:
            raise self._fail or RuntimeError("CUDA error: an illegal memory access was encountered")
        return self._llm.step()

    def close(self) -> None:
        self.closed += 1
        self._llm.close()


@pytest.mark.parametrize("case", ["ok", "bad_line", "max_errors", "engine_failure", "keyboard_interrupt"])
def test_the_job_closes_its_engine_however_it_ends(tmp_path, monkeypatch, case):
    """The engine a job loads is closed when the job ends, whatever the end: its worker processes (data or tensor
    parallel) must not outlive the job, or wait for a garbage collection that may come only at exit."""
    import flashgen.jobs.generate as generate

    engines: list[CountedClose] = []
    load = generate._load_model

    def load_counted(*args, **kwargs):
        fail = {"engine_failure": RuntimeError("CUDA error"), "keyboard_interrupt": KeyboardInterrupt()}.get(case)
        engines.append(CountedClose(load(*args, **kwargs), 3 if fail else 0, fail))
        return engines[-1]

    monkeypatch.setattr(generate, "_load_model", load_counted)
    lines: list = [{"id": i, "prompt": f"line {i}"} for i in range(12)]
    if case in ("bad_line", "max_errors"):
        lines.insert(3, "{not json")
    extra = ["--max-errors", "1"] if case == "max_errors" else []
    r, _ = gen(tmp_path, lines, *extra)
    want = {"ok": ExitCode.OK, "bad_line": ExitCode.LINE_ERRORS, "max_errors": ExitCode.MAX_ERRORS,
            "engine_failure": ExitCode.FATAL, "keyboard_interrupt": ExitCode.INTERRUPTED}[case]
    assert r.exit_code == want, r.stderr
    assert [e.closed for e in engines] == [1]


# ---- checks that fail before the model loads ----------------------------------------------------------------
def test_stats_json_in_a_missing_directory_fails_before_the_model_loads(tmp_path):
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "hi"}], "--stats-json", tmp_path / "nope" / "s.json",
                  model=str(tmp_path / "no-such-model"))  # a model that cannot load: the check must come first
    assert r.exit_code == ExitCode.FATAL
    assert "--stats-json" in r.stderr and "does not exist" in r.stderr and "cannot load model" not in r.stderr


def test_max_model_len_beyond_the_model_is_refused_with_the_numbers(tmp_path):
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "hi"}], "--max-model-len", "100000000")
    assert r.exit_code == ExitCode.FATAL and recs == []
    assert "100,000,000" in r.stderr and "2,048" in r.stderr and "max_position_embeddings" in r.stderr


# ---- the "done when": hostile lines anywhere in a 1,000-line job, a kill -9, a resume ----------------
def test_hostile_lines_in_a_1000_line_job_then_kill_9_and_resume_give_every_id_once(tmp_path):
    import random

    from test_line_validation import CRASHERS

    rng = random.Random(0)
    n = 1000
    bad_at = dict(zip(rng.sample(range(n), len(CRASHERS)), CRASHERS, strict=True))
    lines, want_bad = [], {}
    for i in range(n):
        if i in bad_at:
            raw, code = bad_at[i][0], bad_at[i][1]
            # give each hostile line its own id where it has one, so only its class decides its record
            raw = re.sub(r'"(custom_id|id)": "[a-z]"', lambda m, i=i: f'"{m.group(1)}": "bad{i}"', raw, count=1)
            lines.append(raw)
            want_bad[i] = code
        else:
            lines.append(json.dumps({"id": f"g{i}", "prompt": f"line {i} of the job"}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = ["--device", "cpu", "--temperature", "0", "--ignore-eos", "--max-tokens", "3", "--max-num-seqs", "8"]
    p = start(["generate", src, "-o", out, "--model", tiny_model(), *args], tmp_path)
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 150, p)
    p.kill()
    p.communicate(timeout=30)
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *args], cwd=tmp_path)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    recs = read_jsonl(out)
    assert len(recs) == n  # one record per line, none lost, none twice
    keys = [rec.get("custom_id", rec.get("id")) for rec in recs]
    assert len(set(map(json.dumps, keys))) == n
    good = {rec["id"] for rec in recs if "text" in rec}
    assert good == {f"g{i}" for i in range(n) if i not in bad_at}
    codes = sorted(rec["error"]["code"] for rec in recs if rec.get("error"))
    assert codes == sorted(want_bad.values())


def test_unwritable_output_fails_before_the_model_loads(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r, _ = gen(tmp_path, [{"id": 1, "prompt": "hi"}], "-o", locked / "out.jsonl",
                   model=str(tmp_path / "no-such-model"))
    finally:
        locked.chmod(0o755)
    assert r.exit_code == ExitCode.FATAL and "cannot write" in r.stderr and "cannot load model" not in r.stderr
