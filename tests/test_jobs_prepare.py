"""Lines prepared ahead of the engine (flashgen.jobs.source.Prepared): the same output as preparing each line on the
job's thread, bounded, stopped and resumed cleanly, one line's fault only that line's, no thread left behind."""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import os
import random
import re
import signal
import threading
import weakref

import pytest

from flashgen.jobs.errors import FatalError
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.prepare_pool import PreparePool
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.signals import SignalGuard
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import BrokenLLM, FakeLLM, tiny_model

DEFAULTS = defaults_from_settings(load_settings(None, {}, "/").sampling)
MAX_LEN = 200


@functools.cache
def real_tokenizer():
    """The tiny checkpoint's BPE tokenizer (tokenizers, with encode_batch) and chat template."""
    from flashgen.tokenizer import Tokenizer

    return Tokenizer(tiny_model())


def fake_llm(**kw) -> FakeLLM:
    llm = FakeLLM(max_model_len=MAX_LEN, **kw)
    llm.tokenizer = real_tokenizer()
    return llm


def job_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("flashgen-input", "flashgen-prepare")]


def stable(out: bytes) -> bytes:
    """The output less what differs from run to run by design: batch records' random ids and creation times."""
    out = re.sub(rb'"(batch_req_|req_|chatcmpl-|cmpl-)[0-9a-f]{32}"', rb'"\1X"', out)
    return re.sub(rb'"created": \d+', b'"created": 0', out)


