"""CLI conventions through the real `flashgen` CLI on a tiny random checkpoint: --version, --help defaults,
ambiguous prompt fields, summary wording, the token-based ETA, --system, compressed input and output."""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.progress import JobStats, TokenRate, eta_seconds
from test_cli_support import FAST, cli, gen, read_jsonl, tiny_model

HAS_ZSTD = importlib.util.find_spec("zstandard") is not None


# ---- a line with both "prompt" and "messages" ------------------------------------------------------------------

def test_prompt_and_messages_on_one_line_is_an_error_record(tmp_path):
    lines = [{"id": "both", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
             {"id": "ok", "prompt": "hi"}]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    err = recs[0]
    assert err["id"] == "both" and err["error"]["code"] == "ambiguous_prompt"
    msg = err["error"]["message"]
    assert '"prompt"' in msg and '"messages"' in msg and "keep one of them" in msg
    assert "text" in recs[1] and "error" not in recs[1]


# ---- --version ---------------------------------------------------------------------------------------------------

def test_version(tmp_path):
    from flashgen import __version__

    r = cli(["--version"], cwd=tmp_path)
    assert r.exit_code == 0 and r.stdout.strip() == f"flashgen {__version__}"


# ---- --help shows defaults ---------------------------------------------------------------------------------------

def test_help_shows_defaults(tmp_path):
    r = cli(["generate", "--help"], cwd=tmp_path)
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for default in ("[default: (256)]", "[default: (1.0)]", "[default: (input)]", "[default: (no-chat)]"):
        assert default in text, default


# ---- summary wording and ETA -------------------------------------------------------------------------------------

def test_summary_says_one_line(tmp_path):
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "hello"}], "--ignore-eos")
    assert r.exit_code == 0, r.stderr
    assert "1 line: 1 ok, 0 errors" in r.stderr and "1 lines" not in r.stderr


def test_summary_never_shows_zero_rate_for_work_done():
    s = JobStats(status="ok", exit_code=0, lines=1, ok=1, errors=1, prompt_tokens=5, completion_tokens=4)
    s.wall_seconds, s.tok_s = 0.0, 0.0  # done in less time than the clock can tell
    text = s.summary()
    assert "1 line: 1 ok, 1 error |" in text
    assert "0 tok/s" not in text and "n/a tok/s (prefill n/a, decode n/a)" in text
    s.tok_s, s.decode_tok_s, s.prefill_tok_s = 0.4, 2.5, 1234.0
    assert "0.4 tok/s (prefill 1,234, decode 2.5)" in s.summary()
    idle = JobStats(status="ok", exit_code=0)
    assert "0 lines: 0 ok, 0 errors" in idle.summary() and "0 tok/s" in idle.summary()  # no work: a true 0


def test_eta_comes_from_tokens_not_lines():
    # 9 of 10 lines done, 100 tokens each, 100 tok/s: one line of 100 tokens is left -> 1 s, whatever the line rate.
    assert eta_seconds(1, 9, 900, 100.0) == pytest.approx(1.0)
    # tokens already generated for the running line count as done
    assert eta_seconds(1, 9, 900, 100.0, tokens_in_flight=60) == pytest.approx(0.4)
    assert eta_seconds(1, 9, 900, 100.0, tokens_in_flight=500) == 0.0
    assert eta_seconds(0, 10, 1000, 100.0) == 0.0
    # no honest estimate: total unknown (stdin), no finished line, no rate yet
    assert eta_seconds(None, 9, 900, 100.0) is None
    assert eta_seconds(5, 0, 0, 100.0) is None
    assert eta_seconds(5, 3, 300, 0.0) is None


def test_token_rate_is_recent():
    rate = TokenRate(window=10)
    assert rate.add(0.0, 0) == 0.0
    assert rate.add(5.0, 500) == pytest.approx(100.0)
    for t in range(6, 60):
        r = rate.add(float(t), 500 + (t - 5) * 10)  # the rate drops to 10 tok/s
    assert r == pytest.approx(10.0)  # the first, fast seconds have left the window


def test_progress_bar_shows_a_token_eta(tmp_path):
    r, _ = gen(tmp_path, [{"id": i, "prompt": "hello"} for i in range(3)], "--progress", "--ignore-eos")
    assert r.exit_code == 0, r.stderr
    assert "3/3" in r.stderr and "ETA 0:00:00" in r.stderr


# ---- --system ----------------------------------------------------------------------------------------------------

def _chat_ids(msgs):
    from flashgen.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model())
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)


