"""The line contract: every non-blank input line gets exactly one honest answer (its result, or an error record
naming the line, the field, the value and the fix) and no line can crash the job. One test per class of failure,
through the real job runner and a real engine on a tiny checkpoint."""
from __future__ import annotations

import io
import json

import pytest

from flashgen.jobs.errors import ExitCode
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import load_settings
from flashgen.jobs.writer import OrderedWriter
from test_cli_support import cli, gen, tiny_model

GOOD = b'{"id": "good", "prompt": "hello"}'
LAST = b'{"custom_id": "last", "url": "/v1/completions", "body": {"prompt": "bye", "temperature": 1}}'


@pytest.fixture(scope="module")
def llm():
    from flashgen.llm import LLM

    return LLM(tiny_model(), device="cpu", max_num_seqs=16, max_model_len=256)


def run(llm, lines: list[bytes], max_line_bytes: int = 64 << 20, **parser_kw) -> tuple[str, list[dict]]:
    defaults = defaults_from_settings(load_settings(None, {}, "/").sampling)
    defaults.update(max_tokens=2, seed=0)
    parser = LineParser(llm.tokenizer, llm.max_model_len, defaults, **parser_kw)
    sink = io.BytesIO()
    runner = Runner(llm, parser, OrderedWriter(sink, "input"), JobStats(), max_in_flight=16)
    status = runner.run(read_lines(io.BytesIO(b"\n".join(lines) + b"\n"), max_line_bytes), IdSet())
    return status, [json.loads(x) for x in sink.getvalue().splitlines()]


def check_one_bad_line(llm, bad: bytes, code: str, field: str | None, parts=(), **kw) -> dict:
    """GOOD, `bad`, LAST: the good lines get results, the bad one one error record naming its field."""
    status, recs = run(llm, [GOOD, bad, LAST], **kw)
    assert status == "line_errors"  # exit code 1
    assert len(recs) == 3, recs
    assert recs[0]["id"] == "good" and "text" in recs[0], recs[0]
    assert recs[2]["custom_id"] == "last" and recs[2]["response"]["status_code"] == 200, recs[2]
    err = recs[1]["error"]
    assert err["code"] == code, recs[1]
    assert err["message"].startswith("line 2: "), err
    if field is not None:
        assert f'field "{field}"' in err["message"], err
        if "response" in recs[1]:  # an OpenAI batch line: the field is the error body's param
            assert recs[1]["response"]["body"]["error"]["param"] == field
    for part in parts:
        assert part in err["message"], (part, err)
    return recs[1]


BATCH = '{"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x", %s}}'
CHAT = '{"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], %s}}'

# 1. values that crashed the whole job
CRASHERS = [
    ('{"id": "s", "prompt": "x", "seed": 18446744073709551616}', "invalid_param", "seed", ["2**64"]),
    ('{"id": "s", "prompt": "x", "seed": -1}', "invalid_param", "seed", ["[0, 2**64)"]),
    ('{"id": "t", "prompt": "x", "temperature": 1%s}' % ("0" * 400), "invalid_param", "temperature", ["finite"]),
    ('{"id": "k", "prompt": "x", "stop_token_ids": [100000], "min_tokens": 1}', "invalid_token_id",
     "stop_token_ids", ["100000", "integers 0.."]),
    ('{"id": "k", "prompt": "x", "stop_token_ids": [-3], "min_tokens": 1}', "invalid_param", "stop_token_ids", []),
    ('{"id": "u", "prompt": "a\\ud800b"}', "invalid_unicode", "prompt", ["surrogate"]),
    ('{"id": "u", "messages": [{"role": "user", "content": "\\udc00"}]}', "invalid_unicode",
     "messages[0].content", []),
    (BATCH.replace('"x"', '"\\ud800"') % '"seed": 1', "invalid_unicode", "body.prompt", []),
    ('{"id": "d", "prompt": ' + "[" * 1000 + "]" * 1000 + "}", "too_deep", None, ["nested"]),
    ('{"id": "d", "prompt": ' + '{"a":' * 2000 + '"x"' + "}" * 2000 + "}", "too_deep", None, []),
    ('{"custom_id": "u", "url": ["/v1/completions"], "body": {}}', "unsupported_url", "url", []),
    ('{"custom_id": "u", "url": {"a": 1}, "body": {}}', "unsupported_url", "url", []),
    ('{"id": "i", "prompt": "x", "max_tokens": %s}' % ("9" * 5000), "invalid_json", None, ["4300 digits"]),
]


