"""Fuzz of the line contract through the real job runner and a real engine (tiny checkpoint, CPU): whatever the
lines hold (wrong types, NaN, inf, huge integers, bools, nesting, lone surrogates, invalid UTF-8, a BOM, overlong
lines, native and OpenAI batch lines, mixed with good ones), the job never raises, and every non-blank line gets
exactly one record, in order: its result, or an error whose message names the line and a field (or the line's
JSON / encoding problem). Deterministic (derandomize) so CI runs the same lines every time."""
from __future__ import annotations

import functools
import io
import json

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, _sniff_id, read_lines
from flashgen.jobs.params import FIELDS, defaults_from_settings
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import tiny_model

MAX_LINE_BYTES = 3000
MAX_MODEL_LEN = 64
# Errors about the line as a whole rather than one field.
LINE_CODES = {"invalid_json", "invalid_utf8", "not_an_object", "too_deep", "line_too_long"}
TOTAL = {"lines": 0}


@functools.cache
def engine():
    from flashgen.llm import LLM

    return LLM(tiny_model(), device="cpu", max_num_seqs=32, max_model_len=MAX_MODEL_LEN)


# ---- values ------------------------------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["a\ud800b", "\udfff", "x\udbff", "\ud83d"])
HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64, 2**64 - 1, -(2**63) - 1, 10**30])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 600), HUGE, st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=12), SURROGATES, st.just(""),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
GOOD_VALUES = {
    "max_tokens": st.sampled_from([1, 2, 3]), "min_tokens": st.sampled_from([0, 1]),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1, 1.5]), "top_p": st.sampled_from([0.5, 1.0]),
    "top_k": st.sampled_from([-1, 0, 1, 5, 10**6]), "min_p": st.sampled_from([0.0, 0.1]),
    "seed": st.sampled_from([0, 7, 2**63, 2**64 - 1]), "stop": st.sampled_from(["x", ["a", "b"]]),
    "stop_token_ids": st.sampled_from([[1], [2, 3], []]), "ignore_eos": st.booleans(),
    "repetition_penalty": st.sampled_from([1.0, 1.3]), "presence_penalty": st.sampled_from([0.0, -2, 2]),
    "frequency_penalty": st.sampled_from([0.0, 0.5]), "skip_special_tokens": st.booleans(),
}
assert set(GOOD_VALUES) == set(FIELDS)
EXTRA_KEYS = ["temprature", "logit_bias", "logprobs", "stream", "n", "echo", "response_format", "tools", "meta",
              "model", "user", "max_completion_tokens", "best_of", "suffix", "topk", "max_token", "prompt",
              "messages", "prompt_token_ids", "id"]


@st.composite
def sampling(draw, bad_rate):
    out = {}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        out[name] = draw(values) if draw(st.integers(0, 99)) < bad_rate else draw(GOOD_VALUES[name])
    return out


texts = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["hello", "the quick brown fox", "x" * 400]),
                  SURROGATES, st.just(""))
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": texts}), min_size=1,
             max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2)}), max_size=2),
    values,
)
token_ids = st.one_of(st.lists(st.integers(-3, 600), min_size=0, max_size=8), values)


@st.composite
def native_line(draw, n):
    obj = {}
    if draw(st.integers(0, 9)):
        obj["id"] = f"L{n}" if draw(st.integers(0, 9)) else draw(values)
    source = draw(st.sampled_from(["prompt", "prompt", "messages", "prompt_token_ids", "none"]))
    if source == "prompt":
        obj["prompt"] = draw(texts) if draw(st.integers(0, 5)) else draw(values)
    elif source == "messages":
        obj["messages"] = draw(messages)
    elif source == "prompt_token_ids":
        obj["prompt_token_ids"] = draw(token_ids)
    obj.update(draw(sampling(draw(st.sampled_from([0, 0, 30, 100])))))
    if not draw(st.integers(0, 5)):
        obj[draw(st.sampled_from(EXTRA_KEYS))] = draw(values)
    return obj


@st.composite
def batch_line(draw, n):
    url = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body = {"messages": draw(messages)} if url.endswith("chat/completions") else {
        "prompt": draw(st.one_of(texts, token_ids, st.lists(texts, max_size=2)))}
    body.update(draw(sampling(draw(st.sampled_from([0, 0, 30, 100])))))
    if draw(st.integers(0, 2)) == 0:
        body[draw(st.sampled_from(EXTRA_KEYS))] = draw(values)
    obj = {"custom_id": f"B{n}" if draw(st.integers(0, 9)) else draw(values), "method": "POST", "url": url,
           "body": body}
    if not draw(st.integers(0, 7)):
        obj[draw(st.sampled_from(["method", "url", "body"]))] = draw(values)
    return obj


