"""Progress bar, summary and --stats-json: all on stderr / in files, never on stdout."""
from __future__ import annotations

import json

from test_cli_support import FAST, cli, gen, tiny_model

LINES = [{"id": i, "prompt": "hello there"} for i in range(5)] + ["bad line"]


def test_progress_bar_and_summary_go_to_stderr(tmp_path):
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in LINES)
    r = cli(["generate", "-", "--model", tiny_model(), *FAST, "--progress"], cwd=tmp_path, input=text)
    assert r.exit_code == 1
    assert len(r.stdout.splitlines()) == 6 and all(json.loads(line) for line in r.stdout.splitlines())
    assert "6/? lines" in r.stderr and "tok/s" in r.stderr  # the last frame; stdin: no total
    assert "6 lines: 5 ok, 1 error (invalid_json 1)" in r.stderr and "exit 1" in r.stderr


def test_progress_is_off_when_stderr_is_not_a_terminal(tmp_path):
    r, _ = gen(tmp_path, LINES[:2])
    assert r.exit_code == 0
    assert "prefill" in r.stderr and "ETA" not in r.stderr  # only the summary
    r, _ = gen(tmp_path, LINES[:2], "--progress")
    assert "ETA" in r.stderr
    r, _ = gen(tmp_path, LINES[:2], "--quiet")
    assert r.exit_code == 0 and r.stderr.strip() == ""


def test_progress_total_comes_from_the_file(tmp_path):
    r, _ = gen(tmp_path, LINES[:4], "--progress")
    assert "4/4" in r.stderr


def test_stats_json(tmp_path):
    stats = tmp_path / "stats.json"
    r, recs = gen(tmp_path, LINES, "--stats-json", stats, "--ignore-eos")
    assert r.exit_code == 1
    s = json.loads(stats.read_text())
    assert s["status"] == "line_errors" and s["exit_code"] == 1
    assert (s["lines"], s["ok"], s["errors"], s["skipped"]) == (6, 5, 1, 0)
    assert s["completion_tokens"] == 20 == sum(rec["usage"]["completion_tokens"] for rec in recs if "usage" in rec)
    assert s["prompt_tokens"] == sum(rec["usage"]["prompt_tokens"] for rec in recs if "usage" in rec)
    assert s["wall_seconds"] > 0 and s["tok_s"] > 0 and s["decode_tok_s"] >= 0 and s["prefill_tok_s"] > 0
    assert s["error_codes"] == {"invalid_json": 1} and s["model"] == tiny_model()
    # A fatal error still leaves a stats file a scheduler can read.
    r, _ = gen(tmp_path, LINES, "--stats-json", stats, "--block-size", "3")
    assert r.exit_code == 2 and json.loads(stats.read_text())["status"] == "fatal"
