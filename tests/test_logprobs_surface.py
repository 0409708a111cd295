"""Logprobs and logit shaping on input lines: the fields each kind of line takes (native, OpenAI chat and
completions bodies), the errors naming the field, the three output formats (from hand-made RequestOutputs, exact),
request hashes, and end-to-end runs of the CLI on a tiny random checkpoint."""
from __future__ import annotations

import json
import math

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.fingerprint import request_hash
from flashgen.jobs.inputs import LineError, LineParser, LineRequest
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.records import result_record
from flashgen.jobs.settings import load_settings
from flashgen.outputs import Logprob, RequestOutput
from flashgen.sampling_params import SamplingParams
from test_cli_support import FakeTokenizer, chat, completion, gen, native


@pytest.fixture
def parser():
    defaults = defaults_from_settings(load_settings(None, {}, "/").sampling)
    return LineParser(FakeTokenizer(), 32, defaults)  # a vocabulary of 512 tokens


def parse(parser, obj):
    return parser.build(parser.head(1, json.dumps(obj).encode()))


def params_of(parser, obj) -> SamplingParams:
    req = parse(parser, obj)
    assert isinstance(req, LineRequest), req
    return req.params


# ---- parsing: every accepted shape ---------------------------------------------------------------------------------

ACCEPTED = [
    # (line, SamplingParams fields it sets)
    (native(logprobs=3), {"logprobs": 3}),
    (native(logprobs=0, prompt_logprobs=20), {"logprobs": 0, "prompt_logprobs": 20}),
    (native(logprobs=20, logprobs_mode="processed_logprobs"), {"logprobs": 20, "logprobs_mode": "processed_logprobs"}),
    (native(logprobs_mode="raw_logprobs"), {"logprobs_mode": "raw_logprobs"}),
    (native(logit_bias={"50": -100, "7": 2.5, "0": 100}), {"logit_bias": {50: -100.0, 7: 2.5, 0: 100.0}}),
    (native(allowed_token_ids=[1, 2, 511]), {"allowed_token_ids": [1, 2, 511]}),
    (native(logprobs=None, prompt_logprobs=None, logit_bias=None, allowed_token_ids=None, logprobs_mode=None,
            top_logprobs=None), {}),
    (native(logprobs=False, logit_bias={}), {}),  # false: off; {} biases nothing
    (chat(logprobs=True), {"logprobs": 0}),
    (chat(logprobs=True, top_logprobs=5), {"logprobs": 5}),
    (chat(logprobs=True, top_logprobs=None), {"logprobs": 0}),
    (chat(logprobs=False, top_logprobs=0), {}),  # as vLLM: top_logprobs 0 asks for nothing
    (chat(logprobs=None), {}),
    (chat(logprobs=True, top_logprobs=20, prompt_logprobs=2, logit_bias={"5": 10}, allowed_token_ids=[5, 6],
          logprobs_mode="processed_logprobs"),
     {"logprobs": 20, "prompt_logprobs": 2, "logit_bias": {5: 10.0}, "allowed_token_ids": [5, 6],
      "logprobs_mode": "processed_logprobs"}),
    (completion(logprobs=2), {"logprobs": 2}),
    (completion(logprobs=0), {"logprobs": 0}),
    (completion(logprobs=20), {"logprobs": 20}),  # OpenAI stops at 5; vLLM (and flashgen) take up to 20
    (completion(logprobs=False, top_logprobs=None), {}),
    (completion(logprobs=1, prompt_logprobs=0, logit_bias={"300": -1}, allowed_token_ids=[300]),
     {"logprobs": 1, "prompt_logprobs": 0, "logit_bias": {300: -1.0}, "allowed_token_ids": [300]}),
]
OFF = {"logprobs": None, "prompt_logprobs": None, "logprobs_mode": "raw_logprobs", "logit_bias": None,
       "allowed_token_ids": None}


@pytest.mark.parametrize("line,want", ACCEPTED)
def test_accepted_shapes(parser, line, want):
    p = params_of(parser, line)
    assert {k: getattr(p, k) for k in OFF} == {**OFF, **want}


def test_logit_bias_int_keys_through_the_reader():
    from flashgen.jobs.params import logprob_overrides

    assert logprob_overrides({"logit_bias": {5: 1, "6": -1}}) == {"logit_bias": {5: 1.0, 6: -1.0}}


