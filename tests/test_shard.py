"""Sharded jobs (`generate --shard K/N`) and `flashgen merge`, through the real CLI on a tiny random checkpoint:
shards merged equal one job byte for byte (error records, lines without ids and an id shared across shards
included), --shard auto from Slurm's variables, {shard} in file names, per-shard resume, and merge's refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.shard import Shard, parse_shard
from test_cli_support import FAST, cli, read_jsonl, tiny_model

# Physical line 3 is blank (not a line: shard indices skip it); line 4 is not JSON; line 6 has a misspelled field;
# lines 2 and 9 have no id (their line numbers stand in); "d" is on lines 5 and 7, which land in shards 0 and 2 of 3.
LINES = [{"id": "a", "prompt": "hello"}, {"prompt": "no id here"}, "", "not json", {"id": "d", "prompt": "dup first"},
         {"id": "b", "prompt": "x", "temprature": 1}, {"id": "d", "prompt": "dup second"},
         {"id": 7, "prompt": "seven"}, {"prompt": "another no id"},
         {"id": "e", "messages": [{"role": "user", "content": "hi"}]}]
SHARD_IDS = [["a", "d", 7], [2, "b", 9], [4, "d", "e"]]  # index % 3: the blank line counts for nothing


def write_input(path: Path, lines=LINES) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def generate(cwd: Path, *args) -> object:
    return cli(["generate", "in.jsonl", "--model", tiny_model(), *FAST, *args], cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One job over the whole input (single.jsonl) and its three shards (out.0K-of-03.jsonl)."""
    d = tmp_path_factory.mktemp("shards")
    write_input(d / "in.jsonl")
    r = generate(d, "-o", "single.jsonl")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    for k in range(3):
        r = generate(d, "-o", "out.{shard}.jsonl", "--shard", f"{k}/3", "--stats-json", "stats.{shard}.json")
        assert r.exit_code in (ExitCode.OK, ExitCode.LINE_ERRORS), r.stderr
        assert f"shard {k}/3" in r.stderr
    return d


def copy_runs(runs: Path, tmp: Path) -> Path:
    for p in runs.iterdir():
        shutil.copy(p, tmp / p.name)
    return tmp


def merge(cwd: Path, *args) -> object:
    return cli(["merge", *args], cwd=cwd)


# ---- shards + merge == one job ---------------------------------------------------------------------------------

