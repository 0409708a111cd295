"""Structured outputs through the command line: every accepted way of asking for JSON, a regex, a choice or a
grammar (native lines, OpenAI chat and completion batch lines, job-wide flags and config), what each produces, and
an error record naming the exact field and the problem for each bad shape while the job goes on. CPU, tiny random
checkpoint (flashgen.jobs.structured; the engine's enforcement itself is tested in test_structured_outputs*)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from flashgen.jobs.errors import ExitCode
from test_cli_support import cli, gen, tiny_model

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
COLORS = {"type": "string", "enum": ["red", "green", "blue"]}
OBJECT = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
CHOICES = ["yes", "no", "maybe"]
REGEX = "[a-c]{3}x"


def chat(cid: str, **body) -> dict:
    return {"custom_id": cid, "url": CHAT_URL, "body": {"messages": [{"role": "user", "content": "hi"}], **body}}


def completion(cid: str, **body) -> dict:
    return {"custom_id": cid, "url": COMPLETIONS_URL, "body": {"prompt": "hi", **body}}


def result(rec: dict) -> tuple[str, str]:
    """(text, finish_reason) of a native or an OpenAI batch result record."""
    if "custom_id" not in rec:
        assert "error" not in rec, rec
        return rec["text"], rec["finish_reason"]
    assert rec["error"] is None and rec["response"]["status_code"] == 200, rec
    choice = rec["response"]["body"]["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"]


def check(rec: dict, kind: str, want) -> None:
    """The record's output satisfies its constraint."""
    text, finish = result(rec)
    if kind == "choice":
        assert text in want and finish == "stop", rec
    elif kind == "regex":
        assert re.fullmatch(want, text) and finish == "stop", rec
    elif kind == "json":  # complete JSON that matches the schema, or cut short by max_tokens
        assert finish in ("stop", "length"), rec
        if finish == "stop" or want is COLORS:
            assert finish == "stop", rec  # an enum is a few tokens: always complete
            jsonschema.validate(json.loads(text), want)
    elif kind == "json_object":
        assert finish in ("stop", "length"), rec
        if finish == "stop":
            assert isinstance(json.loads(text), dict), rec
    else:
        raise AssertionError(kind)


# (line, the constraint's kind, what the output must satisfy)
ACCEPTED = [
    ({"id": "n1", "prompt": "pick", "guided_choice": CHOICES}, "choice", CHOICES),
    ({"id": "n2", "prompt": "pick", "structured_outputs": {"choice": CHOICES}}, "choice", CHOICES),
    ({"id": "n3", "prompt": "x", "guided_regex": REGEX}, "regex", REGEX),
    ({"id": "n4", "prompt": "x", "structured_outputs": {"regex": REGEX, "json": None, "disable_fallback": False,
                                                         "whitespace_pattern": None}}, "regex", REGEX),
    ({"id": "n5", "prompt": "x", "guided_decoding": {"regex": REGEX}}, "regex", REGEX),
    ({"id": "n6", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "color", "schema": COLORS, "strict": True, "description": "a color"}}}, "json", COLORS),
    ({"id": "n7", "prompt": "x", "guided_json": COLORS}, "json", COLORS),
    ({"id": "n8", "prompt": "x", "guided_json": json.dumps(COLORS)}, "json", COLORS),  # the schema's JSON text
    ({"id": "n9", "prompt": "x", "structured_outputs": {"json": COLORS}}, "json", COLORS),
    ({"id": "n10", "prompt": "a", "guided_json": OBJECT, "max_tokens": 40}, "json", OBJECT),
    ({"id": "n11", "prompt": "a", "response_format": {"type": "json_object"}, "max_tokens": 40}, "json_object", None),
    ({"id": "n12", "prompt": "a", "structured_outputs": {"json_object": True}, "max_tokens": 40}, "json_object",
     None),
    ({"id": "n13", "prompt": "x", "guided_grammar": 'start: "A" | "B" "C"'}, "choice", ["A", "BC"]),
    ({"id": "n14", "prompt": "x", "structured_outputs": {"grammar": 'root ::= "up" | "down"'}}, "choice",
     ["up", "down"]),
    (chat("c1", response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": COLORS,
                                                                       "strict": None}}), "json", COLORS),
    (chat("c2", response_format={"type": "json_schema", "json_schema": {"name": "ok-1", "schema": OBJECT}},
          max_completion_tokens=40), "json", OBJECT),
    (chat("c3", response_format={"type": "json_object"}, max_tokens=40), "json_object", None),
    (chat("c4", guided_choice=CHOICES), "choice", CHOICES),
    (chat("c5", structured_outputs={"regex": REGEX}), "regex", REGEX),
    (chat("c6", guided_json=COLORS), "json", COLORS),
    (completion("p1", response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLORS}}),
     "json", COLORS),
    (completion("p2", guided_regex=REGEX), "regex", REGEX),
    (completion("p3", structured_outputs={"choice": CHOICES}), "choice", CHOICES),
    (completion("p4", guided_grammar='start: "A" | "B" "C"'), "choice", ["A", "BC"]),
]


