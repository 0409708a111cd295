"""`n` on input lines (vLLM's and OpenAI's: samples of one prompt, 1..128): the line kinds that take it, the errors
naming the field, the record shapes (native "samples", OpenAI choices[i].index; from hand-made RequestOutputs,
exact), usage summed over the samples, a failed sample making its line an error record, and end-to-end runs of the
CLI on a tiny random checkpoint, including --resume after a job is killed: one record holds all of a line's
samples, so no line is duplicated or missing and every resumed sample equals the uninterrupted run's."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.fingerprint import job_fingerprint, request_hash
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineError, LineParser, LineRequest, read_lines
from flashgen.jobs.params import defaults_from_settings, line_seed
from flashgen.jobs.progress import JobStats
from flashgen.jobs.records import record_key, result_record
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.writer import OrderedWriter
from flashgen.outputs import CompletionOutput, Logprob, RequestOutput
from flashgen.sampling_params import SamplingParams, sample_seed
from test_cli_support import (
    CHAT_URL,
    COMPLETIONS_URL,
    FAST,
    FakeLLM,
    FakeTokenizer,
    chat,
    cli,
    completion,
    gen,
    native,
    proc_env,
    read_jsonl,
    tiny_model,
    wait_for_lines,
)


def defaults() -> dict:
    return defaults_from_settings(load_settings(None, {}, "/").sampling)


@pytest.fixture
def parser():
    return LineParser(FakeTokenizer(), 32, defaults())


def parse(parser, obj):
    return parser.build(parser.head(1, json.dumps(obj).encode()))


# ---- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [native, chat, completion])
@pytest.mark.parametrize("n,want", [(3, 3), (1, 1), (128, 128), (None, 1)])
def test_n_is_accepted_on_every_line_kind(parser, make, n, want):
    req = parse(parser, make(n=n))
    assert isinstance(req, LineRequest), req
    assert req.params.n == want
    assert parse(parser, make()).params.n == 1  # no n: one sample, as before


def test_n_with_the_other_fields(parser):
    p = parse(parser, native(n=4, logprobs=2, prompt_logprobs=1, temperature=1.0, seed=5, max_tokens=7)).params
    assert (p.n, p.logprobs, p.prompt_logprobs, p.seed, p.max_tokens) == (4, 2, 1, 5, 7)
    p = parse(parser, chat(n=2, logprobs=True, top_logprobs=3, max_completion_tokens=5)).params
    assert (p.n, p.logprobs, p.max_tokens) == (2, 3, 5)
    p = parse(parser, completion(n=2, logprobs=1, best_of=1)).params  # best_of 1 changes nothing
    assert (p.n, p.logprobs) == (2, 1)


WRONG_N = [
    (0, "invalid_param", ["0", "[1, 128]"]),
    (129, "invalid_param", ["129", "[1, 128]"]),
    (-1, "invalid_param", ["[1, 128]"]),
    (10**30, "invalid_param", ["[1, 128]"]),
    ("3", "invalid_field", ['"3"', "an integer"]),
    (True, "invalid_field", ["true", "an integer"]),
    (False, "invalid_field", ["false", "an integer"]),
    (2.5, "invalid_field", ["2.5", "an integer"]),
    ([3], "invalid_field", ["an integer"]),
]


@pytest.mark.parametrize("make,field", [(native, "n"), (chat, "body.n"), (completion, "body.n")])
@pytest.mark.parametrize("value,code,parts", WRONG_N)
def test_wrong_n_is_that_lines_error_naming_the_field(parser, make, field, value, code, parts):
    err = parse(parser, make(n=value))
    assert isinstance(err, LineError), err
    assert (err.code, err.field, err.batch) == (code, field, make is not native), err
    assert err.message.startswith(f'line 1: field "{field}" is '), err.message
    for part in parts:
        assert part in err.message, (part, err.message)


def test_best_of_stays_unsupported(parser):
    for line, field in ((completion(best_of=2), "body.best_of"), (chat(n=2, best_of=2), "body.best_of"),
                        (native(n=2, best_of=3), "best_of")):
        err = parse(parser, line)
        assert isinstance(err, LineError) and (err.code, err.field) == ("unsupported_field", field), err


def test_n_adds_no_setting_and_keeps_every_hash(parser):
    """n is a line field only: no [sampling] key (every job's fingerprint stays), and request_hash is the line's
    JSON as before: unchanged for lines without n and for lines with "n": 1 (which were accepted before n was
    implemented, so their old results stay valid on --resume); n = 2 and n = 3 differ."""
    settings = load_settings(None, {}, "/").sampling
    assert "n" not in settings
    parser.fingerprint = job_fingerprint(defaults())
    for line in (native(), chat(), completion(), native(n=1), chat(n=1), completion(n=1)):
        assert parse(parser, line).request_hash == request_hash(line, parser.fingerprint)
    hashes = {parse(parser, native(n=k)).request_hash for k in (None, 2, 3)}
    assert len(hashes) == 3


def test_a_template_that_reads_n_keeps_it_as_data(tmp_path):
    from flashgen.jobs.templates import load_template

    (tmp_path / "t.j2").write_text("Q: {{ question }} ({{ n }} of them)")
    tpl = load_template(str(tmp_path / "t.j2"))
    p = LineParser(FakeTokenizer(), 64, defaults(), template=tpl, template_name="t.j2")
    req = parse(p, {"id": 1, "question": "why", "n": 3})
    assert isinstance(req, LineRequest) and req.params.n == 1
    assert isinstance(parse(p, {"id": 2, "question": "why", "n": "three"}), LineRequest)  # data, any value
    plain = LineParser(FakeTokenizer(), 64, defaults(), template=load_template(_write(tmp_path, "Q: {{ q }}")),
                       template_name="u.j2")
    assert parse(plain, {"id": 3, "q": "why", "n": 3}).params.n == 3  # a template that does not read it


def _write(tmp_path, text: str) -> str:
    (tmp_path / "u.j2").write_text(text)
    return str(tmp_path / "u.j2")


# ---- record shapes from hand-made outputs --------------------------------------------------------------------------

def hand_made(n: int = 3, logprobs: bool = False) -> RequestOutput:
    """n samples of 1 + i tokens each (sample i: token ids 10 + i..., text "s<i>"), sample 1 stopped by "!"."""
    samples = []
    for i in range(n):
        ids = [10 + i + j for j in range(1 + i)]
        lps = [{t: Logprob(-0.5 * (i + 1), 1, f"t{t}")} for t in ids] if logprobs else None
        samples.append(CompletionOutput(i, f"s{i}", ids, "stop" if i == 1 else "length", "!" if i == 1 else None,
                                        lps, -0.5 * (i + 1) * len(ids) if logprobs else None))
    c0 = samples[0]
    return RequestOutput("0", None, [1, 2, 3], c0.text, c0.token_ids, c0.finish_reason, c0.stop_reason,
                         logprobs=c0.logprobs, cumulative_logprob=c0.cumulative_logprob,
                         prompt_logprobs=[None, {2: Logprob(-1.0, 1, "b")}, {3: Logprob(-2.0, 1, "c")}]
                         if logprobs else None, outputs=samples)


def request(kind, **params) -> LineRequest:
    return LineRequest(1, "x", '"x"', kind, None, SamplingParams(**params), "0123456789ab")


def body_of(rec: dict) -> dict:
    assert rec["error"] is None and rec["response"]["status_code"] == 200
    return {k: v for k, v in rec["response"]["body"].items() if k not in ("id", "created")}


def test_native_record_with_samples():
    rec = result_record(request(None, n=3), hand_made(), 3, "m", False)
    assert rec == {
        "id": "x", "text": "s0", "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 6},
        "samples": [
            {"index": 0, "text": "s0", "finish_reason": "length", "stop_reason": None},
            {"index": 1, "text": "s1", "finish_reason": "stop", "stop_reason": "!"},
            {"index": 2, "text": "s2", "finish_reason": "length", "stop_reason": None},
        ],
        "request_hash": "0123456789ab",
    }
    assert list(rec) == ["id", "text", "finish_reason", "usage", "samples", "request_hash"]
    assert record_key(rec) == '"x"'  # --resume knows it as the line's result


def test_native_record_with_samples_token_ids_and_logprobs():
    rec = result_record(request(None, n=3, logprobs=0, prompt_logprobs=0), hand_made(logprobs=True), 3, "m", True)
    assert list(rec) == ["id", "text", "finish_reason", "usage", "samples", "prompt_logprobs", "request_hash"]
    assert rec["prompt_logprobs"] == [
        None, {"token_id": 2, "token": "b", "logprob": -1.0, "rank": 1, "top": []},
        {"token_id": 3, "token": "c", "logprob": -2.0, "rank": 1, "top": []}]
    for i, s in enumerate(rec["samples"]):
        assert list(s) == ["index", "text", "finish_reason", "stop_reason", "token_ids", "logprobs",
                           "cumulative_logprob"]
        ids = [10 + i + j for j in range(1 + i)]
        assert s["index"] == i and s["token_ids"] == ids
        assert s["logprobs"] == [{"token_id": t, "token": f"t{t}", "logprob": -0.5 * (i + 1), "rank": 1, "top": []}
                                 for t in ids]
        assert s["cumulative_logprob"] == -0.5 * (i + 1) * len(ids)


def test_chat_record_with_choices():
    rec = result_record(request("chat.completion", n=3), hand_made(), 3, "m", False)
    assert body_of(rec) == {
        "object": "chat.completion", "model": "m",
        "choices": [{"index": i, "message": {"role": "assistant", "content": f"s{i}"}, "logprobs": None,
                     "finish_reason": "stop" if i == 1 else "length"} for i in range(3)],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    }
    assert rec["request_hash"] == "0123456789ab"
    rec = result_record(request("chat.completion", n=3, logprobs=0, prompt_logprobs=0), hand_made(logprobs=True), 3,
                        "m", False)
    body = body_of(rec)
    for i, choice in enumerate(body["choices"]):
        assert choice["logprobs"] == {"refusal": None, "content": [
            {"token": f"t{t}", "logprob": -0.5 * (i + 1), "bytes": list(f"t{t}".encode()), "top_logprobs": []}
            for t in range(10 + i, 11 + 2 * i)]}
    assert body["prompt_logprobs"] == [None, {"2": {"logprob": -1.0, "rank": 1, "decoded_token": "b"}},
                                       {"3": {"logprob": -2.0, "rank": 1, "decoded_token": "c"}}]


def test_completion_record_with_choices():
    rec = result_record(request("text_completion", n=3), hand_made(), 3, "m", False)
    assert body_of(rec) == {
        "object": "text_completion", "model": "m",
        "choices": [{"index": i, "text": f"s{i}", "logprobs": None, "finish_reason": "stop" if i == 1 else "length"}
                    for i in range(3)],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    }
    rec = result_record(request("text_completion", n=3, logprobs=1, prompt_logprobs=0), hand_made(logprobs=True), 3,
                        "m", False)
    for i, choice in enumerate(body_of(rec)["choices"]):
        tokens = [f"t{t}" for t in range(10 + i, 11 + 2 * i)]
        assert list(choice) == ["index", "text", "logprobs", "finish_reason", "prompt_logprobs"]
        assert choice["logprobs"]["tokens"] == tokens
        assert choice["logprobs"]["token_logprobs"] == [-0.5 * (i + 1)] * len(tokens)
        assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == 3  # each choice's, as vLLM


@pytest.mark.parametrize("kind", [None, "chat.completion", "text_completion"])
@pytest.mark.parametrize("logprobs", [False, True])
def test_one_sample_records_are_as_before(kind, logprobs):
    """n = 1: the engine's one-entry `outputs` changes nothing; the record equals one from the flat fields."""
    one = hand_made(1, logprobs)
    flat = RequestOutput(**{**one.__dict__, "outputs": []})
    params = {"logprobs": 1, "prompt_logprobs": 1} if logprobs else {}
    a = result_record(request(kind, **params), one, 3, "m", True)
    b = result_record(request(kind, **params), flat, 3, "m", True)
    if kind is None:
        assert a == b and "samples" not in a and list(a)[:5] == ["id", "text", "finish_reason", "usage", "token_ids"]
    else:
        assert body_of(a) == body_of(b) and len(body_of(a)["choices"]) == 1


# ---- a failed sample fails its line --------------------------------------------------------------------------------

class FailingSampleLLM(FakeLLM):
    """FakeLLM whose requests with n > 1 finish with every sample, sample 1 of request "1" failed (as the engine
    reports it: finish_reason "error" with the first failure's code and message)."""

    def step(self):
        done = []
        for out in super().step():
            params = self.params[out.request_id]
            samples = [CompletionOutput(i, out.text, list(out.token_ids), "length") for i in range(params.n)]
            if out.request_id == "1" and params.n > 1:
                samples[1] = CompletionOutput(1, "", [], "error", error_code="non_finite_logits",
                                              error="sample 1: the logits were not finite")
                out.finish_reason, out.error_code, out.error = "error", "non_finite_logits", samples[1].error
            out.outputs = samples
            done.append(out)
        return done

    def __init__(self):
        super().__init__()
        self.params: dict[str, SamplingParams] = {}

    def add_request(self, request_id, prompt, params) -> None:
        self.params[request_id] = params
        super().add_request(request_id, prompt, params)


def test_a_failed_sample_makes_its_line_an_error_record():
    lines = [native(id="a", n=3), native(id="b", n=3), chat(n=2), native(id="d", n=2)]
    for order, bad in ((lines, "b"), ([lines[0], lines[2], lines[1], lines[3]], "c")):
        raws = b"".join(json.dumps(x).encode() + b"\n" for x in order)
        llm = FailingSampleLLM()
        sink, stats = io.BytesIO(), JobStats()
        parser = LineParser(llm.tokenizer, llm.max_model_len, {**defaults(), "max_tokens": 2})
        status = Runner(llm, parser, OrderedWriter(sink, "input"), stats, max_in_flight=8).run(
            read_lines(io.BytesIO(raws)), IdSet())
        recs = [json.loads(x) for x in sink.getvalue().splitlines()]
        assert status == "line_errors" and stats.errors == 1 and stats.ok == 3
        assert stats.completion_tokens == 3 + 3 + 2 + 2 - {"b": 3, "c": 2}[bad]  # one token a sample, summed
        failed = recs[1]  # request id "1": the second line
        key = failed.get("custom_id", failed["id"])
        assert key == bad
        assert failed["error"]["code"] == "non_finite_logits" and "sample 1" in failed["error"]["message"]
        assert failed["error"]["message"].startswith("line 2: ")
        if bad == "c":
            assert failed["response"]["status_code"] == 400
        assert all(r.get("error") is None for i, r in enumerate(recs) if i != 1)


# ---- end to end: the CLI on a tiny random checkpoint ---------------------------------------------------------------

E2E = ["--max-tokens", "6", "--ignore-eos", "--return-token-ids"]


def e2e_lines(n: int | None, **extra) -> list[dict]:
    def with_n(d: dict) -> dict:
        return d if n is None else {**d, "n": n}

    return [
        {"id": "p", "prompt": "The quick brown fox", **with_n(extra)},
        {"custom_id": "c", "method": "POST", "url": CHAT_URL,
         "body": with_n({"messages": [{"role": "user", "content": "Name a colour"}], **extra})},
        {"custom_id": "m", "method": "POST", "url": COMPLETIONS_URL,
         "body": with_n({"prompt": "Once upon a time", **extra})},
    ]


def texts_of(rec: dict) -> list[str]:
    if "custom_id" not in rec:
        return [s["text"] for s in rec["samples"]] if "samples" in rec else [rec["text"]]
    return [c["message"]["content"] if "message" in c else c["text"] for c in rec["response"]["body"]["choices"]]


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1", "--seed", "11"]],
                         ids=["greedy", "seeded"])
