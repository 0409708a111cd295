"""--resume integrity: in-place compaction (crash-safe through its journal), refusing files that are not
flashgen output, request hashes that rerun changed lines, and ids the input does not have."""
from __future__ import annotations

import functools
import json
import random

import pytest

from flashgen.jobs import compact
from flashgen.jobs.errors import ExitCode
from flashgen.jobs.fingerprint import KeyHashMap, job_fingerprint, request_hash
from test_cli_support import FAST, cli, read_jsonl, tiny_model

LINES = [{"id": f"q{i}", "prompt": f"question number {i}"} for i in range(8)]


def write_input(tmp_path, lines=LINES, name="in.jsonl"):
    src = tmp_path / name
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return src


def run(tmp_path, src, out, *extra, input=None):
    return cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, *extra], cwd=tmp_path, input=input)


# ---- in-place compaction ------------------------------------------------------------------------------------------

def make_file(path, n=200, seed=0, torn=True):
    rng = random.Random(seed)
    lines = [json.dumps({"id": i, "drop": rng.random() < 0.3, "pad": "x" * rng.choice([0, 5, 40, 300])}).encode()
             + b"\n" for i in range(n)]
    path.write_bytes(b"".join(lines) + (b'{"id": "torn' if torn else b""))
    return lines


def keep(line: bytes) -> bool:
    return not json.loads(line)["drop"]


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])
def test_compaction_keeps_exactly_the_kept_lines_in_order(tmp_path, chunk, no_fsync):
    path = tmp_path / "out.jsonl"
    lines = make_file(path)
    first = next(i for i, x in enumerate(lines) if not keep(x))
    start = sum(map(len, lines[:first]))
    size = compact.compact(path, keep, start=start, chunk=chunk)
    assert path.read_bytes() == b"".join(x for x in lines if keep(x)) and size == path.stat().st_size
    assert not compact.journal_path(path).exists()


@pytest.fixture
def no_fsync(monkeypatch):
    """The compaction's logic, not the disk's speed: fsync is what makes it survive a power cut, not a crash."""
    monkeypatch.setattr(compact.os, "fsync", lambda fd: None)


class Crash(Exception):
    pass


def crash_at(stage: str, k: int):
    def hook(s, seq):
        if s == stage and seq == k:
            raise Crash(f"{s} {seq}")
    return hook


@pytest.mark.parametrize("stage", ["journaled", "written"])
@pytest.mark.parametrize("k", [1, 2, 5, 17])
@pytest.mark.parametrize("damage", [False, True])
def test_a_crash_mid_compaction_is_finished_by_replaying_the_journal(tmp_path, stage, k, damage, no_fsync):
    path = tmp_path / "out.jsonl"
    chunk = 64  # long lines (over 300 bytes) move in pieces
    lines = make_file(path)
    with pytest.raises(Crash):
        compact.compact(path, keep, chunk=chunk, hook=crash_at(stage, k))
    journal = compact.journal_path(path)
    assert journal.exists() and journal.stat().st_size <= 16 + 2 * (32 + chunk)  # bounded by the chunk
    if damage and stage == "journaled":  # the newest slot was torn: the older one is replayed
        blob = bytearray(journal.read_bytes())
        slot = 16 + (k % 2) * (32 + chunk)
        blob[slot + 40] ^= 0xFF
        journal.write_bytes(bytes(blob))
    assert compact.recover(path)
    assert not journal.exists()
    got = path.read_bytes().splitlines(keepends=True)
    if got and not got[-1].endswith(b"\n"):  # nothing was committed: the torn tail is the scan's to drop
        assert k == 1 and damage and got[-1] == b'{"id": "torn'
        got.pop()
    kept = [x for x in lines if keep(x)]
    it = iter(lines)
    assert all(x in it for x in got)               # a subsequence of the original whole lines, in order
    assert set(kept) <= set(got)                   # no kept line lost
    # A crash during the recovery itself is recovered the same way.
    compact.compact(path, lambda line: True, chunk=chunk)  # no-op: no drops
    with pytest.raises(Crash):
        compact.compact(path, keep, chunk=chunk, hook=crash_at("written", 1))
    with pytest.raises(Crash):
        compact.recover(path, hook=crash_at("journaled", 3))
    assert compact.recover(path)
    compact.compact(path, keep, chunk=chunk)  # the next --resume's own compaction
    assert path.read_bytes() == b"".join(kept)