def test_system_message_is_added_to_chat_lines(tmp_path):
    system = "You are terse."
    user = {"role": "user", "content": "hello there"}
    own = {"role": "system", "content": "Be verbose."}
    want = _chat_ids([{"role": "system", "content": system}, user])
    lines = [{"id": "m", "messages": [user]}, {"id": "own", "messages": [own, user]},
             {"id": "ref", "prompt_token_ids": want}]
    r, recs = gen(tmp_path, lines, "--system", system, "--max-tokens", "6")
    assert r.exit_code == 0, r.stderr
    by = {rec["id"]: rec for rec in recs}
    assert by["m"]["usage"]["prompt_tokens"] == len(want) and by["m"]["text"] == by["ref"]["text"]
    assert by["own"]["usage"]["prompt_tokens"] == len(_chat_ids([own, user]))  # the line's own system message wins
    # a text prompt with --chat gets it too; without --chat a text prompt is left alone
    r, recs = gen(tmp_path, [{"id": "c", "prompt": "hello there"}], "--system", system, "--chat",
                  "--max-tokens", "6")
    assert r.exit_code == 0 and recs[0]["usage"]["prompt_tokens"] == len(want)
    r, plain = gen(tmp_path, [{"id": "c", "prompt": "hello there"}], "--system", system, "--max-tokens", "6")
    r0, base = gen(tmp_path, [{"id": "c", "prompt": "hello there"}], "--max-tokens", "6")
    assert plain[0]["usage"] == base[0]["usage"]


def test_system_message_is_part_of_the_request_hash(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                           for i in range(3)))
    base = ["generate", src, "-o", out, "--model", tiny_model(), *FAST]
    r = cli([*base, "--system", "A"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    first = read_jsonl(out)
    r = cli([*base, "--system", "A", "--resume"], cwd=tmp_path)
    assert r.exit_code == 0 and "0 lines" in r.stderr and read_jsonl(out) == first  # same system: nothing to do
    r = cli([*base, "--system", "B", "--resume"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "3 results were made" in r.stderr and "3 lines: 3 ok" in r.stderr  # another system prompt: rerun
    assert {rec["request_hash"] for rec in read_jsonl(out)}.isdisjoint(rec["request_hash"] for rec in first)


# ---- compressed input and output ---------------------------------------------------------------------------------

LINES = [{"id": i, "prompt": f"hello {i}"} for i in range(4)]
JSONL = "".join(json.dumps(x) + "\n" for x in LINES).encode()


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_compressed_input_and_output(tmp_path, suffix, opener):
    src, out, plain = tmp_path / f"in.jsonl{suffix}", tmp_path / f"out.jsonl{suffix}", tmp_path / "plain.jsonl"
    with opener(src, "wb") as f:
        f.write(JSONL)
    (tmp_path / "in.jsonl").write_bytes(JSONL)
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, "--progress"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "4/4" in r.stderr  # the total is counted from the decompressed lines
    r = cli(["generate", tmp_path / "in.jsonl", "-o", plain, "--model", tiny_model(), *FAST], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    with opener(out, "rb") as f:
        got = [json.loads(line) for line in f.read().decode().splitlines()]
    assert got == read_jsonl(plain)


def test_resume_on_compressed_output_is_refused_before_the_model_loads(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl.gz"
    src.write_bytes(JSONL)
    with gzip.open(out, "wb") as f:
        f.write(b"")
    r = cli(["generate", src, "-o", out, "--model", tmp_path / "no-such-model", *FAST, "--resume"], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    assert "--resume cannot continue the compressed output" in r.stderr and "out.jsonl.gz" in r.stderr
    assert "cannot load model" not in r.stderr


def test_resume_with_compressed_input_and_plain_output(tmp_path):
    src, out = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl"
    with gzip.open(src, "wb") as f:
        f.write(JSONL)
    out.write_text(json.dumps({"id": 0, "text": "old", "finish_reason": "length", "usage": {}}) + "\n")
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, "--resume"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "3 lines: 3 ok" in r.stderr and "1 already done" in r.stderr
    assert [rec["id"] for rec in read_jsonl(out)] == [0, 1, 2, 3]


def test_broken_compressed_input_is_a_clear_error(tmp_path):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(JSONL)  # named .gz, but plain text
    r = cli(["generate", src, "--model", tmp_path / "no-such-model", *FAST], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    assert "in.jsonl.gz" in r.stderr and "not a valid .gz file" in r.stderr


@pytest.mark.skipif(HAS_ZSTD, reason="zstandard is installed")
def test_zst_without_zstandard_names_the_fix(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(JSONL)
    r = cli(["generate", src, "-o", tmp_path / "out.jsonl.zst", "--model", tmp_path / "no-such-model", *FAST],
            cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    assert "out.jsonl.zst" in r.stderr and "pip install zstandard" in r.stderr
    (tmp_path / "in.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    r = cli(["generate", tmp_path / "in.jsonl.zst", "--model", tmp_path / "no-such-model", *FAST], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL
    assert "in.jsonl.zst" in r.stderr and "pip install zstandard" in r.stderr


@pytest.mark.skipif(not HAS_ZSTD, reason="needs the zstandard package")
def test_zst_input_and_output(tmp_path):
    import zstandard

    src, out = tmp_path / "in.jsonl.zst", tmp_path / "out.jsonl.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(JSONL))
    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    with zstandard.open(out, "rb") as f:
        got = [json.loads(line) for line in f.read().decode().splitlines()]
    assert [rec["id"] for rec in got] == [0, 1, 2, 3] and all("text" in rec for rec in got)