# ---- parsing: every wrong value is that line's error, naming the field ----------------------------------------------

REFUSED = [
    # (line, code, field, parts of the message)
    (chat(top_logprobs=3), "invalid_param", "body.top_logprobs", ['"logprobs": true']),
    (chat(logprobs=False, top_logprobs=3), "invalid_param", "body.top_logprobs", ['"body.logprobs" is false']),
    (chat(logprobs=True, top_logprobs=21), "invalid_param", "body.top_logprobs", ["21", "[0, 20]"]),
    (chat(logprobs=True, top_logprobs=-1), "invalid_param", "body.top_logprobs", ["[0, 20]"]),
    (chat(logprobs=True, top_logprobs="3"), "invalid_field", "body.top_logprobs", ["an integer"]),
    (chat(logprobs=3), "invalid_field", "body.logprobs", ["true or false", "top_logprobs"]),
    (completion(logprobs=-1), "invalid_param", "body.logprobs", ["-1", "[0, 20]"]),
    (completion(logprobs=21), "invalid_param", "body.logprobs", ["[0, 20]"]),
    (completion(logprobs=True), "invalid_field", "body.logprobs", ["chat form"]),
    (completion(logprobs=1.5), "invalid_field", "body.logprobs", ["an integer"]),
    (completion(top_logprobs=2), "unknown_field", "body.top_logprobs", ['"logprobs": 2']),
    (native(logprobs=21), "invalid_param", "logprobs", ["[0, 20]"]),
    (native(logprobs=True), "invalid_field", "logprobs", ["chat form"]),
    (native(top_logprobs=4), "unknown_field", "top_logprobs", ['"logprobs": 4']),
    (native(prompt_logprobs=21), "invalid_param", "prompt_logprobs", ["[0, 20]"]),
    (native(prompt_logprobs=-1), "invalid_param", "prompt_logprobs", ["[0, 20]"]),
    (native(logprobs_mode="raw"), "invalid_param", "logprobs_mode", ['"raw_logprobs" or "processed_logprobs"']),
    (native(logprobs_mode=1), "invalid_field", "logprobs_mode", ['"raw_logprobs"']),
    (native(logit_bias={"5": 101}), "invalid_param", "logit_bias", ["101", '"5"', "[-100, 100]"]),
    (native(logit_bias={"5": -100.5}), "invalid_param", "logit_bias", ["[-100, 100]"]),
    (native(logit_bias={"5": "x"}), "invalid_field", "logit_bias", ['"x"', "[-100, 100]"]),
    (native(logit_bias={"5": True}), "invalid_field", "logit_bias", ["[-100, 100]"]),
    (native(logit_bias={"abc": 1}), "invalid_field", "logit_bias", ['the key "abc"', "not a token id"]),
    (native(logit_bias={"-1": 1}), "invalid_field", "logit_bias", ['the key "-1"']),
    (native(logit_bias={"1.5": 1}), "invalid_field", "logit_bias", ['the key "1.5"']),
    (native(logit_bias={"5": 1, "05": 2}), "invalid_field", "logit_bias", ["twice"]),
    (native(logit_bias=[[5, 1]]), "invalid_field", "logit_bias", ['{"50256": -100}']),
    (native(logit_bias={"512": 1}), "invalid_token_id", "logit_bias", ['"512"', "integers 0..511"]),
    (chat(logit_bias={"9" * 40: 1}), "invalid_field", "body.logit_bias", ["not a token id"]),
    (chat(logit_bias={"100000": -100}), "invalid_token_id", "body.logit_bias", ["integers 0..511"]),
    (completion(logit_bias={"5": 200}), "invalid_param", "body.logit_bias", ["[-100, 100]"]),
    (native(allowed_token_ids=[]), "invalid_param", "allowed_token_ids", ["non-empty"]),
    (native(allowed_token_ids=[1, 512]), "invalid_token_id", "allowed_token_ids", ["512", "index 1", "0..511"]),
    (native(allowed_token_ids=[-1]), "invalid_param", "allowed_token_ids", [">= 0"]),
    (native(allowed_token_ids=5), "invalid_field", "allowed_token_ids", ["a list of integers"]),
    (native(allowed_token_ids=["5"]), "invalid_field", "allowed_token_ids", ["a list of integers"]),
    (chat(allowed_token_ids=[]), "invalid_param", "body.allowed_token_ids", ["non-empty"]),
    (completion(allowed_token_ids=[7, 9999]), "invalid_token_id", "body.allowed_token_ids", ["9999"]),
    (completion(prompt_logprobs=99), "invalid_param", "body.prompt_logprobs", ["[0, 20]"]),
    (chat(n=0), "invalid_param", "body.n", ["[1, 128]"]),  # n is implemented (tests/test_n_surface.py)
    # still not implemented: refused, not ignored
    (completion(echo=True, logprobs=1), "unsupported_field", "body.echo", []),
    (completion(best_of=2), "unsupported_field", "body.best_of", []),
]


