"""The run loop: bounded lines in flight, memory flat in the input size, order, errors, engine failures."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flashgen.jobs.errors import FatalError
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import BrokenLLM, FakeLLM, cli, proc_env, read_jsonl, tiny_model

DEFAULTS = defaults_from_settings(load_settings(None, {}, "/").sampling)


def make_runner(llm, sink, order="input", max_in_flight=32, **kw):
    parser = LineParser(llm.tokenizer, llm.max_model_len, DEFAULTS)
    return Runner(llm, parser, OrderedWriter(sink, order), JobStats(), max_in_flight=max_in_flight, **kw)


def lines_of(objs):
    return read_lines(io.BytesIO(b"".join(json.dumps(o).encode() + b"\n" for o in objs)))


@pytest.mark.parametrize("order", ["input", "completion"])
def test_window_bounds_lines_in_flight_and_every_line_is_written_once(order):
    rng = random.Random(0)
    steps = {str(i): rng.randint(1, 9) for i in range(500)}
    llm = FakeLLM(max_num_seqs=8, steps=lambda rid: steps[rid])
    sink = io.BytesIO()
    runner = make_runner(llm, sink, order, max_in_flight=20)
    objs = [{"id": i, "prompt": "p"} if i % 50 else "bad" for i in range(500)]
    status = runner.run(lines_of(objs), IdSet())
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert status == "line_errors" and runner.stats.errors == 10 and runner.stats.ok == 490
    want = [i if i % 50 else i + 1 for i in range(500)]  # an unreadable line is known by its line number
    got = [r["id"] for r in recs]
    assert got == want if order == "input" else sorted(got) == sorted(want)
    assert runner.max_seen_in_flight <= 20 and llm.max_unfinished <= 20


def test_resume_set_skips_lines_without_running_them():
    llm = FakeLLM()
    sink = io.BytesIO()
    runner = make_runner(llm, sink)
    done = IdSet()
    for i in range(0, 10, 2):
        done.add(json.dumps(i))
    runner.run(lines_of([{"id": i, "prompt": "p"} for i in range(10)]), done)
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == [1, 3, 5, 7, 9]
    assert runner.stats.skipped == 5


def test_engine_failure_is_fatal_and_keeps_finished_lines():
    sink = io.BytesIO()
    runner = make_runner(BrokenLLM(3, max_num_seqs=1), sink, max_in_flight=4)
    with pytest.raises(FatalError, match="out of memory.*--resume"):
        runner.run(lines_of([{"id": i, "prompt": "p"} for i in range(10)]), IdSet())
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == [0, 1]


CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from test_cli_support import FakeLLM
from test_jobs_runner import make_runner
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import read_lines
def status(key):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to now: the imports' peak must not hide the job's
before = status("VmRSS:")
with open(sys.argv[1], "rb") as fin, open(sys.argv[1] + ".out", "wb", buffering=0) as fout:
    assert make_runner(FakeLLM(max_num_seqs=64), fout, max_in_flight=256).run(read_lines(fin), IdSet()) == "ok"
print(status("VmHWM:") - before)
"""


