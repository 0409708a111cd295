"""Interruptions: SIGTERM / SIGINT / SIGKILL mid-run, then --resume gives every id once, same greedy text."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from flashgen.jobs.errors import ExitCode
from test_cli_support import cli, proc_env, read_jsonl, tiny_model, wait_for_lines

N = 60
# Slow enough to interrupt mid-run (60 lines x 10 tokens, 2 at a time: 300 engine steps), yet quick.
ARGS = ["--device", "cpu", "--temperature", "0", "--max-tokens", "10", "--ignore-eos", "--max-num-seqs", "2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input and the output of one uninterrupted run: what every interrupted-then-resumed run must equal."""
    tmp = tmp_path_factory.mktemp("signals")
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"request number {i} of {N}"}) + "\n"
                           for i in range(N)))
    r = cli(["generate", src, "-o", tmp / "full.jsonl", "--model", tiny_model(), *ARGS], cwd=tmp)
    assert r.exit_code == 0, r.stderr
    return src, {rec["id"]: rec["text"] for rec in read_jsonl(tmp / "full.jsonl")}


def start(src, out, cwd, stdin=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flashgen", "generate", str(src), "-o", str(out), "--model", tiny_model(), *ARGS]
    return subprocess.Popen(cmd, cwd=cwd, env=proc_env(), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def resume_and_compare(src, out, want, cwd):
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *ARGS], cwd=cwd)
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(out)
    assert len(recs) == N and {rec["id"]: rec["text"] for rec in recs} == want  # every id once, same text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_then_resume_finishes_the_job(job, tmp_path, sig):
    src, want = job
    out = tmp_path / "out.jsonl"
    p = start(src, out, tmp_path)
    wait_for_lines(p, out, 3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == ExitCode.INTERRUPTED, err.decode()
    assert signal.Signals(sig).name in err.decode() and b"interrupted (exit 130)" in err
    data = out.read_bytes()
    assert data.endswith(b"\n")  # a clean stop leaves only whole lines
    partial = read_jsonl(out)
    assert 3 <= len(partial) < N and all(want[rec["id"]] == rec["text"] for rec in partial)
    resume_and_compare(src, out, want, tmp_path)


def test_kill_9_loses_only_lines_in_flight_then_resume_finishes(job, tmp_path):
    src, want = job
    out = tmp_path / "out.jsonl"
    p = start(src, out, tmp_path)
    wait_for_lines(p, out, 5)
    p.kill()
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert out.read_bytes().count(b"\n") >= 5
    resume_and_compare(src, out, want, tmp_path)


def test_sigterm_while_waiting_on_a_stalled_stdin_pipe(tmp_path):
    """A producer that stalls must not keep flashgen from stopping: the signal cuts the read short."""
    out = tmp_path / "out.jsonl"
    p = start("-", out, tmp_path, stdin=subprocess.PIPE)
    p.stdin.write(b"".join(json.dumps({"id": i, "prompt": "hello"}).encode() + b"\n" for i in range(3)))
    p.stdin.flush()  # ...and the pipe stays open, with nothing more to come
    wait_for_lines(p, out, 3)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)  # not communicate(): closing stdin would end the input, and the job with it
    finally:
        p.kill()
        p.stdin.close()
    err = p.stderr.read()
    assert p.returncode == ExitCode.INTERRUPTED, err.decode()
    assert [rec["id"] for rec in read_jsonl(out)] == [0, 1, 2]


def test_stats_json_records_an_interrupted_run(job, tmp_path):
    src, _ = job
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "flashgen", "generate", str(src), "-o", str(out), "--model", tiny_model(), *ARGS,
           "--stats-json", str(stats)]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=proc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(p, out, 2)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    s = json.loads(stats.read_text())
    assert s["status"] == "interrupted" and s["exit_code"] == 130 and s["ok"] == len(read_jsonl(out))