def mixed_input(n: int = 300, seed: int = 0) -> bytes:
    """Good prompt, messages and batch lines, with bad JSON, duplicate ids, lines that fail validation, prompts over
    the context by their token count and by their size alone, and lines without an id."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 12
        if k == 1:
            out.append(b'{"id": %d, "prompt": "unterminated' % i)
        elif k == 2:
            out.append(json.dumps({"id": i - 2, "prompt": "a duplicate of an earlier id"}).encode())
        elif k == 3:
            out.append(json.dumps({"id": i, "prompt": "x", "temperature": "hot"}).encode())
        elif k == 4:
            out.append(json.dumps({"id": i, "prompt": " ".join(f"word{j}" for j in range(150))}).encode())
        elif k == 5:
            out.append(json.dumps({"id": i, "prompt": "y" * 50_000}).encode())
        elif k == 6:
            out.append(json.dumps({"id": f"m{i}", "messages": [{"role": "user", "content": f"hello {i}"}]}).encode())
        elif k == 7:
            out.append(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"messages": [{"role": "user", "content": f"batch {i}"}],
                                            "max_tokens": 3}}).encode())
        elif k == 8:
            out.append(json.dumps({"prompt": f"no id {i}", "max_tokens": 2}).encode())
        elif k == 9:
            out.append(json.dumps({"id": f"e{i}", "prompt": ""}).encode())
        else:
            out.append(json.dumps({"id": i, "prompt": f"line {i} " * rng.randint(1, 20)}).encode())
    return b"\n".join(out) + b"\n"


def run_job(data: bytes, *, ahead: bool, done: IdSet | None = None, sink: io.BytesIO | None = None,
            max_in_flight: int = 16, llm=None, signals=None, **kw) -> tuple[str, io.BytesIO, Runner]:
    rng = random.Random(1)
    steps = {str(i): rng.randint(1, 6) for i in range(5000)}
    llm = llm or fake_llm(max_num_seqs=4, steps=lambda rid: steps[rid])
    sink = sink if sink is not None else io.BytesIO()
    runner = Runner(llm, LineParser(llm.tokenizer, llm.max_model_len, DEFAULTS), OrderedWriter(sink), JobStats(),
                    max_in_flight=max_in_flight, prepare_ahead=ahead, signals=signals, **kw)
    status = runner.run(read_lines(io.BytesIO(data)), done if done is not None else IdSet())
    return status, sink, runner


def test_output_is_byte_for_byte_the_inline_path():
    data = mixed_input()
    status_a, ahead, runner = run_job(data, ahead=True)
    status_b, inline, _ = run_job(data, ahead=False)
    assert status_a == status_b == "line_errors"
    assert b'"custom_id": "b7"' in ahead.getvalue() and stable(ahead.getvalue()) == stable(inline.getvalue())
    recs = [json.loads(x) for x in ahead.getvalue().splitlines()]
    assert len(recs) == 300  # one record per line
    codes = {r["error"]["code"] for r in recs if r.get("error")} | {
        r["response"]["body"]["error"]["code"] for r in recs if r.get("response", {}).get("status_code", 200) != 200}
    assert {"invalid_json", "duplicate_id", "prompt_too_long", "empty_prompt"} <= codes
    too_long = [r["error"]["message"] for r in recs if (r.get("error") or {}).get("code") == "prompt_too_long"]
    assert any("at least" in m for m in too_long)  # refused by its size, before tokenizing
    assert any("at least" not in m and "tokens, but the model context" in m for m in too_long)  # by its tokens
    assert sum("text" in r for r in recs) + sum("response" in r and r["response"]["status_code"] == 200
                                                for r in recs) == runner.stats.ok > 100
    assert runner.prepared is not None and runner.prepared.busy_s > 0
    assert job_threads() == []


def test_deferred_tokenization_gives_the_ids_of_build():
    tok = real_tokenizer()
    parser = LineParser(tok, 4096, DEFAULTS)
    lines = [json.dumps({"id": i, "prompt": f"text number {i} " * (i + 1)}).encode() for i in range(20)]
    lines += [json.dumps({"id": 100 + i, "messages": [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": f"q {i}"}]}).encode()
              for i in range(5)]
    heads = [parser.head(n, raw) for n, raw in enumerate(lines, 1)]
    one = [parser.build(h) for h in heads]
    many = parser.encode_pending([parser.build(h, defer=True) for h in heads])
    assert [r.prompt_ids for r in many] == [r.prompt_ids for r in one]
    assert [r.request_hash for r in many] == [r.request_hash for r in one]
    assert tok.encode_batch(["a b", "c"], add_special_tokens=True) == [tok.encode("a b"), tok.encode("c")]


@pytest.mark.parametrize("max_in_flight", [1, 7, 40])
def test_lines_prepared_ahead_stay_within_the_window(max_in_flight):
    data = b"".join(json.dumps({"id": i, "prompt": f"p {i}"}).encode() + b"\n" for i in range(600))
    llm = fake_llm(max_num_seqs=4, steps=lambda rid: 3)
    status, sink, runner = run_job(data, ahead=True, max_in_flight=max_in_flight, llm=llm)
    assert status == "ok" and len(sink.getvalue().splitlines()) == 600
    prepared = runner.prepared
    assert prepared is not None and runner.ahead == max_in_flight
    assert 1 <= prepared.max_ready <= max_in_flight  # prepared and not yet admitted, at most the window
    assert runner.max_seen_in_flight <= max_in_flight and llm.max_unfinished <= max_in_flight


def test_a_signal_mid_job_then_resume_gives_the_uninterrupted_output():
    data = mixed_input(240, seed=3)
    _, full, _ = run_job(data, ahead=True, llm=fake_llm(max_num_seqs=4, steps=lambda rid: 2))

    class Stops(FakeLLM):  # the first signal arrives after the 20th engine step, lines in flight being dropped
        n = 0

        def step(self):
            self.n += 1
            if self.n == 20:
                guard.requested = signal.SIGINT
            return super().step()

    guard = SignalGuard()
    llm = Stops(max_num_seqs=4, max_model_len=MAX_LEN, steps=lambda rid: 2)
    llm.tokenizer = real_tokenizer()
    sink = io.BytesIO()
    status, _, runner = run_job(data, ahead=True, llm=llm, signals=guard, sink=sink)
    written = sink.getvalue().splitlines()
    assert status == "interrupted" and 0 < len(written) < 240
    # lines prepared but not admitted were neither counted nor written
    assert runner.stats.lines == len(written) and runner.prepared is not None and runner.prepared.max_ready > 0
    done = IdSet()
    for rec in map(json.loads, written):  # what --resume reads back: the ids answered (error records rerun)
        if rec.get("error") is None and (rec.get("response") or {}).get("status_code", 200) == 200:
            done.add(json.dumps(rec.get("custom_id", rec.get("id"))))
    kept = [x for x in written if json.loads(x).get("error") is None
            and (json.loads(x).get("response") or {}).get("status_code", 200) == 200]
    resumed = io.BytesIO(b"".join(x + b"\n" for x in kept))
    resumed.seek(0, io.SEEK_END)  # appended to, as --resume does
    run_job(data, ahead=True, done=done, sink=resumed, llm=fake_llm(max_num_seqs=4, steps=lambda rid: 2))
    got = sorted(stable(resumed.getvalue()).splitlines())
    want = sorted(stable(full.getvalue()).splitlines())
    assert set(want) - set(got) == set() and len(got) == len(want), set(want) - set(got)
    assert job_threads() == []


@pytest.mark.parametrize("ahead", [True, False])
def test_an_exception_preparing_one_line_is_only_that_lines_error(ahead, monkeypatch):
    data = b"".join(json.dumps({"id": i, "prompt": f"p {i}"}).encode() + b"\n" for i in range(30))
    real_build = LineParser.build

    def build(self, line, defer=False):
        if line.id == 7:
            raise KeyError("a bug")
        return real_build(self, line, defer)

    monkeypatch.setattr(LineParser, "build", build)
    status, sink, runner = run_job(data, ahead=ahead)
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert status == "line_errors" and [r["id"] for r in recs] == list(range(30))
    assert recs[7]["error"]["code"] == "internal_error" and "KeyError" in recs[7]["error"]["message"]
    assert recs[7]["error"]["message"].startswith("line 8: ")
    assert all("text" in r for i, r in enumerate(recs) if i != 7) and runner.stats.ok == 29
    assert job_threads() == []


def test_a_tokenizer_fault_on_one_text_of_a_group_fails_only_its_line(monkeypatch):
    tok = real_tokenizer()
    real = type(tok).encode

    def encode(self, text, add_special_tokens=True):
        if "poison" in text:
            raise RuntimeError("tokenizer fault")
        return real(self, text, add_special_tokens)

    def encode_batch(self, texts, add_special_tokens=True):
        return [encode(self, t, add_special_tokens) for t in texts]

    monkeypatch.setattr(type(tok), "encode", encode)
    monkeypatch.setattr(type(tok), "encode_batch", encode_batch)
    monkeypatch.setattr(type(tok), "encode_batch_ids", encode_batch)  # what the job's parser calls
    data = b"".join(json.dumps({"id": i, "prompt": "poison" if i == 4 else f"p {i}"}).encode() + b"\n"
                    for i in range(20))
    status, sink, _ = run_job(data, ahead=True)
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert status == "line_errors" and [r["id"] for r in recs] == list(range(20))
    assert recs[4]["error"]["code"] == "internal_error" and "tokenizer fault" in recs[4]["error"]["message"]
    assert sum("text" in r for r in recs) == 19


def test_no_thread_is_left_when_the_run_raises():
    llm = BrokenLLM(5, max_num_seqs=2, max_model_len=MAX_LEN)
    llm.tokenizer = real_tokenizer()
    data = b"".join(json.dumps({"id": i, "prompt": "p"}).encode() + b"\n" for i in range(500))
    with pytest.raises(FatalError, match="out of memory"):
        run_job(data, ahead=True, llm=llm)
    assert job_threads() == []

    def unreadable():
        yield from read_lines(io.BytesIO(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n'))
        raise OSError(5, "Input/output error")

    llm = fake_llm()
    sink = io.BytesIO()
    runner = Runner(llm, LineParser(llm.tokenizer, MAX_LEN, DEFAULTS), OrderedWriter(sink), JobStats(),
                    max_in_flight=8)
    with pytest.raises(FatalError, match="cannot read the input.*Input/output error"):
        runner.run(unreadable(), IdSet())
    assert sink.getvalue() == b""  # as before: the lines read before it were still in flight, and rerun on --resume
    assert job_threads() == []


def test_a_failure_of_the_preparation_as_a_whole_is_fatal(monkeypatch):
    def prepare(self, group):
        raise MemoryError("no memory left")

    monkeypatch.setattr(Runner, "prepare", prepare)
    data = b"".join(json.dumps({"id": i, "prompt": "p"}).encode() + b"\n" for i in range(50))
    with pytest.raises(FatalError, match="preparing the input failed: MemoryError: no memory left"):
        run_job(data, ahead=True)
    assert job_threads() == []


@pytest.mark.parametrize("how", ["ok", "engine_failure"])
def test_nothing_of_the_run_keeps_the_runner_or_its_engine_alive(how):
    """Once run() returns (or raises for an engine failure), the Runner and its engine are freed by reference
    counting alone: no reference cycle through the preparation thread (its `prepare` is the Runner's method). An
    engine left for the garbage collector outlived the job, and with --data-parallel its worker processes kept the
    process from ending (the job now also closes its engine itself: flashgen.jobs.generate)."""
    def run() -> tuple[weakref.ref | None, weakref.ref]:
        llm = BrokenLLM(5, max_num_seqs=2, max_model_len=MAX_LEN) if how == "engine_failure" else fake_llm()
        llm.tokenizer = real_tokenizer()
        data = b"".join(json.dumps({"id": i, "prompt": "p"}).encode() + b"\n" for i in range(200))
        try:
            status, _, runner = run_job(data, ahead=True, llm=llm)
        except FatalError:
            assert how == "engine_failure"
            return None, weakref.ref(llm)
        assert status == "ok" and how == "ok"
        return weakref.ref(runner), weakref.ref(llm)

    real_tokenizer()  # made (with its checkpoint) before: what that leaves in caches is not the run's
    enabled = gc.isenabled()
    gc.disable()
    try:
        runner, llm = run()
        assert (runner is None or runner() is None) and llm() is None
    finally:
        if enabled:
            gc.enable()
    assert job_threads() == []


# ---- lines built in worker processes (flashgen.jobs.prepare_pool) --------------------------------------------------
def pool_first(monkeypatch) -> None:
    """Every group goes to the workers: PreparePool.ready waits for one to be up (the pool starts beside the job,
    and a small job's lines would otherwise all be built on its own thread before then)."""
    real = PreparePool.ready

    def ready(self):
        try:
            self._up.result(120)
        except Exception:  # noqa: BLE001 - a pool that could not start: ready() says so
            pass
        return real(self)

    monkeypatch.setattr(PreparePool, "ready", ready)


class DyingParser(LineParser):
    """Builds like LineParser, except that in a process other than the test's a line whose text says "die" ends
    that process at once, as a fault in the tokenizer's native code would."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.owner = os.getpid()  # pickled with the parser: the test's process

    def build(self, line, defer=False):
        if os.getpid() != self.owner and "die" in json.dumps(line.obj):
            os._exit(3)
        return super().build(line, defer)


def test_worker_processes_give_the_threads_output_byte_for_byte_resume_included(monkeypatch):
    """The same records as building on the preparation thread: errors of every kind, duplicates (screened in the
    job's process, in order), lines skipped on --resume (never sent to a worker), chat and batch lines."""
    pool_first(monkeypatch)
    data = mixed_input()
    done = IdSet()
    for i in range(0, 300, 24):
        done.add(json.dumps(i))
    status_t, thread, _ = run_job(data, ahead=True, done=done)
    status_w, workers, runner = run_job(data, ahead=True, done=done, prepare_workers=2)
    assert status_t == status_w == "line_errors"
    assert stable(workers.getvalue()) == stable(thread.getvalue())
    assert runner.pool_groups >= 300 // 32 and runner.pool is None and runner.stats.skipped > 0
    assert job_threads() == []


def test_a_worker_that_dies_leaves_its_lines_to_the_jobs_process(monkeypatch):
    """A worker process killed mid-group breaks the pool: the job says so once, builds that group and every later
    one itself, and every line is still answered as it would have been."""
    pool_first(monkeypatch)
    data = b"".join(json.dumps({"id": i, "prompt": "die here" if i == 40 else f"p {i}"}).encode() + b"\n"
                    for i in range(200))
    llm = fake_llm(max_num_seqs=4, steps=lambda rid: 2)
    sink, notes = io.BytesIO(), []
    runner = Runner(llm, DyingParser(llm.tokenizer, llm.max_model_len, DEFAULTS), OrderedWriter(sink), JobStats(),
                    max_in_flight=64, prepare_workers=1, log=notes.append)
    assert runner.run(read_lines(io.BytesIO(data)), IdSet()) == "ok"
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [r["id"] for r in recs] == list(range(200)) and all("text" in r for r in recs)
    assert len(notes) == 1 and "line preparation processes failed" in notes[0] and "BrokenProcessPool" in notes[0]
    assert job_threads() == []


def test_a_template_job_built_by_workers_writes_what_the_thread_writes(tmp_path, monkeypatch):
    """--template is compiled again in each worker from its file (a compiled template does not pickle); a bad
    --prepare-workers is refused before the model loads."""
    from flashgen.jobs.errors import ExitCode
    from test_cli_support import PROMPTS, gen

    pool_first(monkeypatch)
    docs = [json.loads(line) for line in (PROMPTS / "documents.jsonl").read_text().splitlines()]
    lines = docs + [{"id": "no-question", "text": "some text"}]
    r0, thread = gen(tmp_path, lines, "--template", PROMPTS / "qa.j2", "--prepare-workers", "0", "--seed", "1")
    r2, workers = gen(tmp_path, lines, "--template", PROMPTS / "qa.j2", "--prepare-workers", "2", "--seed", "1")
    assert r0.exit_code == r2.exit_code == ExitCode.LINE_ERRORS
    assert workers == thread and workers[-1]["error"]["code"] == "template_missing_field"
    assert "preparation processes failed" not in r2.stderr
    assert sum("text" in rec for rec in workers) == len(docs) > 1
    r, _ = gen(tmp_path, lines[:1], "--prepare-workers", "many")
    assert r.exit_code == ExitCode.FATAL and "job.prepare_workers = 'many' is invalid" in r.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="lists processes through /proc")
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_worker_processes_end_with_the_job_however_it_ends(tmp_path, how):
    """`flashgen generate --prepare-workers 2` as a process of its own: on SIGTERM mid-job it exits 130 with its
    workers ended; killed with SIGKILL (nothing runs to end them), its workers see it gone and end within seconds
    instead of staying behind on the node."""
    import subprocess
    import sys
    import time

    from flashgen.jobs.errors import ExitCode
    from test_cli_support import proc_env, tiny_model, wait_for_lines
    from test_data_parallel import ends_with_nothing_left, group_processes

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"request number {i}"}) + "\n" for i in range(3000)))
    cmd = [sys.executable, "-m", "flashgen", "generate", str(src), "-o", str(out), "--model", tiny_model(),
           "--device", "cpu", "--temperature", "0", "--max-tokens", "8", "--ignore-eos", "--max-num-seqs", "4",
           "--prepare-workers", "2"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=proc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        wait_for_lines(p, out, 3)
        end = time.monotonic() + 60  # the workers are up (the job's process and its two workers at least)
        while len(group_processes(p.pid)) < 3 and time.monotonic() < end:
            time.sleep(0.1)
        assert len(group_processes(p.pid)) >= 3, group_processes(p.pid)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    if how == "sigterm":
        p.send_signal(signal.SIGTERM)
        code, err = ends_with_nothing_left(p)
        assert code == ExitCode.INTERRUPTED, err
        return
    p.kill()  # the job's process alone
    p.wait()
    end = time.monotonic() + 15
    while (left := group_processes(p.pid)) and time.monotonic() < end:
        time.sleep(0.1)
    try:
        assert left == [], f"processes left behind: {[open(f'/proc/{x}/cmdline').read() for x in left]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def test_a_parser_the_workers_cannot_take_leaves_the_lines_to_the_thread():
    """A parser that does not pickle (a caller's own tokenizer object, say) cannot go to worker processes: the job
    says so once and builds its lines on the preparation thread, with the same output."""
    class Unpicklable(LineParser):
        def __reduce__(self):
            raise TypeError("this tokenizer stays in its process")

    data = b"".join(json.dumps({"id": i, "prompt": f"p {i}"}).encode() + b"\n" for i in range(50))
    outs, notes = [], []
    for parser_type, workers in ((LineParser, 0), (Unpicklable, 2)):
        llm = fake_llm(max_num_seqs=4, steps=lambda rid: 1 + int(rid) % 6)
        sink = io.BytesIO()
        runner = Runner(llm, parser_type(llm.tokenizer, llm.max_model_len, DEFAULTS), OrderedWriter(sink),
                        JobStats(), max_in_flight=16, prepare_workers=workers, log=notes.append)
        assert runner.run(read_lines(io.BytesIO(data)), IdSet()) == "ok"
        outs.append(sink.getvalue())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 50 and runner.pool_groups == 0
    assert len(notes) == 1 and "processes failed" in notes[0] and "stays in its process" in notes[0]
    assert job_threads() == []


def test_every_worker_starts_on_the_pools_own_thread(monkeypatch):
    """Starting a spawned worker waits for its interpreter to boot, and a spawning executor starts one inside
    submit() while none is idle: every worker must start on the pool's starting thread, none inside the
    preparation thread's submits of groups (that held a job's input 2.6 s on an H100 machine)."""
    from concurrent.futures import ProcessPoolExecutor

    started: list[str] = []
    real = ProcessPoolExecutor._spawn_process

    def spawn(self):
        started.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(ProcessPoolExecutor, "_spawn_process", spawn)
    pool_first(monkeypatch)
    data = b"".join(json.dumps({"id": i, "prompt": f"p {i}"}).encode() + b"\n" for i in range(400))
    status, sink, runner = run_job(data, ahead=True, prepare_workers=3, max_in_flight=256)
    assert status == "ok" and len(sink.getvalue().splitlines()) == 400 and runner.pool_groups > 3
    assert started == ["flashgen-prepare-start"] * 3