def test_shapes_end_to_end_and_sample_0_is_the_one_sample_run(tmp_path, sampling):
    r, three = gen(tmp_path, e2e_lines(3), *E2E, *sampling)
    assert r.exit_code == ExitCode.OK, r.stderr
    r1, one = gen(tmp_path, e2e_lines(None), *E2E, *sampling, name="one.jsonl")
    assert r1.exit_code == ExitCode.OK, r1.stderr
    p, c, m = three
    assert list(p) == ["id", "text", "finish_reason", "usage", "samples", "request_hash"]
    assert [s["index"] for s in p["samples"]] == [0, 1, 2]
    for s in p["samples"]:
        assert list(s) == ["index", "text", "finish_reason", "stop_reason", "token_ids"]
        assert s["finish_reason"] == "length" and s["stop_reason"] is None and len(s["token_ids"]) == 6
    assert (p["text"], p["finish_reason"]) == (p["samples"][0]["text"], p["samples"][0]["finish_reason"])
    assert p["usage"]["completion_tokens"] == 18
    for rec in (c, m):
        body = rec["response"]["body"]
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
        want = ["index", "message", "logprobs", "finish_reason"] if rec is c else \
            ["index", "text", "logprobs", "finish_reason"]
        assert all(list(ch) == want and ch["finish_reason"] == "length" for ch in body["choices"])
        assert body["usage"]["completion_tokens"] == 18
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 18
    for a, b in zip(three, one, strict=True):  # sample 0 is the n = 1 run's text, same line, same seed
        assert texts_of(a)[0] == texts_of(b)[0]
        assert len(texts_of(b)) == 1 and "samples" not in b
    if sampling[1] == "0":
        assert all(len(set(texts_of(rec))) == 1 for rec in three)  # greedy: every sample the same
    else:
        assert any(len(set(texts_of(rec))) > 1 for rec in three)   # temperature 1: they differ