def test_resume_killed_mid_compaction_then_resumed_gives_every_id_once(tmp_path, monkeypatch):
    lines = [{"id": f"q{i}", "prompt": f"question number {i}", "max_tokens": 12, "ignore_eos": True}
             for i in range(16)]
    src, full = write_input(tmp_path, lines), tmp_path / "full.jsonl"
    assert run(tmp_path, src, full).exit_code == 0
    want = {rec["id"]: rec["text"] for rec in read_jsonl(full)}
    out = tmp_path / "out.jsonl"
    recs = full.read_text().splitlines(keepends=True)
    err = [json.dumps({"id": f"q{i}", "error": {"code": "x", "message": "y"}}) + "\n" for i in (1, 5, 9)]
    recs[1], recs[5], recs[9] = err
    out.write_text("".join(recs))
    real = compact.compact
    monkeypatch.setattr(compact, "compact", functools.partial(real, chunk=200, hook=crash_at("journaled", 3)))
    r = run(tmp_path, src, out, "--resume")
    monkeypatch.undo()
    assert r.exit_code == ExitCode.FATAL and compact.journal_path(out).exists()
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert "interrupted compaction" in r.stderr and "error records dropped" in r.stderr
    got = read_jsonl(out)
    assert sorted(rec["id"] for rec in got) == sorted(want)  # every id exactly once
    assert {rec["id"]: rec["text"] for rec in got} == want
    assert not compact.journal_path(out).exists()
    assert not list(tmp_path.glob(".*resume-tmp"))


# ---- what --resume accepts ----------------------------------------------------------------------------------------

def test_resume_refuses_an_output_that_is_the_input_data(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    out.write_bytes(src.read_bytes())  # e.g. -o pointed at a copy of the input
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == ExitCode.FATAL
    assert "line 1 is not a flashgen output record" in r.stderr and "input line" in r.stderr
    assert out.read_bytes() == src.read_bytes()


def test_changed_lines_and_settings_rerun_on_resume(tmp_path):
    batch = {"custom_id": "b1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello"}}
    src, out = write_input(tmp_path, LINES + [batch]), tmp_path / "out.jsonl"
    assert run(tmp_path, src, out).exit_code == 0
    first = read_jsonl(out)
    assert all(len(rec["request_hash"]) == 12 for rec in first)  # batch lines too (top-level key)
    # Same input, reformatted (spacing, key order): nothing reruns.
    src.write_text("".join(json.dumps(dict(reversed(list(x.items()))), indent=None, separators=(",", ":")) + "\n"
                           for x in LINES + [batch]))
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0 and "9 lines already done" in r.stderr and "0 lines" in r.stderr
    # Two lines change: their results are stale, dropped in place, and they run again.
    changed = [dict(x) for x in LINES]
    changed[2]["prompt"] = "a different question"
    b2 = {**batch, "body": {"prompt": "hello there"}}
    write_input(tmp_path, changed + [b2])
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert "2 results were made from input lines or settings that changed" in r.stderr
    assert '"q2"' in r.stderr and '"b1"' in r.stderr and "2 lines: 2 ok" in r.stderr
    recs = read_jsonl(out)
    keys = [rec.get("custom_id", rec["id"]) for rec in recs]
    assert sorted(keys) == sorted([x["id"] for x in LINES] + ["b1"])
    fp = {rec.get("custom_id", rec["id"]): rec["request_hash"] for rec in recs}
    old = {rec.get("custom_id", rec["id"]): rec["request_hash"] for rec in first}
    assert [k for k in fp if fp[k] != old[k]] == ["q2", "b1"]
    # A changed setting (max_tokens) changes every line's hash: all of them run again.
    r = run(tmp_path, src, out, "--resume", "--max-tokens", "3")
    assert r.exit_code == 0, r.stderr
    assert "9 results were made" in r.stderr and "9 lines: 9 ok" in r.stderr
    assert sorted(rec.get("custom_id", rec["id"]) for rec in read_jsonl(out)) == sorted(keys)