def _rss_growth(tmp_path, n: int) -> int:
    """How much a fresh process's peak RSS grows while it reads, parses, runs (fake engine) and writes `n` lines
    of ~250 bytes (imports excluded: they dwarf the job and vary between processes)."""
    src = tmp_path / f"in{n}.jsonl"
    with open(src, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"line-{i}", "prompt": "x" * 200, "max_tokens": 1}) + "\n")
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(__file__).parent)], env=proc_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(read_jsonl(f"{src}.out")) == n
    return int(p.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_memory_stays_flat_on_100k_lines(tmp_path):
    """Memory on 100k lines grows by little more than the id set (8-byte hashes, table at most half full,
    ~3 MB at 100k): far below the 25 MB of input, which is never held, let alone parsed."""
    small = _rss_growth(tmp_path, 10_000)
    big = _rss_growth(tmp_path, 100_000)
    size = (tmp_path / "in100000.jsonl").stat().st_size
    assert size > 24_000_000
    assert big < 8_000_000 and big - small < 6_000_000, (small, big)


def test_many_lines_through_the_real_engine_with_a_small_window(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 3000
    src.write_text("".join(json.dumps({"id": i, "prompt": f"line {i}"}) + "\n" for i in range(n)))
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), "--device", "cpu", "--max-tokens", "1",
             "--max-num-seqs", "64", "--max-in-flight", "128", "--stats-json", tmp_path / "s.json"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert [rec["id"] for rec in read_jsonl(out)] == list(range(n))
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["ok"] == n and stats["completion_tokens"] == n


def _count_admissions(llm) -> list[tuple[int, int]]:
    """Wrap a FakeLLM: the list it returns gets, at each step, (requests added since the step before, requests
    unfinished before the first of them was added)."""
    per_step: list[tuple[int, int]] = []
    add, step = llm.add_request, llm.step
    since = [0, 0]

    def counted_add(*a):
        if since[0] == 0:
            since[1] = llm.num_unfinished_requests()
        since[0] += 1
        add(*a)

    def counted_step():
        per_step.append((since[0], since[1]))
        since[0] = 0
        return step()

    llm.add_request, llm.step = counted_add, counted_step
    return per_step


def test_admission_is_paced_while_a_batch_is_queued():
    """Waves of lines finishing together (fixed lengths) open the window a wave at a time: while the engine holds
    half a window of unfinished requests the loop admits at most ADMIT_PACE lines between two steps, below that as
    many as fit; every line is still answered once, in order."""
    from flashgen.jobs.runner import ADMIT_PACE

    llm = FakeLLM(max_num_seqs=64, steps=lambda rid: 5)
    per_step = _count_admissions(llm)
    sink = io.BytesIO()
    runner = make_runner(llm, sink, max_in_flight=256, prepare_ahead=False)  # every line ready when taken
    assert runner.run(lines_of([{"id": i, "prompt": "p"} for i in range(1000)]), IdSet()) == "ok"
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == list(range(1000))
    assert per_step[0] == (128, 0)  # nothing unfinished at first: half the window at once, then paced
    paced = [n for n, before in per_step if 2 * before >= 256]
    assert paced and max(paced) == ADMIT_PACE  # a wave's 64 free places refilled 32 at a time
    assert all(n <= ADMIT_PACE for n in paced)


def test_pacing_counts_requests_not_skipped_or_bad_lines():
    """A resumed job whose done lines and bad lines lie between the lines still to run: the pace counts requests
    added to the engine, so a paced pass still refills ADMIT_PACE places (the done lines pass, the bad lines get
    their error records, neither uses up the pass); every line still gets exactly one answer, in order."""
    from flashgen.jobs.runner import ADMIT_PACE

    llm = FakeLLM(max_num_seqs=64, steps=lambda rid: 5)
    per_step = _count_admissions(llm)
    n = 4000  # every other line done, one in eight bad, the rest to run
    objs = [{"id": i, "prompt": "p", "max_tokens": -1} if i % 8 == 3 else {"id": i, "prompt": "p"} for i in range(n)]
    done = IdSet()
    for i in range(0, n, 2):
        done.add(json.dumps(i))
    sink = io.BytesIO()
    runner = make_runner(llm, sink, max_in_flight=256, prepare_ahead=False)
    assert runner.run(lines_of(objs), done) == "line_errors"
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [r["id"] for r in recs] == list(range(1, n, 2))  # the done lines are not rerun
    assert all((r.get("error") is None) == (r["id"] % 8 != 3) for r in recs)
    assert runner.stats.skipped == n // 2 and runner.stats.errors == n // 8
    paced = [n for n, before in per_step if 2 * before >= 256]
    assert paced and max(paced) == ADMIT_PACE  # counting every line taken, a pass added at most 12
    assert all(n <= ADMIT_PACE for n in paced)