def test_every_accepted_shape_constrains_its_output(tmp_path):
    lines = [line for line, _, _ in ACCEPTED]
    r, recs = gen(tmp_path, lines, "--max-tokens", "16")
    assert r.exit_code == ExitCode.OK, r.stderr
    assert len(recs) == len(ACCEPTED)
    for rec, (line, kind, want) in zip(recs, ACCEPTED, strict=True):
        assert rec.get("custom_id", rec.get("id")) == line.get("custom_id", line.get("id"))
        check(rec, kind, want)
    objects = [rec for rec, (_, _, want) in zip(recs, ACCEPTED, strict=True) if want is OBJECT]
    assert any(result(rec)[1] == "stop" for rec in objects)  # at least one complete object was validated


def test_text_or_null_means_no_constraint_and_nothing_is_added_to_the_prompt(tmp_path):
    lines = [
        {"id": "plain", "prompt": "x", "ignore_eos": True},
        {"id": "text", "prompt": "x", "ignore_eos": True, "response_format": {"type": "text"}},
        {"id": "null", "prompt": "x", "ignore_eos": True, "response_format": None, "structured_outputs": None,
         "guided_json": None},
        chat("chat-plain"),
        chat("chat-json", response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLORS}}),
        chat("chat-text", response_format={"type": "text"}),
    ]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.OK, r.stderr
    assert recs[0]["text"] == recs[1]["text"] == recs[2]["text"]  # unconstrained, the same greedy text
    assert all(rec["usage"]["completion_tokens"] == 4 for rec in recs[:3])
    usage = [rec["response"]["body"]["usage"]["prompt_tokens"] for rec in recs[3:]]
    assert usage[0] == usage[1] == usage[2]  # no schema is put into the prompt: the grammar alone constrains


def test_a_request_ends_as_soon_as_its_grammar_is_complete(tmp_path):
    lines = [{"id": 1, "prompt": "x", "guided_choice": ["ab"], "ignore_eos": True, "max_tokens": 30}]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.OK, r.stderr
    assert recs[0]["text"] == "ab" and recs[0]["finish_reason"] == "stop"