@pytest.mark.parametrize("line,code,field,parts", REFUSED)
def test_wrong_values_are_refused_naming_the_field(parser, line, code, field, parts):
    err = parse(parser, line)
    assert isinstance(err, LineError), err
    assert (err.code, err.field) == (code, field), err
    assert err.message.startswith("line 1: ") and f'field "{field}"' in err.message, err.message
    for part in parts:
        assert part in err.message, (part, err.message)


# ---- formatting: exact records from hand-made RequestOutputs -------------------------------------------------------

def hand_made() -> RequestOutput:
    """Three generated tokens asked with k = 2: the first is the most likely, the second (rank 3) is not among
    the top 2 (k + 1 candidates), the third is, next to a token the engine gave no text for and a -inf logprob."""
    return RequestOutput(
        "0", None, [1, 2, 3], "Hi é", [10, 11, 12], "length",
        logprobs=[{10: Logprob(-0.5, 1, "Hi"), 20: Logprob(-1.5, 2, "Ho")},
                  {11: Logprob(-2.0, 3, " "), 30: Logprob(-0.25, 1, "!"), 31: Logprob(-1.0, 2, "?")},
                  {12: Logprob(-0.125, 1, "é"), 40: Logprob(-math.inf, 2, None)}],
        prompt_logprobs=[None, {2: Logprob(-3.0, 4, "b"), 5: Logprob(-0.5, 1, "a"), 6: Logprob(-1.25, 2, "c")},
                         {3: Logprob(-0.75, 1, "d")}],
        cumulative_logprob=-2.625)


def request(kind, **params) -> LineRequest:
    return LineRequest(1, "x", '"x"', kind, None, SamplingParams(**params), "0123456789ab")


def openai_body(rec: dict) -> dict:
    body = rec["response"]["body"]
    assert body["id"].startswith("chatcmpl-" if body["object"] == "chat.completion" else "cmpl-")
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_native_format():
    rec = result_record(request(None, logprobs=2, prompt_logprobs=1), hand_made(), 3, "m", False)
    assert rec == {
        "id": "x", "text": "Hi é", "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 3},
        "logprobs": [
            {"token_id": 10, "token": "Hi", "logprob": -0.5, "rank": 1,
             "top": [{"token_id": 10, "token": "Hi", "logprob": -0.5, "rank": 1},
                     {"token_id": 20, "token": "Ho", "logprob": -1.5, "rank": 2}]},
            {"token_id": 11, "token": " ", "logprob": -2.0, "rank": 3,
             "top": [{"token_id": 30, "token": "!", "logprob": -0.25, "rank": 1},
                     {"token_id": 31, "token": "?", "logprob": -1.0, "rank": 2}]},
            {"token_id": 12, "token": "é", "logprob": -0.125, "rank": 1,
             "top": [{"token_id": 12, "token": "é", "logprob": -0.125, "rank": 1},
                     {"token_id": 40, "token": None, "logprob": -9999.0, "rank": 2}]},
        ],
        "cumulative_logprob": -2.625,
        "prompt_logprobs": [
            None,
            {"token_id": 2, "token": "b", "logprob": -3.0, "rank": 4,
             "top": [{"token_id": 5, "token": "a", "logprob": -0.5, "rank": 1}]},
            {"token_id": 3, "token": "d", "logprob": -0.75, "rank": 1,
             "top": [{"token_id": 3, "token": "d", "logprob": -0.75, "rank": 1}]},
        ],
        "request_hash": "0123456789ab",
    }
    assert list(rec) == ["id", "text", "finish_reason", "usage", "logprobs", "cumulative_logprob", "prompt_logprobs",
                         "request_hash"]
    json.dumps(rec, allow_nan=False)  # -inf became -9999.0: valid JSON