def test_samples_are_the_seeded_single_requests_and_n_changes_none(tmp_path):
    """Sample i of a line with seed s is the one-sample line with seed sample_seed(s, i); n = 2 gives n = 4's first
    two samples; a job seed reaches the samples through the line's seed (line_seed)."""
    base = {"prompt": "hello world", "temperature": 1.0, "seed": 123, "max_tokens": 5, "ignore_eos": True}
    singles = [{"id": f"s{i}", **base, "seed": sample_seed(123, i)} for i in range(4)]
    lines = [{"id": "four", **base, "n": 4}, {"id": "two", **base, "n": 2}, *singles]
    r, recs = gen(tmp_path, lines, "--return-token-ids")
    assert r.exit_code == ExitCode.OK, r.stderr
    four, two, *one = recs
    assert [s["token_ids"] for s in four["samples"]] == [o["token_ids"] for o in one]
    assert [s["token_ids"] for s in two["samples"]] == [o["token_ids"] for o in one[:2]]
    assert len({tuple(s["token_ids"]) for s in four["samples"]}) > 1
    # the job's --seed: line "j" gets line_seed(7, its key), and its samples are that seed's
    job = [{"id": "j", "prompt": "hello world", "n": 3, "max_tokens": 5, "ignore_eos": True}]
    job += [{"id": f"j{i}", "prompt": "hello world", "max_tokens": 5, "ignore_eos": True,
             "seed": sample_seed(line_seed(7, '"j"'), i)} for i in range(3)]
    r, recs = gen(tmp_path, job, "--return-token-ids", "--temperature", "1", "--seed", "7", name="job.jsonl")
    assert r.exit_code == ExitCode.OK, r.stderr
    assert [s["token_ids"] for s in recs[0]["samples"]] == [o["token_ids"] for o in recs[1:]]