# (line, code, field, parts of the message)
BAD = [
    ({"id": "b1", "prompt": "x", "guided_json": {"type": "objekt"}}, "invalid_grammar", "guided_json",
     ["Invalid type: objekt"]),
    ({"id": "b2", "prompt": "x", "guided_json": {"type": "object", "unevaluatedProperties": False}},
     "invalid_grammar", "guided_json", ["unevaluatedProperties", "not a JSON schema flashgen can enforce"]),
    ({"id": "b3", "prompt": "x", "guided_regex": "[a-"}, "invalid_grammar", "guided_regex",
     ["does not compile", "unclosed character class"]),
    ({"id": "b4", "prompt": "x", "guided_choice": []}, "invalid_field", "guided_choice", ["non-empty list"]),
    ({"id": "b5", "prompt": "x", "guided_grammar": 'start: "a" ('}, "invalid_grammar", "guided_grammar",
     ["the grammar does not parse"]),
    ({"id": "b6", "prompt": "x", "structured_outputs": {"grammar": 'root ::= "a'}}, "invalid_grammar",
     "structured_outputs.grammar", ["the grammar does not parse"]),
    ({"id": "b7", "prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a"}, "invalid_field",
     "guided_regex", ['field "response_format"', "keep one of them"]),
    ({"id": "b8", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "invalid_field",
     "structured_outputs.choice", ['"structured_outputs.regex"', "keep one of them"]),
    ({"id": "b9", "prompt": "x", "response_format": {"type": "xml"}}, "invalid_field", "response_format.type",
     ['"xml"', '"json_schema", "json_object" or "text"']),
    ({"id": "b10", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "a b", "schema": COLORS}}}, "invalid_field", "response_format.json_schema.name", ['"a b"']),
    ({"id": "b11", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": COLORS}}},
     "invalid_field", "response_format.json_schema.name", ["missing"]),
    ({"id": "b12", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "c", "schemma": COLORS}}}, "unknown_field", "response_format.json_schema.schemma",
     ['did you mean "schema"']),
    ({"id": "b13", "prompt": "x", "structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
     "unsupported_field", "structured_outputs.disable_any_whitespace", ["does not implement"]),
    ({"id": "b14", "prompt": "x", "structured_outputs": {}}, "invalid_field", "structured_outputs",
     ["exactly one of"]),
    ({"id": "b15", "prompt": "x", "guided_json": "{not json"}, "invalid_grammar", "guided_json", ["not valid JSON"]),
    ({"id": "b16", "prompt": "x", "response_format": "json"}, "invalid_field", "response_format", ['"json"']),
    ({"id": "b17", "prompt": "x", "response_fromat": {"type": "json_object"}}, "unknown_field", "response_fromat",
     ['did you mean "response_format"']),
    ({"id": "b18", "prompt": "x", "structured_outputs": {"json": {"type": "string", "pattern": "(ab"}}},
     "invalid_grammar", "structured_outputs.json", ["unclosed group"]),
    ({"id": "b19", "prompt": "x", "structured_outputs": {"rgex": "a"}}, "unknown_field", "structured_outputs.rgex",
     ['did you mean "regex"']),
    ({"id": "b20", "prompt": "x", "guided_choice": ["a", ""]}, "invalid_field", "guided_choice", ["at index 1"]),
    (chat("bc1", response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "objekt"}}}),
     "invalid_grammar", "body.response_format.json_schema.schema", ["Invalid type: objekt"]),
    (chat("bc2", response_format={"type": "json_schema", "json_schema": {"name": "bad name!", "schema": COLORS}}),
     "invalid_field", "body.response_format.json_schema.name", ['"bad name!"']),
    (chat("bc3", guided_choice=[]), "invalid_field", "body.guided_choice", ["non-empty list"]),
    (chat("bc4", response_format={"type": "json_object"}, guided_regex="a"), "invalid_field", "body.guided_regex",
     ['field "body.response_format"']),
    (chat("bc5", response_format={"type": "text", "json_schema": {"name": "c", "schema": COLORS}}), "unknown_field",
     "body.response_format.json_schema", ['type "text"']),
    (chat("bc6", response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "unevaluatedProperties": False}}}), "invalid_grammar",
     "body.response_format.json_schema.schema", ["unevaluatedProperties"]),
    (completion("bp1", guided_regex="[a-"), "invalid_grammar", "body.guided_regex", ["unclosed character class"]),
    (completion("bp2", structured_outputs={"grammar": 'start: "a" ('}), "invalid_grammar",
     "body.structured_outputs.grammar", ["the grammar does not parse"]),
    (completion("bp3", response_format={"type": "json_object", "schema": {}}), "unknown_field",
     "body.response_format.schema", []),
    (completion("bp4", response_format={"type": "regex"}), "invalid_field", "body.response_format.type", []),
]


def test_each_bad_shape_is_an_error_record_naming_the_field_and_the_job_goes_on(tmp_path):
    def good(i: int) -> dict:
        return [{"id": f"good{i}", "prompt": "x", "guided_choice": CHOICES}, chat(f"good{i}", guided_regex=REGEX),
                completion(f"good{i}", response_format={"type": "json_schema", "json_schema": {
                    "name": "c", "schema": COLORS}})][i % 3]

    lines = []
    for i, (line, _, _, _) in enumerate(BAD):  # a good line after each bad one
        lines += [line, good(i)]
    r, recs = gen(tmp_path, lines, "--max-tokens", "16")
    assert r.exit_code == ExitCode.LINE_ERRORS, r.stderr
    assert len(recs) == 2 * len(BAD)
    for i, (line, code, field, parts) in enumerate(BAD):
        rec, ok = recs[2 * i], recs[2 * i + 1]
        check(ok, *[("choice", CHOICES), ("regex", REGEX), ("json", COLORS)][i % 3])
        err = rec["error"]
        assert rec.get("custom_id", rec.get("id")) == line.get("custom_id", line.get("id"))
        assert err["code"] == code, (line, rec)
        assert err["message"].startswith(f"line {2 * i + 1}: "), err
        assert f'field "{field}"' in err["message"], (field, err)
        for part in parts:
            assert part in err["message"], (part, err)
        if "custom_id" in line:  # the OpenAI error body names the field as its param
            assert rec["response"]["status_code"] == 400 and rec["response"]["body"]["error"]["param"] == field


