"""Ray Data: `flashgen generate --ray` writes what a single-process run writes, byte for byte (error records, resume
included), and FlashgenPredictor answers rows in map_batches. One local Ray instance (4 logical CPUs, no dashboard)
serves the whole module; each job starts its 2 CPU actors on the tiny checkpoint."""
from __future__ import annotations

import json
import sys

import pytest

from flashgen.jobs.errors import ExitCode, FatalError
from test_cli_support import FAST, REPO, cli, read_jsonl, tiny_model

pytestmark = pytest.mark.slow

# Every kind of line the job answers: results, error records of both formats, a blank line, no id. (Logprobs: in
# the map_batches test; their float32 values depend on the batch a line ran in, at the last bit.)
LINES = [
    {"id": "a", "prompt": "The quick brown fox"},
    {"id": 2, "prompt": "Paged attention", "max_tokens": 2},
    "{not json",
    {"id": "bad", "prompt": "hi", "max_tokens": -3},
    {"id": "a", "prompt": "a duplicate id"},
    {"prompt": "no id here"},
    "",
    {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}},
    {"custom_id": "c2", "method": "POST", "url": "/v1/bogus", "body": {"prompt": "x"}},
    {"id": "z", "prompt_token_ids": [5, 6, 7]},
    {"id": 2, "prompt": "another duplicate, in another chunk"},
]
RAY = ["--ray", "local", "--ray-actors", "2", "--max-in-flight", "3"]  # chunks of 3 lines: several per actor


def same_records(got: bytes, want: bytes) -> None:
    """Byte for byte, but for the ids and times that OpenAI batch records draw afresh in every run."""
    assert got.count(b"\n") == want.count(b"\n")
    for a, b in zip(got.splitlines(), want.splitlines(), strict=True):
        if b'"custom_id"' not in b:
            assert a == b
            continue
        x, y = json.loads(a), json.loads(b)
        for rec in (x, y):
            rec["id"] = rec["response"]["request_id"] = None
            rec["response"]["body"].pop("id", None), rec["response"]["body"].pop("created", None)
        assert x == y


def write_input(path, lines=LINES):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # The workers import flashgen from this source tree, whatever is installed.
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The input and the single-process run's output, made once."""
    tmp = tmp_path_factory.mktemp("single")
    src = write_input(tmp / "in.jsonl")
    r = cli(["generate", src, "-o", tmp / "out.jsonl", "--model", tiny_model(), *FAST], cwd=tmp)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    return src, (tmp / "out.jsonl").read_bytes(), r.stderr


def summary_counts(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "flashgen: line_errors" in line).split("|")[0]


def test_ray_job_writes_the_single_process_output(ray_instance, single, tmp_path):
    src, expected, single_err = single
    out = tmp_path / "out.jsonl"
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, *RAY, "--stats-json", tmp_path / "s.json"],
            cwd=tmp_path)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    same_records(out.read_bytes(), expected)
    codes = [(rec.get("error") or {}).get("code") for rec in read_jsonl(out)]
    assert {"invalid_json", "invalid_param", "duplicate_id", "unsupported_url"} <= set(codes)
    assert [rec.get("id") for rec in read_jsonl(out)][5] == 6  # no id: its true line number
    assert summary_counts(r.stderr) == summary_counts(single_err)  # lines, ok, errors by code
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0 and stats["lines"] == len(LINES) - 1


def test_ray_resume_skips_done_ids(ray_instance, single, tmp_path):
    src, expected, _ = single
    lines = expected.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:6]) + lines[6][:10])  # 6 records (3 errors, run again), a torn one
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, *RAY, "--resume"], cwd=tmp_path)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert "3 already done" in r.stderr
    done = lines[:2] + lines[5:6]  # the results kept in place; the error records and the rest follow, in order
    same_records(out.read_bytes(), b"".join(done + [line for line in lines if line not in done]))