def test_logprobs_with_n_end_to_end(tmp_path):
    lines = [{"id": "p", "prompt": "The quick brown fox", "n": 3, "logprobs": 2, "prompt_logprobs": 1},
             {"custom_id": "c", "method": "POST", "url": CHAT_URL, "body": {
                 "messages": [{"role": "user", "content": "hi"}], "n": 2, "logprobs": True, "top_logprobs": 2}},
             {"custom_id": "m", "method": "POST", "url": COMPLETIONS_URL, "body": {
                 "prompt": "hi", "n": 2, "logprobs": 1, "prompt_logprobs": 0}}]
    r, (p, c, m) = gen(tmp_path, lines, *E2E, "--temperature", "1", "--seed", "3")
    assert r.exit_code == ExitCode.OK, r.stderr
    assert len(p["prompt_logprobs"]) == p["usage"]["prompt_tokens"] and p["prompt_logprobs"][0] is None
    for s in p["samples"]:
        assert [e["token_id"] for e in s["logprobs"]] == s["token_ids"]
        assert all(len(e["top"]) == 2 for e in s["logprobs"])
        assert s["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in s["logprobs"]), abs=1e-4)
    assert len({tuple(s["token_ids"]) for s in p["samples"]}) > 1
    choices = c["response"]["body"]["choices"]
    assert len(choices) == 2
    for ch in choices:
        content = ch["logprobs"]["content"]
        assert len(content) == 6
        assert all(len(e["top_logprobs"]) == 2 for e in content)
    mbody = m["response"]["body"]
    for ch in mbody["choices"]:
        assert len(ch["logprobs"]["tokens"]) == len(ch["logprobs"]["token_logprobs"]) == 6
        assert len(ch["prompt_logprobs"]) == mbody["usage"]["prompt_tokens"]
    assert mbody["usage"]["completion_tokens"] == 12


def test_wrong_n_end_to_end(tmp_path):
    lines = [native(id="zero", n=0), chat(n=129), completion(n="3"), native(id="t", n=True), native(id="ok", n=2)]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert [rec["error"]["code"] for rec in recs[:4]] == ["invalid_param", "invalid_param", "invalid_field",
                                                        "invalid_field"]
    assert 'field "n" is 0' in recs[0]["error"]["message"]
    assert recs[1]["response"]["body"]["error"]["param"] == "body.n" and recs[1]["response"]["status_code"] == 400
    assert recs[2]["response"]["body"]["error"]["param"] == "body.n"
    assert 'field "n" is true' in recs[3]["error"]["message"]
    assert len(recs[4]["samples"]) == 2


# ---- resume: a line is done when its record (every sample) is written ----------------------------------------------

N_LINES, N_SAMPLES = 24, 4
# Slow enough to interrupt mid-run: 24 lines x 4 samples x 10 tokens, 3 sequences at a time (the samples of one
# line are split across steps and across the window), yet quick.
SLOW = ["--device", "cpu", "--max-tokens", "10", "--ignore-eos", "--max-num-seqs", "3", "--return-token-ids"]
MODES = {"greedy": ["--temperature", "0"], "seeded": ["--temperature", "1", "--seed", "5"]}


def resume_input(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = []
    for i in range(N_LINES):
        if i % 3 == 0:
            lines.append({"id": f"r{i}", "prompt": f"request number {i}", "n": N_SAMPLES})
        elif i % 3 == 1:
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": CHAT_URL,
                          "body": {"messages": [{"role": "user", "content": f"request {i}"}], "n": N_SAMPLES}})
        else:
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": COMPLETIONS_URL,
                          "body": {"prompt": f"request {i}", "n": N_SAMPLES}})
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return src


