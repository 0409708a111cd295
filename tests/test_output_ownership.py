"""The output file is owned: one job per file (an flock held for the job's lifetime), and a failed write (a full
disk) leaves the file ending in a whole line, with a message naming the file, the error and the fix."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import pytest

import test_jobs_writer as writer_tests
from flashgen.jobs import generate
from flashgen.jobs.errors import ExitCode, FatalError
from flashgen.jobs.lock import OutputLock, lock_path
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import FAST, cli, proc_env, read_jsonl, tiny_model
from test_jobs_writer import run

LINES = [{"id": f"q{i}", "prompt": f"question number {i}"} for i in range(12)]


def write_input(tmp_path, lines=LINES):
    return writer_tests.write_input(tmp_path, lines)


def test_a_second_job_on_a_locked_output_is_refused_and_changes_nothing(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    out.write_text('{"id": "q0", "text": "a", "finish_reason": "stop"}\n')
    before = out.read_bytes()
    with OutputLock(out):  # another job holds it (a second open file description conflicts like a process)
        assert lock_path(out).read_text().split()[0] == str(os.getpid())
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = run(tmp_path, src, out, *extra)
            assert r.exit_code == ExitCode.FATAL, (extra, r.stderr)
            assert str(out) in r.stderr and f"pid {os.getpid()}" in r.stderr and "in use" in r.stderr
            assert "Traceback" not in r.stderr
            assert out.read_bytes() == before  # --overwrite did not truncate a file another job writes
        (tmp_path / "link.jsonl").symlink_to(out)  # the same file by another name: the same lock
        r = run(tmp_path, src, tmp_path / "link.jsonl", "--overwrite")
        assert r.exit_code == ExitCode.FATAL and "in use" in r.stderr and out.read_bytes() == before
        with OutputLock(tmp_path / "new.jsonl"):  # a new output is refused the same way when locked
            r = run(tmp_path, src, tmp_path / "new.jsonl")
            assert r.exit_code == ExitCode.FATAL and "in use" in r.stderr
    # The holder ended: the lock file is gone and the job runs.
    assert not lock_path(out).exists()
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert sorted(rec["id"] for rec in read_jsonl(out)) == sorted(line["id"] for line in LINES)
    assert not lock_path(out).exists()  # removed at the end of the job


def test_lock_held_by_another_process_then_killed(tmp_path):
    """A real second process holds the lock: refused, naming its pid; after kill -9 its lock file is left
    behind, but the kernel dropped the flock, so the next job runs."""
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    code = ("import sys, time; from pathlib import Path; from flashgen.jobs.lock import OutputLock; "
            "OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], env=proc_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        r = run(tmp_path, src, out)
        assert r.exit_code == ExitCode.FATAL
        assert str(out) in r.stderr and f"pid {holder.pid}" in r.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert lock_path(out).exists()  # stale: left by kill -9
    r = run(tmp_path, src, out)
    assert r.exit_code == 0, r.stderr
    assert len(read_jsonl(out)) == len(LINES) and not lock_path(out).exists()


def test_stale_lock_file_does_not_block_and_failed_jobs_release_the_lock(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    lock_path(out).write_text("999999999 some-host\n")  # a dead job's file; nobody holds the flock
    r = cli(["generate", src, "-o", out, "--model", tmp_path / "no-such-model", *FAST], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "cannot load model" in r.stderr
    assert not lock_path(out).exists()  # released although the job failed after taking it
    r = run(tmp_path, src, out)
    assert r.exit_code == 0, r.stderr
    r = cli(["generate", src, "--model", tiny_model(), *FAST], cwd=tmp_path)  # stdout: no lock involved
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == len(LINES)


class FullDisk(io.RawIOBase):
    """A file that takes `budget` more bytes, then fails with ENOSPC; the write that crosses the budget is
    partial (as a real one may be), so a record is left half written."""

    def __init__(self, f, budget: int, err: int = errno.ENOSPC):
        self.f, self.budget, self.err = f, budget, err

    def writable(self):
        return True

    def write(self, b):
        if self.budget <= 0:
            raise OSError(self.err, os.strerror(self.err))
        n = self.f.write(bytes(b[:self.budget]))
        self.budget -= n
        return n

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("budget", [1, 300, 700])
def test_disk_full_cuts_back_to_a_whole_line_then_resume_completes(tmp_path, monkeypatch, budget):
    src = write_input(tmp_path)
    assert run(tmp_path, src, tmp_path / "full.jsonl").exit_code == 0
    want = {rec["id"]: rec["text"] for rec in read_jsonl(tmp_path / "full.jsonl")}
    out = tmp_path / "out.jsonl"
    real = generate.open_output
    monkeypatch.setattr(generate, "open_output", lambda plan, results: FullDisk(real(plan, results), budget))
    r = run(tmp_path, src, out)
    monkeypatch.undo()
    assert r.exit_code == ExitCode.FATAL
    assert str(out) in r.stderr and "No space left on device" in r.stderr and "free space" in r.stderr
    assert "--resume" in r.stderr and "Traceback" not in r.stderr
    data = out.read_bytes()
    assert data == b"" or data.endswith(b"\n")  # cut back to its last whole line
    assert len(data) <= budget and all(json.loads(x)["id"] in want for x in data.splitlines())
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(out)
    assert sorted(rec["id"] for rec in recs) == sorted(want)  # every id exactly once
    assert {rec["id"]: rec["text"] for rec in recs} == want


def test_writer_io_error_names_file_and_stops_writing(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "old", "text": "", "finish_reason": "stop"}\n')  # appended to, as on --resume
    sink = FullDisk(open(path, "ab", buffering=0), 60, errno.EIO)
    w = OrderedWriter(sink, "completion", path=path)
    w.put(w.reserve(), {"id": 1, "text": "x" * 10})
    with pytest.raises(FatalError) as e:
        w.put(w.reserve(), {"id": 2, "text": "y" * 100})
    assert str(path) in str(e.value) and "Input/output error" in str(e.value) and "--resume" in str(e.value)
    with pytest.raises(FatalError):  # nothing more goes after a failed write
        w.put(w.reserve(), {"id": 3})
    sink.close()
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == ["old", 1]
    assert path.read_bytes().endswith(b"\n")