def test_native_format_k0_token_ids_and_no_prompt_logprobs():
    rec = result_record(request(None, logprobs=0), hand_made(), 3, "m", True)
    assert list(rec) == ["id", "text", "finish_reason", "usage", "token_ids", "logprobs", "cumulative_logprob",
                         "request_hash"]
    assert [e["top"] for e in rec["logprobs"]] == [[], [], []]
    assert [(e["token_id"], e["logprob"], e["rank"]) for e in rec["logprobs"]] == [(10, -0.5, 1), (11, -2.0, 3),
                                                                                  (12, -0.125, 1)]


def test_chat_format():
    rec = result_record(request("chat.completion", logprobs=2, prompt_logprobs=1), hand_made(), 3, "m", False)
    assert rec["custom_id"] == "x" and rec["error"] is None and rec["response"]["status_code"] == 200
    hi, ho, sp = [72, 105], [72, 111], [32]
    e_acute = [195, 169]
    assert openai_body(rec) == {
        "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi é"}, "finish_reason": "length",
                     "logprobs": {"content": [
                         {"token": "Hi", "logprob": -0.5, "bytes": hi,
                          "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": hi},
                                           {"token": "Ho", "logprob": -1.5, "bytes": ho}]},
                         {"token": " ", "logprob": -2.0, "bytes": sp,
                          "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]},
                                           {"token": "?", "logprob": -1.0, "bytes": [63]}]},
                         {"token": "é", "logprob": -0.125, "bytes": e_acute,
                          "top_logprobs": [{"token": "é", "logprob": -0.125, "bytes": e_acute},
                                           {"token": "", "logprob": -9999.0, "bytes": []}]},
                     ], "refusal": None}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        "prompt_logprobs": [None,
                            {"2": {"logprob": -3.0, "rank": 4, "decoded_token": "b"},
                             "5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
                             "6": {"logprob": -1.25, "rank": 2, "decoded_token": "c"}},
                            {"3": {"logprob": -0.75, "rank": 1, "decoded_token": "d"}}],
    }
    json.dumps(rec, allow_nan=False)


def test_completions_format():
    rec = result_record(request("text_completion", logprobs=2, prompt_logprobs=0), hand_made(), 3, "m", False)
    body = openai_body(rec)
    assert body == {
        "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": "Hi é", "finish_reason": "length",
                     "logprobs": {"tokens": ["Hi", " ", "é"], "token_logprobs": [-0.5, -2.0, -0.125],
                                  "top_logprobs": [{"Hi": -0.5, "Ho": -1.5},
                                                   {"!": -0.25, "?": -1.0, " ": -2.0},  # k + 1: the chosen too
                                                   {"é": -0.125, "": -9999.0}],
                                  "text_offset": [0, 2, 3]},
                     "prompt_logprobs": [None,
                                         {"2": {"logprob": -3.0, "rank": 4, "decoded_token": "b"},
                                          "5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
                                          "6": {"logprob": -1.25, "rank": 2, "decoded_token": "c"}},
                                         {"3": {"logprob": -0.75, "rank": 1, "decoded_token": "d"}}]}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    assert list(body["choices"][0]["logprobs"]["top_logprobs"][1]) == ["!", "?", " "]  # most likely first


def test_completions_format_k0_and_same_text_tokens():
    out = RequestOutput("0", None, [1], "aa", [3, 4], "stop",
                        logprobs=[{3: Logprob(-0.5, 1, "a"), 9: Logprob(-0.75, 2, "a")}, {4: Logprob(-0.25, 1, "a")}])
    lp = openai_body(result_record(request("text_completion", logprobs=1), out, 1, "m", False))["choices"][0]
    assert lp["logprobs"] == {"tokens": ["a", "a"], "token_logprobs": [-0.5, -0.25],
                              "top_logprobs": [{"a": -0.5}, {"a": -0.25}], "text_offset": [0, 1]}
    lp = openai_body(result_record(request("text_completion", logprobs=0), out, 1, "m", False))["choices"][0]
    assert lp["logprobs"]["top_logprobs"] == [{"a": -0.5}, {"a": -0.25}]  # k = 0: the chosen token alone
    assert "prompt_logprobs" not in lp


def test_chat_k0_gives_empty_top_logprobs():
    rec = result_record(request("chat.completion", logprobs=0), hand_made(), 3, "m", False)
    content = openai_body(rec)["choices"][0]["logprobs"]["content"]
    assert [c["top_logprobs"] for c in content] == [[], [], []] and [c["token"] for c in content] == ["Hi", " ", "é"]
    assert "prompt_logprobs" not in openai_body(rec)