def samples_by_line(recs: list[dict]) -> dict[str, list]:
    """line id -> its samples (native: token ids; OpenAI: (index, text, finish_reason) per choice)."""
    out = {}
    for rec in recs:
        if "custom_id" in rec:
            assert rec["error"] is None, rec
            out[rec["custom_id"]] = [(ch["index"], ch.get("text", ch.get("message", {}).get("content")),
                                      ch["finish_reason"]) for ch in rec["response"]["body"]["choices"]]
        else:
            assert "error" not in rec, rec
            out[rec["id"]] = [(s["index"], s["token_ids"]) for s in rec["samples"]]
    return out


@pytest.fixture(scope="module", params=list(MODES))
def uninterrupted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"n-resume-{request.param}")
    src, full = resume_input(tmp), tmp / "full.jsonl"
    r = cli(["generate", src, "-o", full, "--model", tiny_model(), *SLOW, *MODES[request.param]], cwd=tmp)
    assert r.exit_code == 0, r.stderr
    want = samples_by_line(read_jsonl(full))
    assert len(want) == N_LINES and all(len(s) == N_SAMPLES for s in want.values())
    if request.param == "seeded":
        assert all(len({str(x[1:]) for x in s}) > 1 for s in want.values())  # the samples do differ
    return request.param, src, want, full