@st.composite
def raw_line(draw, n):
    obj = draw(native_line(n) if draw(st.booleans()) else batch_line(n))
    ascii_ = draw(st.booleans())
    text = json.dumps(obj, ensure_ascii=ascii_)
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate without escapes: invalid UTF-8
    kind = draw(st.integers(0, 29))
    if kind == 0:  # a stray byte that is not UTF-8
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\x80"])) + raw[i:]
    elif kind == 1:  # cut short
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif kind == 2:  # nested deep, inside a field or as the line
        d = draw(st.sampled_from([50, 99, 101, 1000, 5000]))
        raw = (b"[" * d + b"]" * d) if draw(st.booleans()) else raw[:-1] + b', "x": ' + b"[" * d + b"]" * d + b"}"
    elif kind == 3:  # longer than max_line_bytes
        raw = raw[:-1] + b', "pad": "' + b"p" * MAX_LINE_BYTES + b'"}'
    elif kind == 4:
        raw = draw(st.sampled_from([b"", b"   ", b"\t", b"null", b"[1, 2]", b'"s"', b"{", b"\xef\xbb\xbf{}"]))
    elif kind == 5:
        raw = b"\xef\xbb\xbf" + raw  # a BOM: stripped on line 1 only
    return raw


@st.composite
def jobs(draw):
    n = draw(st.integers(36, 50))
    return [draw(raw_line(i)) for i in range(n)]


def expected_lines(raws: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for lineno, raw in enumerate(raws, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            out.append((lineno, raw))
    return out


def check_record(rec: dict, lineno: int, raw: bytes) -> None:
    batch = "custom_id" in rec
    rid = rec["custom_id"] if batch else rec["id"]
    err = rec.get("error")
    if err is None:
        if batch:
            assert rec["response"]["status_code"] == 200 and rec["response"]["body"]["choices"], rec
        else:
            assert isinstance(rec["text"], str) and rec["finish_reason"] in ("stop", "length"), rec
        assert rid in candidate_ids(lineno, raw), (rid, raw[:200])
        return
    assert set(err) == {"code", "message"} and isinstance(err["code"], str), rec
    msg = err["message"]
    assert msg.startswith(f"line {lineno}: "), (msg, raw[:200])
    assert 'field "' in msg or 'fields "' in msg or err["code"] in LINE_CODES, (msg, raw[:200])
    if batch:
        assert rec["response"]["status_code"] == 400 and rec["response"]["body"]["error"]["code"] == err["code"]
    # the id is the line's own, or its line number when the line has none that could be read
    assert rid in candidate_ids(lineno, raw), (rid, raw[:200])


def candidate_ids(lineno: int, raw: bytes) -> list:
    """The ids a record of this line may carry: the line's own id (as parsed, as found in its bytes where the line
    is too long or too deep to parse, or as generated) or its number. json.loads here runs deep in pytest's and
    hypothesis's stack, so a line nested ~100 levels can exceed the recursion limit here and parse in the job: the
    id found in the bytes covers that line whichever way the parse goes."""
    out = [lineno, f"B{lineno - 1}", f"L{lineno - 1}", _sniff_id(raw)[0]]
    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return out
    if isinstance(obj, dict):
        out += [obj.get("id"), obj.get("custom_id")]
    return out


@settings(max_examples=140, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                 HealthCheck.large_base_example])
@given(jobs())
def _fuzz_job(raws):
    llm = engine()
    defaults = defaults_from_settings(load_settings(None, {}, "/").sampling)
    defaults.update(max_tokens=2, seed=1, temperature=0.8)
    parser = LineParser(llm.tokenizer, llm.max_model_len, defaults)
    sink = io.BytesIO()
    runner = Runner(llm, parser, OrderedWriter(sink, "input"), JobStats(), max_in_flight=64)
    status = runner.run(read_lines(io.BytesIO(b"\n".join(raws) + b"\n"), MAX_LINE_BYTES), IdSet())
    recs = [json.loads(x) for x in sink.getvalue().splitlines()]
    want = expected_lines(raws)
    assert status in ("ok", "line_errors")
    assert len(recs) == len(want), (len(recs), len(want))
    for rec, (lineno, raw) in zip(recs, want, strict=True):
        check_record(rec, lineno, raw)
    assert not llm.has_unfinished_requests()
    TOTAL["lines"] += len(want)


def test_every_line_gets_exactly_one_honest_record():
    TOTAL["lines"] = 0
    _fuzz_job()
    assert TOTAL["lines"] >= 5000, TOTAL