def test_shards_merged_equal_one_job_byte_for_byte(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    for k, ids in enumerate(SHARD_IDS):
        out = d / f"out.0{k}-of-03.jsonl"
        assert [rec["id"] for rec in read_jsonl(out)] == ids  # {shard} expanded: K and N, two digits
        stats = json.loads((d / f"stats.0{k}-of-03.json").read_text())
        assert stats["shard"] == f"{k}/3" and stats["output"] == out.name and stats["lines"] == 3
    r = merge(d, "out.*-of-03.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")  # a quoted glob
    assert r.exit_code == ExitCode.OK, r.stderr
    assert (d / "merged.jsonl").read_bytes() == (d / "single.jsonl").read_bytes()
    recs = read_jsonl(d / "merged.jsonl")
    assert [rec.get("error", {}).get("code") for rec in recs].count("duplicate_id") == 1  # line 7, as one job says
    assert "merged 9 of 9 lines" in r.stderr
    # a directory, and stdout; the output itself is never read as a shard
    (d / "shards").mkdir()
    for k in range(3):
        shutil.copy(d / f"out.0{k}-of-03.jsonl", d / "shards")
    r = merge(d, "shards", "--input", "in.jsonl")
    assert r.exit_code == ExitCode.OK, r.stderr
    assert r.stdout.encode() == (d / "single.jsonl").read_bytes()


def test_merge_writes_compressed_output_and_refuses_to_overwrite(runs, tmp_path):
    import gzip

    d = copy_runs(runs, tmp_path)
    args = ["out.00-of-03.jsonl", "out.01-of-03.jsonl", "out.02-of-03.jsonl", "--input", "in.jsonl", "-o", "m.jsonl.gz"]
    assert merge(d, *args).exit_code == ExitCode.OK
    assert gzip.decompress((d / "m.jsonl.gz").read_bytes()) == (d / "single.jsonl").read_bytes()
    r = merge(d, *args)
    assert r.exit_code == ExitCode.FATAL and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert merge(d, *args, "--overwrite").exit_code == ExitCode.OK


# ---- --shard auto ----------------------------------------------------------------------------------------------

def test_shard_auto_reads_a_slurm_array_starting_at_1(runs, tmp_path, monkeypatch):
    write_input(tmp_path / "in.jsonl")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    r = generate(tmp_path, "-o", "out.{shard}.jsonl", "--shard", "auto")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert (tmp_path / "out.01-of-03.jsonl").read_bytes() == (runs / "out.01-of-03.jsonl").read_bytes()


def test_shard_auto_without_slurm_names_the_variables(tmp_path, monkeypatch):
    write_input(tmp_path / "in.jsonl")
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    r = generate(tmp_path, "-o", "out.jsonl", "--shard", "auto", "--model", tmp_path / "no-such-model")
    assert r.exit_code == ExitCode.FATAL
    assert "SLURM_ARRAY_TASK_ID" in r.stderr and "SLURM_ARRAY_TASK_COUNT" in r.stderr and "--array" in r.stderr
    assert "cannot load model" not in r.stderr and not (tmp_path / "out.jsonl").exists()


def test_shard_auto_units():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert parse_shard("auto", env) == Shard(7, 8)
    assert parse_shard("auto", {**env, "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(7, 8)
    assert parse_shard(" 2/5 ") == Shard(2, 5) and parse_shard("") is None
    assert Shard(3, 10).label == "03-of-10" and Shard(3, 8).label == "03-of-08" and Shard(3, 100).label == "003-of-100"
    with pytest.raises(Exception, match="evenly spaced"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_MAX": "9"})  # --array=0,1,9: ids do not number shards
    with pytest.raises(Exception, match="not an integer"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_ID": "x"})


# ---- bad --shard values: exit 2 before the model loads ----------------------------------------------------------

@pytest.mark.parametrize("value,words", [("3/3", "numbered 0 to 2"), ("-1/2", "numbered 0 to 1"),
                                         ("x/y", "not a shard"), ("1/0", "at least 1")])
def test_bad_shard_is_refused_before_the_model_loads(tmp_path, value, words):
    write_input(tmp_path / "in.jsonl")
    r = cli(["generate", "in.jsonl", "-o", "out.jsonl", "--model", tmp_path / "no-such-model", *FAST,
             "--shard", value], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0] and "--shard" in errors[0], r.stderr
    assert "cannot load model" not in r.stderr and not (tmp_path / "out.jsonl").exists()


def test_shard_placeholder_needs_a_shard(tmp_path):
    write_input(tmp_path / "in.jsonl")
    r = cli(["generate", "in.jsonl", "-o", "out.{shard}.jsonl", "--model", tmp_path / "no-such-model", *FAST],
            cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "{shard}" in r.stderr and "--shard K/N" in r.stderr


# ---- resume of one shard ---------------------------------------------------------------------------------------

def test_resume_one_shard_after_losing_its_last_lines(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    out = d / "out.02-of-03.jsonl"
    whole = out.read_bytes()
    kept = b"".join(whole.splitlines(keepends=True)[:2])  # line 4's error record and line 7's
    out.write_bytes(kept + b'{"id": "e", "te')  # a killed shard: its last line torn
    r = merge(d, "out.*-of-03.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.INCOMPLETE and not (d / "merged.jsonl").exists()
    assert "out.02-of-03.jsonl ends in a torn line" in r.stderr
    assert '1 of 9 input lines of in.jsonl have no record (ids "e"), in shard 2/3' in r.stderr, r.stderr
    r = generate(d, "-o", "out.{shard}.jsonl", "--shard", "2/3", "--resume")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert "not in" not in r.stderr  # the other shards' lines are neither missing nor foreign here
    assert "1 lines already done" in r.stderr and "torn last line dropped" in r.stderr
    # the error record was dropped and rerun, so it comes last now: only the input can give merge the order
    assert sorted(out.read_bytes().splitlines()) == sorted(whole.splitlines()) and out.read_bytes() != whole
    r = merge(d, "out.*-of-03.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.OK, r.stderr
    assert (d / "merged.jsonl").read_bytes() == (d / "single.jsonl").read_bytes()


def test_resume_into_another_shards_output_lists_its_ids_as_foreign(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    r = generate(d, "-o", "out.00-of-03.jsonl", "--shard", "1/3", "--resume")
    assert "3 results in out.00-of-03.jsonl have ids that are not in shard 1/3 of in.jsonl" in r.stderr, r.stderr


# ---- merge's refusals ------------------------------------------------------------------------------------------

def test_merge_refuses_a_missing_shard(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    r = merge(d, "out.00-of-03.jsonl", "out.02-of-03.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.INCOMPLETE and not (d / "merged.jsonl").exists()
    assert "3 of 9 input lines" in r.stderr and '2, "b", 9' in r.stderr and "no file for shard 1/3" in r.stderr
    r = merge(d, "out.00-of-03.jsonl", "out.02-of-03.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl",
              "--allow-missing")
    assert r.exit_code == ExitCode.INCOMPLETE
    assert [rec["id"] for rec in read_jsonl(d / "merged.jsonl")] == ["a", 4, "d", "d", 7, "e"]


def test_merge_refuses_a_duplicated_id_naming_the_files(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    shutil.copy(d / "out.01-of-03.jsonl", d / "again.jsonl")
    r = merge(d, "out.*-of-03.jsonl", "again.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.INCOMPLETE and not (d / "merged.jsonl").exists()
    assert '"b" (2 records for 1 input line: out.01-of-03.jsonl line 2, again.jsonl line 2)' in r.stderr, r.stderr


def test_merge_refuses_a_foreign_id(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    (d / "extra.jsonl").write_text(json.dumps({"id": "zzz", "text": "x", "finish_reason": "length"}) + "\n")
    r = merge(d, "out.*-of-03.jsonl", "extra.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.INCOMPLETE and not (d / "merged.jsonl").exists()
    assert '1 records have ids that no line of in.jsonl has (ids "zzz"), in extra.jsonl' in r.stderr, r.stderr


def test_merge_needs_the_input(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    r = merge(d, "out.*-of-03.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.FATAL and "--input" in r.stderr and not (d / "merged.jsonl").exists()
    r = merge(d, "in.jsonl", "--input", "in.jsonl")  # the input is never read as a shard output
    assert r.exit_code == ExitCode.FATAL and "no shard outputs" in r.stderr
    r = merge(d, "nothing.*.jsonl", "--input", "in.jsonl")
    assert r.exit_code == ExitCode.FATAL and "matches no file" in r.stderr


def test_merge_without_shard_labels_refuses_an_id_that_ran_in_two_shards(runs, tmp_path):
    d = copy_runs(runs, tmp_path)
    for k in range(3):  # names without KK-of-NN: which "d" result is line 5's cannot be told
        (d / f"out.0{k}-of-03.jsonl").rename(d / f"part{k}.jsonl")
    r = merge(d, "part*.jsonl", "--input", "in.jsonl", "-o", "merged.jsonl")
    assert r.exit_code == ExitCode.INCOMPLETE and not (d / "merged.jsonl").exists()
    assert 'ids "d"' in r.stderr and "shard label" in r.stderr, r.stderr