def test_records_without_hash_count_as_unchanged_and_foreign_ids_are_reported(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    assert run(tmp_path, src, out).exit_code == 0
    recs = read_jsonl(out)
    for rec in recs:
        del rec["request_hash"]  # as an older flashgen wrote them
    extra = [{"id": f"gone{i}", "text": "t", "finish_reason": "stop", "usage": {}} for i in range(7)]
    out.write_text("".join(json.dumps(rec) + "\n" for rec in recs[:5] + extra))
    changed = [dict(x) for x in LINES]
    changed[0]["prompt"] = "changed, but its old record has no hash"
    write_input(tmp_path, changed)
    r = run(tmp_path, src, out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert "7 results in" in r.stderr and "not in" in r.stderr and '"gone0"' in r.stderr and "..." in r.stderr
    assert "3 lines: 3 ok" in r.stderr  # q5..q7 only: q0 kept its old result
    ids = [rec["id"] for rec in read_jsonl(out)]
    assert sorted(ids) == sorted([x["id"] for x in LINES] + [e["id"] for e in extra])  # foreign ids kept


def test_stdin_resume_warns_about_a_changed_line_and_keeps_its_result(tmp_path):
    src, out = write_input(tmp_path), tmp_path / "out.jsonl"
    assert run(tmp_path, src, out).exit_code == 0
    before = out.read_bytes()
    changed = [dict(x) for x in LINES]
    changed[3]["prompt"] = "changed"
    text = "".join(json.dumps(x) + "\n" for x in changed)
    r = cli(["generate", "-", "-o", out, "--model", tiny_model(), *FAST, "--resume"], cwd=tmp_path, input=text)
    assert r.exit_code == 0, r.stderr
    assert "line 4 (id 'q3')" in r.stderr and "old result was kept" in r.stderr
    assert r.stderr.count("warning") == 1
    assert out.read_bytes() == before


# ---- the pieces -------------------------------------------------------------------------------------------------

def test_request_hash_is_canonical_and_depends_on_settings():
    a = {"id": 1, "prompt": "p", "x": [1, {"b": 2, "a": "ü"}]}
    b = json.loads(json.dumps({"x": [1, {"a": "ü", "b": 2}], "prompt": "p", "id": 1}, indent=2))
    assert request_hash(a) == request_hash(b) and len(request_hash(a)) == 12
    assert request_hash({"id": 1, "prompt": "q"}) != request_hash({"id": 1, "prompt": "p"})
    assert request_hash({"t": "\ud800"})  # lone surrogates do not break it
    base = {"temperature": 0.0, "max_tokens": 4}
    fp = job_fingerprint(base)
    assert fp == job_fingerprint(dict(base)) != job_fingerprint({**base, "max_tokens": 5})
    assert fp != job_fingerprint(base, field="text") and fp != job_fingerprint(base, chat=True)
    assert request_hash(a, fp) != request_hash(a, job_fingerprint(base, chat=True))


def test_key_hash_map_grows_and_keeps_the_first_value():
    m = KeyHashMap(4)
    for i in range(5000):
        assert m.put_first(json.dumps(i), i + 1)
    assert not m.put_first(json.dumps(7), 99) and m.get(json.dumps(7)) == 8
    assert len(m) == 5000 and all(m.get(json.dumps(i)) == i + 1 for i in range(0, 5000, 7))
    assert m.get('"absent"') is None and json.dumps(3) in m
    m.clear_value(json.dumps(3))
    assert m.get(json.dumps(3)) == 0 and json.dumps(3) in m