@pytest.mark.parametrize("raw,code,field,parts", CRASHERS)
def test_values_that_crashed_the_job_become_error_records(llm, raw, code, field, parts):
    rec = check_one_bad_line(llm, raw.encode(), code, field, parts)
    assert rec.get("custom_id", rec.get("id")) in ("s", "t", "k", "u", "d", "b", "i")  # the record carries the id


@pytest.mark.parametrize("raw", [
    '{"id": "k", "prompt": "x", "top_k": 100000, "temperature": 1}',  # above the vocabulary: all tokens
    '{"id": "k", "prompt": "x", "top_k": %s, "temperature": 1}' % ("9" * 40),
    '{"id": "s", "prompt": "x", "seed": 18446744073709551615, "temperature": 1}',
    '{"id": "s", "prompt": "x", "seed": 9223372036854775808, "temperature": 1}',
])
def test_values_at_the_edge_of_the_ranges_run(llm, raw):
    status, recs = run(llm, [GOOD, raw.encode(), LAST])
    assert status == "ok" and all("error" not in r or r["error"] is None for r in recs), recs


# 2. accepted and wrong: every float finite, on lines (flags and config: test_config_and_flags_are_checked)
NON_FINITE = [
    ('{"id": "n", "prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
    ('{"id": "n", "prompt": "x", "temperature": Infinity}', "temperature"),
    ('{"id": "n", "prompt": "x", "top_p": -Infinity}', "top_p"),
    ('{"id": "n", "prompt": "x", "presence_penalty": 1%s}' % ("0" * 330), "presence_penalty"),
    (CHAT % '"frequency_penalty": NaN', "body.frequency_penalty"),
    ('{"id": "n", "prompt": "x", "min_p": true}', "min_p"),
]


@pytest.mark.parametrize("raw,field", NON_FINITE)
def test_non_finite_numbers_are_refused(llm, raw, field):
    code = "invalid_field" if "true" in raw else "invalid_param"
    check_one_bad_line(llm, raw.encode(), code, field)


# 3. silently ignored fields are refused, naming them
IGNORED = [
    ('{"id": "f", "prompt": "x", "logit_bias": {"5": 10, "x": 1}}', "invalid_field", "logit_bias", ["not a token id"]),
    ('{"id": "f", "prompt": "x", "logprobs": true}', "invalid_field", "logprobs", ["chat form"]),
    ('{"id": "f", "prompt": "x", "temprature": 0.5}', "unknown_field", "temprature", ['did you mean "temperature"']),
    ('{"id": "f", "prompt": "x", "max_new_tokens": 5}', "unknown_field", "max_new_tokens", ['"max_tokens"']),
    ('{"id": "f", "prompt": "x", "source": "wiki"}', "unknown_field", "source", ["--template"]),
    ('{"id": "f", "prompt": "x", "messages": []}', "ambiguous_prompt", "prompt", []),
    (CHAT % '"logprobs": 3', "invalid_field", "body.logprobs", ["true or false"]),
    (CHAT % '"guided_decoding_backend": "xgrammar"', "unsupported_field", "body.guided_decoding_backend", []),
    (CHAT % '"response_fromat": {"type": "json_object"}', "unknown_field", "body.response_fromat",
     ['did you mean "response_format"']),
    (CHAT % '"tools": [{"type": "function"}]', "unsupported_field", "body.tools", []),
    (CHAT % '"tool_choice": "auto"', "unsupported_field", "body.tool_choice", []),
    (CHAT % '"top_logprobs": 3', "invalid_param", "body.top_logprobs", ['"logprobs": true']),
    (CHAT % '"stream": true', "unsupported_field", "body.stream", []),
    (BATCH % '"echo": true', "unsupported_field", "body.echo", []),
    (BATCH % '"best_of": 3', "unsupported_field", "body.best_of", []),
    (BATCH % '"suffix": "end"', "unsupported_field", "body.suffix", []),
    (BATCH % '"temprature": 0', "unknown_field", "body.temprature", ['"temperature"']),
    (BATCH % '"frobnicate": 1', "unknown_field", "body.frobnicate", []),
    (CHAT % '"prompt": "y"', "unknown_field", "body.prompt", ['"messages"']),
    ('{"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x"}, "max_tokens": 3}', "unknown_field",
     "max_tokens", ['inside "body"']),
    (CHAT % '"max_completion_tokens": -1', "invalid_param", "body.max_completion_tokens", ["-1"]),
    (CHAT % '"max_completion_tokens": 5, "min_tokens": 9', "invalid_param", "body.min_tokens", []),
]


@pytest.mark.parametrize("raw,code,field,parts", IGNORED)
def test_fields_that_would_be_ignored_are_refused(llm, raw, code, field, parts):
    check_one_bad_line(llm, raw.encode(), code, field, parts)


def test_fields_that_change_nothing_are_accepted(llm):
    harmless = CHAT % ('"model": "gpt", "user": "u", "metadata": {"a": 1}, "store": false, "stream": false, "n": 1, '
                       '"logprobs": false, "top_logprobs": null, "parallel_tool_calls": true, "service_tier": "auto"')
    plain = b'{"id": "p", "prompt": "x", "stream": false, "logprobs": null, "model": "m"}'
    status, recs = run(llm, [GOOD, harmless.encode(), plain, LAST])
    assert status == "ok", recs


def test_data_fields_with_template_or_field(llm, tmp_path):
    from flashgen.jobs.templates import load_template

    (tmp_path / "t.j2").write_text("Q: {{ question }} {{ n }}")
    tpl = load_template(str(tmp_path / "t.j2"))
    lines = [b'{"id": 1, "question": "why", "n": 3, "source": "wiki"}',  # n is the template's: data
             b'{"id": 2, "question": "why", "n": 3, "temprature": 0}',
             b'{"id": 3, "question": "why", "n": 3, "best_of": 2}']
    status, recs = run(llm, lines, template=tpl, template_name="t.j2")
    assert "text" in recs[0] and recs[1]["error"]["code"] == "unknown_field"
    assert recs[2]["error"]["code"] == "unsupported_field" and status == "line_errors"
    status, recs = run(llm, [b'{"id": 1, "text": "hi", "source": "wiki"}'], field="text")
    assert status == "ok", recs


# 4. bounded work before a check
def test_huge_prompts_are_refused_before_tokenizing(llm):
    import time

    big = b"hello world " * 2_000_000  # 24 MB
    lines = [b'{"id": "p", "prompt": "%s"}' % big,
             b'{"id": "m", "messages": [{"role": "user", "content": "%s"}]}' % big]
    t = time.perf_counter()
    status, recs = run(llm, [GOOD] + lines + [LAST], max_line_bytes=0)
    assert time.perf_counter() - t < 20
    for rec, field in zip(recs[1:3], ["prompt", "messages"], strict=True):
        assert rec["error"]["code"] == "prompt_too_long", rec
        assert f'field "{field}"' in rec["error"]["message"] and "at least" in rec["error"]["message"]
    assert "text" in recs[0] and recs[3]["response"]["status_code"] == 200


@pytest.mark.parametrize("raw,want_id", [
    (b'{"id": "long-one", "prompt": "' + b"x" * 5000 + b'"}', "long-one"),
    (b'{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "' + b"x" * 5000 + b'"}}', "c"),
    (b'{"prompt": "' + b"x" * 5000 + b'", "id": 7}', 2),  # the id is past the first bytes: the line number
])
def test_overlong_lines_are_skipped_unread(llm, raw, want_id):
    rec = check_one_bad_line(llm, raw, "line_too_long", None, ["--max-line-bytes", "1,000"], max_line_bytes=1000)
    assert rec.get("custom_id", rec.get("id")) == want_id


def test_read_lines_limit_keeps_memory_flat():
    from flashgen.jobs.inputs import LongLine

    data = b'{"id": 1}\n' + b"x" * (10 << 20) + b"\n" + b'{"id": 3}\n' + b"y" * 100
    got = list(read_lines(io.BytesIO(data), 50))
    assert got[0] == (1, b'{"id": 1}\n') and got[2] == (3, b'{"id": 3}\n')
    assert isinstance(got[1][1], LongLine) and got[1][1].nbytes == 10 << 20 and len(got[1][1].head) <= 4096
    assert isinstance(got[3][1], LongLine) and got[3][1].nbytes == 100
    assert [n for n, _ in read_lines(io.BytesIO(b"x" * 50 + b"\n" + b"y" * 50), 50)] == [1, 2]  # exactly the limit


# 5. config and flags: checked at start-up with the same table as a line's fields
@pytest.mark.parametrize("args,part", [
    (["--max-errors", "-1"], "job.max_errors"),
    (["--repetition-penalty", "nan"], "sampling.repetition_penalty"),
    (["--temperature", "inf"], "sampling.temperature"),
    (["--seed", str(2**64)], "sampling.seed"),
    (["--max-line-bytes", "-1"], "job.max_line_bytes"),
    (["--top-p", "0"], "sampling.top_p"),
    (["--kv-cache-gb", "nan"], "engine.kv_cache_gb"),
])
def test_bad_flags_are_fatal_at_start_up(tmp_path, args, part):
    r = cli(["generate", "--show-config", *args], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and part in r.stderr, r.stderr


@pytest.mark.parametrize("text,part", [
    (b"[sampling]\nrepetition_penalty = nan\n", "sampling.repetition_penalty"),
    (b"[sampling]\ntemperature = inf\n", "sampling.temperature"),
    (b"[sampling]\nstop_token_ids = [-1]\n", "sampling.stop_token_ids"),
    (b"[job]\nmax_errors = -2\n", "job.max_errors"),
    (b"[sampling]\n# caf\xe9\n", "not UTF-8"),
])
def test_bad_config_is_fatal_naming_the_file(tmp_path, text, part):
    (tmp_path / "bad.toml").write_bytes(text)
    r = cli(["generate", "--show-config", "--config", "bad.toml"], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL, r.stderr
    assert "bad.toml" in r.stderr and part in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_with_a_bom_is_accepted(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[sampling]\ntemperature = 0.25\n[job]\nmax_line_bytes = 0\n")
    r = cli(["generate", "--show-config", "--config", "bom.toml"], cwd=tmp_path)
    assert r.exit_code == 0 and "temperature = 0.25" in r.stdout and "max_line_bytes = 0" in r.stdout, r.stderr


def test_default_stop_token_ids_outside_the_vocabulary_are_fatal(tmp_path):
    (tmp_path / "flashgen.toml").write_text("[sampling]\nstop_token_ids = [100000]\n")
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "hi"}])
    assert r.exit_code == ExitCode.FATAL and "stop_token_ids" in r.stderr and not recs, r.stderr


def test_sampling_params_is_the_final_authority():
    from flashgen.sampling_params import SamplingParams

    for kw in [dict(temperature=float("nan")), dict(top_p=float("inf")), dict(repetition_penalty=10**400),
               dict(temperature=True), dict(top_k=1.5), dict(seed=-1), dict(seed=2**64), dict(stop_token_ids=[-1]),
               dict(max_tokens=True)]:
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


# 6. ranges from the model, for the Python API too
def test_llm_api_clamps_top_k_and_maps_big_seeds(llm):
    from flashgen.sampling_params import SamplingParams

    outs = llm.generate(["hello", "world"], [SamplingParams(max_tokens=2, top_k=10**6, temperature=1.0,
                                                            seed=2**64 - 1),
                                             SamplingParams(max_tokens=2, min_tokens=2, stop_token_ids=[10**6],
                                                            temperature=1.0, seed=2**63)])
    assert [len(o.token_ids) for o in outs] == [2, 2]


def test_seeds_above_2_63_are_distinct_and_reproducible():
    from flashgen.engine.sampler import _as_int64

    assert _as_int64(2**64 - 1) == -1 and _as_int64(2**63) == -(2**63) and _as_int64(5) == 5