def test_predictor_in_map_batches(ray_instance, single):
    """Rows as raw lines and as fields; heterogeneous records (results, errors, both formats, logprobs) in several
    batches concatenate into one table; each record is the CLI's."""
    from flashgen.ray import FlashgenPredictor

    ray = ray_instance
    src, expected, _ = single
    raw = [line for line in src.read_text().splitlines() if line.strip()]
    linenos = [i for i, line in enumerate(src.read_text().splitlines(), 1) if line.strip()]
    keep = [i for i, line in enumerate(raw) if "duplicate" not in line]  # duplicates are found per batch only
    rows = [{"lineno": linenos[i], "line": raw[i]} for i in keep]
    rows.append({"lineno": 100, "line": json.dumps({"id": "lp", "prompt": "logprobs", "logprobs": 2})})
    kwargs = {"model": tiny_model(), "engine": {"device": "cpu", "max_num_seqs": 16},
              "sampling": {"temperature": 0, "max_tokens": 4}}
    ds = ray.data.from_items(rows).map_batches(
        FlashgenPredictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=1), batch_size=3,
        batch_format="pyarrow")
    import pyarrow as pa

    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("lineno")  # one schema across the batches
    records = got.column("record").to_pylist()
    want = expected.splitlines()
    same_records("\n".join(records[:-1]).encode() + b"\n", b"".join(want[i] + b"\n" for i in keep))
    assert len(json.loads(records[-1])["logprobs"]) == 4
    assert got.column("lineno").to_pylist() == [linenos[i] for i in keep] + [100]
    errors = got.column("error").to_pylist()
    assert errors[2] == "invalid_json" and errors[0] is None
    assert got.column("key").to_pylist()[0] == '"a"'
    # fields as columns (a null is a missing field), and a bad value: its error record, not a dead actor
    fields = [{"id": 1, "prompt": "hello", "max_tokens": 2}, {"id": 2, "prompt": "hi", "max_tokens": None},
              {"id": 3, "prompt": "x", "max_tokens": -1}]
    out = ray.data.from_items(fields).map_batches(
        FlashgenPredictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2,
        batch_format="pyarrow").take_all()
    recs = [json.loads(row["record"]) for row in out]
    assert [r["id"] for r in recs] == [1, 2, 3]
    assert recs[0]["usage"]["completion_tokens"] <= 2 and out[1]["error"] is None
    assert out[2]["error"] == "invalid_param" and recs[2]["error"]["code"] == "invalid_param"


def test_ray_refuses_stdin_and_compressed_input(ray_instance, tmp_path):
    r = cli(["generate", "-", "-o", tmp_path / "o.jsonl", "--model", tiny_model(), *FAST, "--ray", "local"],
            cwd=tmp_path, input='{"prompt": "x"}\n')
    assert r.exit_code == ExitCode.FATAL and "--ray needs the input as a file" in r.stderr
    (tmp_path / "in.jsonl.gz").write_bytes(b"")
    r = cli(["generate", tmp_path / "in.jsonl.gz", "-o", tmp_path / "o.jsonl", "--model", tiny_model(), *FAST,
             "--ray", "local"], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "decompress it" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_without_ray_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    src = write_input(tmp_path / "in.jsonl", LINES[:1])
    r = cli(["generate", src, "-o", tmp_path / "o.jsonl", "--model", tiny_model(), *FAST, "--ray", "auto"],
            cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "pip install 'flashgen[ray]'" in errors[0]


def test_predictor_options_are_checked_as_config_keys():
    from flashgen.ray import predictor_settings

    s = predictor_settings("m", {"device": "cpu"}, {"max_tokens": 3}, {"chat": True})
    assert s.engine["model"] == "m" and s.sampling["max_tokens"] == 3 and s.job["chat"] is True
    with pytest.raises(FatalError, match="max_tokens = -1 is invalid"):
        predictor_settings(None, None, {"max_tokens": -1}, None)
    with pytest.raises(FatalError, match="of a whole job"):
        predictor_settings(None, None, None, {"resume": True})
    with pytest.raises(FatalError, match="unknown sampling option 'temprature'"):
        predictor_settings(None, None, {"temprature": 0}, None)
