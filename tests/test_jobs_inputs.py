"""Bad input lines become error records naming line, field, value and fix, and the job goes on."""
from __future__ import annotations

import json

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.inputs import LineError, LineParser, LineRequest, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.settings import load_settings
from test_cli_support import FakeTokenizer, gen

GOOD = {"id": "good", "prompt": "hello"}
# (raw line, expected id, error code, substrings the message must contain)
BAD = [
    ("not json at all", 2, "invalid_json", ["line 2", "not valid JSON", "not json at all"]),
    ('["a", "list"]', 3, "not_an_object", ["line 3", '["a", "list"]', "JSON object"]),
    ('{"id": "no-prompt", "text": "x"}', "no-prompt", "missing_prompt", ["line 4", '"prompt"', "--field"]),
    ('{"id": "num", "prompt": 5}', "num", "invalid_field", ["line 5", 'field "prompt"', "5", "use a string"]),
    ('{"id": "empty", "prompt": ""}', "empty", "empty_prompt", ["line 6", 'field "prompt"', '""']),
    ('{"id": "temp", "prompt": "x", "temperature": "hot"}', "temp", "invalid_field",
     ["line 7", 'field "temperature"', '"hot"', "a number"]),
    ('{"id": "neg", "prompt": "x", "temperature": -1}', "neg", "invalid_param",
     ["line 8", "temperature", "-1", ">= 0"]),
    ('{"id": "vocab", "prompt_token_ids": [1, 2, 99999]}', "vocab", "invalid_token_id",
     ["line 9", "prompt_token_ids", "99999", "index 2", "integers 0.."]),
    ('{"id": "long", "prompt": "' + "word " * 200 + '"}', "long", "prompt_too_long",
     ["line 10", 'field "prompt"', "max_model_len", "64", "--max-model-len"]),
    ('{"id": "msgs", "messages": [{"content": "no role"}]}', "msgs", "invalid_field", ["line 11", "messages[0]"]),
    ('{"id": [1], "prompt": "x"}', 12, "invalid_id", ["line 12", 'field "id"', "[1]", "non-empty string"]),
    ('{"id": "good", "prompt": "again"}', "good", "duplicate_id", ["line 13", '"good"', "unique"]),
    ('{"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}', "u", "unsupported_url",
     ["line 14", '"url"', "/v1/embeddings", "/v1/chat/completions"]),
]


def test_bad_lines_become_error_records_and_the_job_goes_on(tmp_path):
    bad_utf8 = b'{"id": "utf", "prompt": "caf\xe9"}'
    lines = [GOOD] + [raw for raw, *_ in BAD] + [bad_utf8, "", "  ", {"id": "last", "prompt": "bye"}]
    r, recs = gen(tmp_path, lines, "--max-model-len", "64")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert len(recs) == 1 + len(BAD) + 2  # blank lines are skipped, every other line gets exactly one record
    assert "text" in recs[0] and "text" in recs[-1]
    for rec, (_, want_id, code, parts) in zip(recs[1:1 + len(BAD)], BAD, strict=True):
        err = rec["error"]
        assert rec.get("custom_id", rec["id"]) == want_id, rec
        assert err["code"] == code, rec
        for part in parts:
            assert part in err["message"], (part, err["message"])
    utf = recs[-2]
    assert utf["id"] == "utf" and utf["error"]["code"] == "invalid_utf8"
    assert "line 15" in utf["error"]["message"] and "0xe9" in utf["error"]["message"]
    assert f"{len(BAD) + 1} errors" in r.stderr


def test_max_errors_stops_the_job(tmp_path):
    lines = [GOOD, "junk", "junk", "junk"] + [{"id": i, "prompt": "x"} for i in range(50)]
    r, recs = gen(tmp_path, lines, "--max-errors", "2", "--max-in-flight", "1")
    assert r.exit_code == ExitCode.MAX_ERRORS, r.stderr
    assert [rec.get("error", {}).get("code") for rec in recs] == [None, "invalid_json", "invalid_json"]
    assert "--max-errors 2" in r.stderr


def test_bom_and_crlf_are_accepted(tmp_path):
    r, recs = gen(tmp_path, [b'\xef\xbb\xbf{"id": 1, "prompt": "hi"}\r', b'{"id": 2, "prompt": "yo"}\r'])
    assert r.exit_code == 0, r.stderr
    assert [rec["id"] for rec in recs] == [1, 2]


@pytest.fixture
def parser():
    defaults = defaults_from_settings(load_settings(None, {}, "/").sampling)
    return LineParser(FakeTokenizer(), 32, defaults)


def parse(parser, obj, lineno=1):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parser.build(parser.head(lineno, raw))


def test_parser_formats(parser):
    req = parse(parser, {"id": "a", "prompt": "hi", "max_tokens": 3, "stop": "x"})
    assert isinstance(req, LineRequest) and req.kind is None and list(req.prompt_ids) == [1, 104, 105]
    assert req.params.max_tokens == 3 and req.params.stop_list == ["x"]
    req = parse(parser, {"id": "b", "prompt_token_ids": [4, 5]})
    assert list(req.prompt_ids) == [4, 5]
    req = parse(parser, {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": "hi", "max_tokens": 9, "max_completion_tokens": 2}})
    assert req.kind == "text_completion" and req.params.max_tokens == 2 and req.id == "c"
    req = parse(parser, {"custom_id": "d", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "content": "hi"}]}})
    assert req.kind == "chat.completion" and list(req.prompt_ids) == list(b"<user>hi<assistant>")


def test_parser_ids_and_seeds(parser):
    assert parse(parser, {"prompt": "hi"}, lineno=42).id == 42
    assert parse(parser, {"id": 1, "prompt": "hi"}).key != parse(parser, {"id": "1", "prompt": "hi"}).key
    parser.defaults = {**parser.defaults, "seed": 5}
    a, b = parse(parser, {"id": "a", "prompt": "hi"}), parse(parser, {"id": "b", "prompt": "hi"})
    assert a.params.seed != b.params.seed  # per-line seeds differ...
    assert parse(parser, {"id": "a", "prompt": "hi"}).params.seed == a.params.seed  # ...and are stable
    assert parse(parser, {"id": "a", "prompt": "hi", "seed": 3}).params.seed == 3  # a line's own seed wins


def test_parser_openai_errors(parser):
    err = parse(parser, {"custom_id": "n", "url": "/v1/completions", "body": {"prompt": "hi", "n": 0}})
    assert isinstance(err, LineError) and err.code == "invalid_param" and err.batch and err.field == "body.n"
    err = parse(parser, {"custom_id": "m", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}})
    assert err.code == "invalid_method" and '"GET"' in err.message
    err = parse(parser, {"custom_id": "p", "url": "/v1/completions", "body": {"prompt": {"a": 1}}})
    assert err.code == "invalid_field" and "body.prompt" in err.message
    err = parse(parser, {"custom_id": "t", "url": "/v1/completions", "body": {"prompt": "x", "top_p": "big"}})
    assert err.code == "invalid_field" and 'field "body.top_p"' in err.message


def test_read_lines_is_lazy_and_skips_blank_lines():
    class Endless:
        def __iter__(self):
            i = 0
            while True:
                i += 1
                yield b"\n" if i % 2 else b'{"id": %d}\n' % i

    it = read_lines(Endless())
    assert [next(it)[0] for _ in range(3)] == [2, 4, 6]