def test_asked_but_the_engine_gave_none_is_null():
    out = RequestOutput("0", None, [1], "ab", [3, 4], "length")
    rec = result_record(request(None, logprobs=2, prompt_logprobs=2), out, 1, "m", False)
    assert (rec["logprobs"], rec["cumulative_logprob"], rec["prompt_logprobs"]) == (None, None, None)
    body = openai_body(result_record(request("chat.completion", logprobs=2, prompt_logprobs=1), out, 1, "m", False))
    assert body["choices"][0]["logprobs"] is None and body["prompt_logprobs"] is None
    body = openai_body(result_record(request("text_completion", logprobs=2, prompt_logprobs=1), out, 1, "m", False))
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["prompt_logprobs"] is None


def test_records_without_logprobs_are_as_before():
    """Not asked: the engine's logprobs (if any) are not written, and the record has exactly its old keys."""
    out = hand_made()
    rec = result_record(request(None), out, 3, "m", False)
    assert rec == {"id": "x", "text": "Hi é", "finish_reason": "length",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 3}, "request_hash": "0123456789ab"}
    chat_rec = result_record(request("chat.completion"), out, 3, "m", False)
    body = chat_rec["response"]["body"]
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi é"}, "logprobs": None,
                                "finish_reason": "length"}]
    body = result_record(request("text_completion"), out, 3, "m", False)["response"]["body"]
    assert body["choices"] == [{"index": 0, "text": "Hi é", "logprobs": None, "finish_reason": "length"}]


# ---- request hashes: the new fields count only when present --------------------------------------------------------

def test_request_hash_changes_only_with_the_new_fields(parser):
    parser.fingerprint = "f" * 16
    for line in (native(), chat(), completion()):
        assert parse(parser, line).request_hash == request_hash(line, parser.fingerprint)  # as before this change
    base = parse(parser, native()).request_hash
    with_lp = parse(parser, native(logprobs=2)).request_hash
    assert with_lp != base and with_lp != parse(parser, native(logprobs=3)).request_hash
    assert parse(parser, chat(logprobs=True)).request_hash != parse(parser, chat()).request_hash


# ---- end to end: the CLI on a tiny random checkpoint ----------------------------------------------------------------

def check_position(entry_logprob: float, rank: int, top_logprobs: list[float], k: int) -> None:
    assert entry_logprob <= 0 and rank >= 1
    assert len(top_logprobs) == k
    assert all(x <= 0 for x in top_logprobs) and top_logprobs == sorted(top_logprobs, reverse=True)


