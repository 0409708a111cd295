"""Data parallelism on the CPU: 2 reference-backend workers give the same outputs as one engine."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

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


def group_processes(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(pgrp) == pgid:
            pids.append(int(d))
    return pids


def ends_with_nothing_left(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Wait for `p` (started in a session of its own) to exit; fail if it does not in time or leaves a process of
    its group behind (its data-parallel workers); kill its group whatever happens. Its exit code and stderr."""
    try:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit in {timeout} s; alive: {group_processes(p.pid)}") from None
        end = time.monotonic() + 10  # the workers' exit may still be under way when the parent's is seen
        while (left := group_processes(p.pid)) and time.monotonic() < end:
            time.sleep(0.05)
        assert left == [], f"processes left behind: {left}"
        return p.returncode, err.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="lists processes through /proc")


@needs_proc
@pytest.mark.parametrize("case", ["ok", "bad_line", "sigterm"])
def test_cli_data_parallel_process_ends_with_its_workers(tmp_path, case):
    """`flashgen generate --data-parallel 2` as a process of its own ends, with its exit code, and leaves no worker
    behind: after a good job, after a job with a bad line, and on SIGTERM mid-job. Workers still serving at exit
    kept the process from ever ending (multiprocessing's exit handler SIGTERMs daemon children, which the workers
    ignore, then waits for them without a timeout)."""
    from flashgen.jobs.errors import ExitCode
    from test_cli_support import proc_env, read_jsonl, tiny_model, wait_for_lines

    n = 400 if case == "sigterm" else 12  # enough steps that SIGTERM comes mid-job
    lines = [json.dumps({"id": i, "prompt": f"request number {i}"}) for i in range(n)]
    if case == "bad_line":
        lines.insert(5, "{not json")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "flashgen", "generate", str(src), "-o", str(out), "--model", tiny_model(),
           "--device", "cpu", "--temperature", "0", "--max-tokens", "8", "--ignore-eos", "--max-num-seqs", "2",
           "--data-parallel", "2"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=proc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    if case == "sigterm":
        try:
            wait_for_lines(p, out, 3)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            raise
        p.send_signal(signal.SIGTERM)
    code, err = ends_with_nothing_left(p)
    want = {"ok": ExitCode.OK, "bad_line": ExitCode.LINE_ERRORS, "sigterm": ExitCode.INTERRUPTED}[case]
    assert code == want, err
    recs = read_jsonl(out)
    if case == "sigterm":
        assert 3 <= len(recs) < n
    else:
        assert len(recs) == len(lines) and sum("error" in r for r in recs) == (case == "bad_line")


@needs_proc
def test_an_engine_never_closed_still_lets_the_process_exit(tmp_path):
    """A DataParallelLLM still referenced at exit, never closed: its workers are ended before multiprocessing's
    exit handler would wait for them forever."""
    from test_cli_support import proc_env, tiny_model

    code = ("import sys\n"
            "from flashgen import EngineConfig, SamplingParams\n"
            "from flashgen.engine.data_parallel import DataParallelLLM\n"
            "dp = DataParallelLLM(EngineConfig(model=sys.argv[1], device='cpu', dtype='float32'), 2)\n"
            "out = dp.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=2))\n"
            "print(sum(len(o.token_ids) for o in out))\n")
    p = subprocess.Popen([sys.executable, "-c", code, tiny_model()], cwd=tmp_path, env=proc_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    rc, err = ends_with_nothing_left(p)
    assert rc == 0, err


@pytest.mark.parametrize("value", ["x", "0", "-2"])
def test_a_bad_data_parallel_value_is_one_plain_error(tmp_path, value):
    """Not a model-load failure wrapping a FatalError: the option, its value and what to give instead."""
    from flashgen.jobs.errors import ExitCode
    from test_cli_support import gen

    r, recs = gen(tmp_path, [{"id": 1, "prompt": "hi"}], "--data-parallel", value)
    assert r.exit_code == ExitCode.FATAL and recs == []
    assert f"job.data_parallel = '{value}' is invalid; use a positive integer" in r.stderr
    assert "cannot load model" not in r.stderr