def test_job_flags_apply_to_every_line_and_a_line_overrides_them(tmp_path):
    (tmp_path / "colors.json").write_text(json.dumps(COLORS))
    (tmp_path / "wrapped.json").write_text(json.dumps(
        {"type": "json_schema", "json_schema": {"name": "color", "schema": COLORS, "strict": True}}))
    (tmp_path / "named.json").write_text(json.dumps({"name": "color", "schema": COLORS}))
    (tmp_path / "ab.lark").write_text('start: "A" | "B" "C"\n')
    (tmp_path / "ud.gbnf").write_text('root ::= "up" | "down"\n')
    lines = [{"id": "n", "prompt": "x", "ignore_eos": True}, chat("c", max_tokens=12),
             completion("p", max_tokens=12), {"id": "own", "prompt": "x", "guided_regex": REGEX},
             {"id": "off", "prompt": "x", "ignore_eos": True, "response_format": {"type": "text"}}]
    for flags, kind, want in [
        (["--choice", "P", "--choice", "Q"], "choice", ["P", "Q"]),
        (["--regex", "[0-9]{2}z"], "regex", "[0-9]{2}z"),
        (["--json-schema", "colors.json"], "json", COLORS),
        (["--json-schema", "wrapped.json"], "json", COLORS),
        (["--json-schema", "named.json"], "json", COLORS),
        (["--grammar", "ab.lark"], "choice", ["A", "BC"]),
        (["--grammar", "ud.gbnf"], "choice", ["up", "down"]),
    ]:
        r, recs = gen(tmp_path, lines, "--max-tokens", "12", *flags)
        assert r.exit_code == ExitCode.OK, (flags, r.stderr)
        for rec in recs[:3]:  # every line, of every format (ignore_eos too: the grammar's end ends the line)
            check(rec, kind, want)
        check(recs[3], "regex", REGEX)  # the line's own constraint wins
        assert recs[4]["finish_reason"] == "length" and recs[4]["usage"]["completion_tokens"] == 12  # turned off


def test_config_keys_set_the_job_default_and_it_is_part_of_the_request_hash(tmp_path):
    line = [{"id": 1, "prompt": "x"}]
    (tmp_path / "flashgen.toml").write_text('[sampling]\nchoice = ["P", "Q"]\n')
    r, recs = gen(tmp_path, line)
    assert r.exit_code == ExitCode.OK, r.stderr
    check(recs[0], "choice", ["P", "Q"])
    (tmp_path / "flashgen.toml").write_text('[sampling]\nchoice = ["R", "S"]\n')
    r, again = gen(tmp_path, line)
    check(again[0], "choice", ["R", "S"])
    assert again[0]["request_hash"] != recs[0]["request_hash"]  # --resume reruns lines made under another default
    out = cli(["generate", "--show-config", "--regex", "[a-z]+"], cwd=tmp_path).stdout
    assert 'regex = "[a-z]+"' in out and 'choice = ["R", "S"]' in out


@pytest.mark.parametrize("files,flags,parts", [
    ({"s.json": "{not json"}, ["--json-schema", "s.json"], ["--json-schema s.json", "not valid JSON"]),
    ({"s.json": '{"type": "objekt"}'}, ["--json-schema", "s.json"], ["--json-schema s.json", "Invalid type: objekt"]),
    ({"s.json": '{"type": "object", "unevaluatedProperties": false}'}, ["--json-schema", "s.json"],
     ["--json-schema s.json", "unevaluatedProperties"]),
    ({"s.json": "[1, 2]"}, ["--json-schema", "s.json"], ["--json-schema s.json", "not a JSON schema"]),
    ({"s.json": json.dumps({"type": "json_schema", "json_schema": {"name": "a b", "schema": COLORS}})},
     ["--json-schema", "s.json"], ["--json-schema s.json", 'field "json_schema.name"']),
    ({}, ["--json-schema", "missing.json"], ["--json-schema missing.json", "does not exist"]),
    ({"g.lark": 'start: "a" ('}, ["--grammar", "g.lark"], ["--grammar g.lark", "the grammar does not parse"]),
    ({}, ["--regex", "[a-"], ["--regex", "unclosed character class"]),
    ({}, ["--choice", ""], ["--choice", "empty string"]),
    ({"s.json": json.dumps(COLORS)}, ["--json-schema", "s.json", "--regex", "a"], ["--json-schema and --regex"]),
])
def test_a_bad_job_default_is_fatal_before_the_model_loads(tmp_path, files, flags, parts):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # no model at that path: an error about the flag proves it was checked before any model load
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "x"}], *flags, model=str(tmp_path / "no-such-model"))
    assert r.exit_code == ExitCode.FATAL, r.stderr
    assert "no-such-model" not in r.stderr and recs == []
    for part in parts:
        assert part in r.stderr, (part, r.stderr)


def test_a_bad_config_default_names_the_key_and_the_file(tmp_path):
    (tmp_path / "flashgen.toml").write_text('[sampling]\njson_schema = "nope.json"\n')
    r, _ = gen(tmp_path, [{"id": 1, "prompt": "x"}], model=tiny_model())
    assert r.exit_code == ExitCode.FATAL
    assert "sampling.json_schema (from ./flashgen.toml) nope.json" in r.stderr and "does not exist" in r.stderr