def check_resumed(out, want):
    recs = read_jsonl(out)
    keys = [rec.get("custom_id", rec.get("id")) for rec in recs]
    assert sorted(keys) == sorted(want), keys  # no line duplicated or missing
    got = samples_by_line(recs)
    for k, samples in got.items():
        assert [s[0] for s in samples] == list(range(N_SAMPLES)), (k, samples)  # all n samples, by index
    assert got == want  # and each is the uninterrupted run's


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_then_resumed_gives_every_line_once_with_all_its_samples(uninterrupted, tmp_path, sig):
    mode, src, want, _ = uninterrupted
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "flashgen", "generate", str(src), "-o", str(out), "--model", tiny_model(), *SLOW,
           *MODES[mode]]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=proc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(p, out, 3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else ExitCode.INTERRUPTED), err.decode()
    partial = [line for line in out.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 3 <= len(partial) < N_LINES  # cut short, mid-job
    done = samples_by_line([json.loads(x) for x in partial])
    assert all(want[k] == s for k, s in done.items())  # what was written is whole
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *SLOW, *MODES[mode]], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert f"{len(partial)} lines already done" in r.stderr, r.stderr
    check_resumed(out, want)


def test_a_torn_record_is_not_a_done_line(uninterrupted, tmp_path):
    """kill -9 mid-write leaves a record cut short: its line has not all its samples written, and it runs again."""
    mode, src, want, full = uninterrupted
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # 5 whole records, then half of one
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *SLOW, *MODES[mode]], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert "5 lines already done" in r.stderr and f"{N_LINES - 5} lines" in r.stderr, r.stderr
    check_resumed(out, want)


def test_resume_of_a_finished_job_runs_nothing(uninterrupted, tmp_path):
    mode, src, want, full = uninterrupted
    out = tmp_path / "out.jsonl"
    out.write_bytes(full.read_bytes())
    r = cli(["generate", src, "-o", out, "--resume", "--model", tiny_model(), *SLOW, *MODES[mode]], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    assert f"{N_LINES} lines already done" in r.stderr and out.read_bytes() == full.read_bytes()


def test_fast_flags_keep_n(tmp_path):
    """The FAST flags of the other CLI tests (greedy, 4 tokens) with n: a quick smoke of every line kind."""
    r = cli(["generate", "-", "-o", tmp_path / "o.jsonl", "--model", tiny_model(), *FAST], cwd=tmp_path,
            input="".join(json.dumps(x) + "\n" for x in e2e_lines(2)))
    assert r.exit_code == 0, r.stderr
    assert [len(texts_of(rec)) for rec in read_jsonl(tmp_path / "o.jsonl")] == [2, 2, 2]
