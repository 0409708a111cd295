"""Output safety: no silent overwrite, --resume semantics, ordered whole lines."""
from __future__ import annotations

import io
import json

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import FAST, cli, read_jsonl, tiny_model

LINES = [{"id": f"q{i}", "prompt": f"question number {i}"} for i in range(6)]


def write_input(tmp_path, lines=LINES):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return src


def run(tmp_path, src, out, *extra):
    return cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, *extra], cwd=tmp_path)


def test_existing_output_is_never_overwritten_without_overwrite(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    out.write_text("precious\n")
    r = run(tmp_path, src, out)
    assert r.exit_code == ExitCode.FATAL
    assert str(out) in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert out.read_text() == "precious\n"
    r = run(tmp_path, src, out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert [rec["id"] for rec in read_jsonl(out)] == [line["id"] for line in LINES]
    out.write_text("")  # an empty file holds nothing to lose
    assert run(tmp_path, src, out).exit_code == 0


def test_output_flag_conflicts_are_fatal(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    out.write_text("x\n")
    r = run(tmp_path, src, out, "--resume", "--overwrite")
    assert r.exit_code == ExitCode.FATAL and "choose one" in r.stderr
    r = cli(["generate", src, "--resume", "--model", tiny_model()], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "--resume needs an output file" in r.stderr
    r = run(tmp_path, src, src, "--overwrite")
    assert r.exit_code == ExitCode.FATAL and "is the input file" in r.stderr
    r = run(tmp_path, src, tmp_path / "no-dir" / "out.jsonl")
    assert r.exit_code == ExitCode.FATAL and "does not exist" in r.stderr


def test_resume_skips_done_ids_drops_torn_tail_and_retries_errors(tmp_path):
    src, full = write_input(tmp_path), tmp_path / "full.jsonl"
    assert run(tmp_path, src, full).exit_code == 0
    want = {rec["id"]: rec["text"] for rec in read_jsonl(full)}
    # An earlier run that died: two results, an error record for q2, and half of the record for q3.
    done = full.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    error = json.dumps({"id": "q2", "error": {"code": "x", "message": "y"}}) + "\n"
    out.write_text(done[0] + done[1] + error + done[3][:20])
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert "2 lines already done" in r.stderr and "torn last line" in r.stderr and "1 error records" in r.stderr
    recs = read_jsonl(out)
    assert sorted(rec["id"] for rec in recs) == sorted(want)  # every id exactly once
    assert {rec["id"]: rec["text"] for rec in recs} == want  # greedy: the same text as one uninterrupted run
    assert "4 lines: 4 ok" in r.stderr and "2 already done" in r.stderr
    # Resuming a finished job does nothing; resuming into a missing file starts afresh.
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0 and "0 lines" in r.stderr and len(read_jsonl(out)) == len(LINES)
    r = run(tmp_path, src, tmp_path / "new.jsonl", "--resume")
    assert r.exit_code == 0 and len(read_jsonl(tmp_path / "new.jsonl")) == len(LINES)


def test_resume_refuses_a_file_that_is_not_flashgen_output(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    out.write_text('{"id": "q0", "text": "a", "finish_reason": "stop"}\nthis is not json\n')
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == ExitCode.FATAL and "line 2" in r.stderr and "--overwrite" in r.stderr


def test_duplicate_ids_keep_one_result_per_id_across_resume(tmp_path):
    lines = LINES[:3] + [{"id": "q1", "prompt": "dup"}]
    src, out = write_input(tmp_path, lines), tmp_path / "out.jsonl"
    r = run(tmp_path, src, out)
    assert r.exit_code == ExitCode.LINE_ERRORS
    recs = read_jsonl(out)
    assert [rec["id"] for rec in recs] == ["q0", "q1", "q2", "q1"] and recs[3]["error"]["code"] == "duplicate_id"
    r = run(tmp_path, src, out, "--resume")  # the duplicate's error record is re-made, not doubled
    assert r.exit_code == ExitCode.LINE_ERRORS
    recs2 = read_jsonl(out)
    assert [rec["id"] for rec in recs2] == ["q0", "q1", "q2", "q1"] and recs2[:3] == recs[:3]


def test_ordered_writer_keeps_input_order_and_flushes_whole_lines():
    class Sink(io.RawIOBase):
        def __init__(self):
            self.data, self.flushes = b"", 0

        def writable(self):
            return True

        def write(self, b):  # a raw file may take only part of a write: the writer must finish the line
            n = min(len(b), 7)
            self.data += bytes(b[:n])
            return n

        def flush(self):
            self.flushes += 1

    sink = Sink()
    w = OrderedWriter(sink, "input")
    seqs = [w.reserve() for _ in range(4)]
    for s in (2, 0, 3):
        w.put(seqs[s], {"id": s, "text": "ü" * 5})
    assert [json.loads(x)["id"] for x in sink.data.decode().splitlines()] == [0]
    assert w.pending == 3
    w.put(seqs[1], {"id": 1})
    assert [json.loads(x)["id"] for x in sink.data.decode().splitlines()] == [0, 1, 2, 3]
    assert w.pending == 0 and sink.flushes == 4


def test_ordered_writer_flushes_finished_records_on_interrupt():
    sink = io.BytesIO()
    w = OrderedWriter(sink, "input")
    a, b, c = w.reserve(), w.reserve(), w.reserve()
    w.put(c, {"id": "c"})
    w.put(b, {"id": "b"})
    assert sink.getvalue() == b""  # waiting for a
    w.flush_finished()
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == ["b", "c"]
    w.put(a, {"id": "a", "text": "\ud800"})  # after an interrupt: written as it finishes; lone surrogates escaped
    assert json.loads(sink.getvalue().splitlines()[-1])["text"] == "\ud800"