def test_native_lines_end_to_end(tmp_path):
    lines = [native(id="a", logprobs=3, prompt_logprobs=2, ignore_eos=True, max_tokens=5),
             native(id="b", prompt="The quick brown fox", logprobs=0, ignore_eos=True),
             native(id="c", prompt="no logprobs here")]
    r, recs = gen(tmp_path, lines, "--return-token-ids")
    assert r.exit_code == ExitCode.OK, r.stderr
    a, b, c = recs
    assert "logprobs" not in c and "prompt_logprobs" not in c and "cumulative_logprob" not in c
    for rec, k in ((a, 3), (b, 0)):
        lps = rec["logprobs"]
        assert isinstance(lps, list) and len(lps) == rec["usage"]["completion_tokens"] == len(rec["token_ids"])
        assert [e["token_id"] for e in lps] == rec["token_ids"]
        for e in lps:
            check_position(e["logprob"], e["rank"], [t["logprob"] for t in e["top"]], k)
            assert e["rank"] == 1  # greedy (--temperature 0), raw logprobs: the chosen token is the most likely
            assert isinstance(e["token"], str)
            if k:
                assert e["top"][0] == {f: e[f] for f in ("token_id", "token", "logprob", "rank")}
                assert [t["rank"] for t in e["top"]] == [1, 2, 3]
        assert rec["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in lps), abs=1e-4)
    prompt = a["prompt_logprobs"]
    assert len(prompt) == a["usage"]["prompt_tokens"] and prompt[0] is None
    for e in prompt[1:]:
        check_position(e["logprob"], e["rank"], [t["logprob"] for t in e["top"]], 2)
    assert "prompt_logprobs" not in b


def test_openai_lines_end_to_end(tmp_path):
    lines = [chat(logprobs=True, top_logprobs=2, max_completion_tokens=4, ignore_eos=True),
             {**completion(logprobs=3, max_tokens=5, ignore_eos=True, prompt_logprobs=1), "custom_id": "m1"},
             {**completion(logprobs=0, max_tokens=3, ignore_eos=True), "custom_id": "m0"},
             {**chat(logprobs=True, max_completion_tokens=2, ignore_eos=True), "custom_id": "c0"},
             {**chat(max_completion_tokens=2), "custom_id": "none"}]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.OK, r.stderr
    c2, m3, m0, c0, none = (rec["response"]["body"] for rec in recs)
    for body, k in ((c2, 2), (c0, 0)):
        lp = body["choices"][0]["logprobs"]
        assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
        assert len(lp["content"]) == body["usage"]["completion_tokens"]
        for e in lp["content"]:
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert e["bytes"] == list(e["token"].encode())
            check_position(e["logprob"], 1, [t["logprob"] for t in e["top_logprobs"]], k)
            for t in e["top_logprobs"]:
                assert set(t) == {"token", "logprob", "bytes"} and t["bytes"] == list(t["token"].encode())
            if k:
                assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the chosen one is the likeliest
    for body, k in ((m3, 3), (m0, 0)):
        choice = body["choices"][0]
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        n = body["usage"]["completion_tokens"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert logprob <= 0 and 1 <= len(top) <= k + 1 and top.get(token) is not None
            assert all(v <= 0 for v in top.values())
    prompt = m3["choices"][0]["prompt_logprobs"]
    assert len(prompt) == m3["usage"]["prompt_tokens"] and prompt[0] is None
    for p in prompt[1:]:
        assert all(int(t) >= 0 and v["logprob"] <= 0 and v["rank"] >= 1 for t, v in p.items())
    assert none["choices"][0]["logprobs"] is None and "prompt_logprobs" not in none


def test_logit_bias_and_allowed_token_ids_end_to_end(tmp_path):
    lines = [native(id="bias", logit_bias={"100": 100}, ignore_eos=True, logprobs=1),
             native(id="processed", logit_bias={"100": 100}, ignore_eos=True, logprobs=1,
                    logprobs_mode="processed_logprobs"),
             native(id="allowed", allowed_token_ids=[200, 201], ignore_eos=True),
             {**completion(logit_bias={"77": 100}, ignore_eos=True, max_tokens=3), "custom_id": "cb"},
             native(id="ban", logit_bias={"600": -100})]
    r, recs = gen(tmp_path, lines, "--return-token-ids")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    bias, processed, allowed, cb, ban = recs
    assert bias["token_ids"] == processed["token_ids"] == [100] * 4
    assert all(e["logprob"] < -0.5 for e in bias["logprobs"])  # raw: the model's own logits, the bias unseen
    assert all(e["logprob"] == pytest.approx(0, abs=1e-3) for e in processed["logprobs"])  # drawn with p ~ 1
    assert set(allowed["token_ids"]) <= {200, 201} and len(allowed["token_ids"]) == 4
    assert cb["response"]["status_code"] == 200 and cb["response"]["body"]["usage"]["completion_tokens"] == 3
    assert ban["error"]["code"] == "invalid_token_id" and 'field "logit_bias"' in ban["error"]["message"]


def test_resume_reruns_only_the_line_that_gained_logprobs(tmp_path):
    lines = [native(id="a"), native(id="b", prompt="other")]
    r, first = gen(tmp_path, lines)
    assert r.exit_code == 0, r.stderr
    src, out = tmp_path / "in.jsonl", tmp_path / "in.jsonl.out"
    src.write_text("".join(json.dumps(x) + "\n" for x in [lines[0], {**lines[1], "logprobs": 1}]))
    from test_cli_support import FAST, cli, read_jsonl, tiny_model

    r = cli(["generate", src, "-o", out, "--model", tiny_model(), *FAST, "--resume"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "1 results were made from input lines or settings that changed" in r.stderr and '"b"' in r.stderr
    recs = {rec["id"]: rec for rec in read_jsonl(out)}
    assert recs["a"] == first[0]  # kept, byte for byte
    assert len(recs["b"]["logprobs"]) == recs["b"]["usage"]["completion_tokens"]
