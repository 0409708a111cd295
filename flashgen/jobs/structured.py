"""Structured outputs on input lines and as job defaults: the request fields that constrain a line's output to a
JSON schema, a regular expression, a list of choices or a grammar, read into one StructuredOutputsParams.

A line may say it in any of the ways OpenAI and vLLM requests do (one way per line):

- ``response_format``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``,
  ``{"type": "json_object"}``, or ``{"type": "text"}`` (no constraint: it turns a job default off for the line);
- ``structured_outputs`` (vLLM; ``guided_decoding`` is its older name): an object with exactly one of ``json``,
  ``regex``, ``choice``, ``grammar`` or ``json_object: true``;
- ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (vLLM's older fields).

null is the same as leaving a field out. Every problem is a BadLine naming the exact field the line wrote
(``body.response_format.json_schema.schema``, say) and what is wrong: ``invalid_field`` for a wrong type or shape
(including two ways on one line), ``unknown_field`` for an unknown key inside these objects,
``unsupported_field`` for a vLLM option flashgen does not implement, ``invalid_grammar`` for a schema, regex or
grammar that cannot be enforced (llguidance's own words, through flashgen.engine.grammar.grammar_problem).
Nothing is added to the prompt: the grammar alone constrains the output.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from flashgen.jobs.errors import FatalError
from flashgen.jobs.params import BadLine, show
from flashgen.sampling_params import StructuredOutputsParams

# vLLM's older per-kind fields and the kind each one sets.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
SO_FIELDS = ("structured_outputs", "guided_decoding")  # guided_decoding: vLLM's older name of structured_outputs
FIELD_NAMES = ("response_format", *SO_FIELDS, *GUIDED)  # every line field read here
SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's other structured_outputs keys: refused unless null / false (the value that changes nothing).
SO_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
              "structural_tag")
RESPONSE_FORMAT_TYPES = ("json_schema", "json_object", "text")
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_USE = {
    "json": "use a JSON schema (an object, or its JSON text)",
    "regex": "use a non-empty regular expression (a string)",
    "choice": "use a non-empty list of non-empty strings",
    "grammar": "use a non-empty Lark or GBNF grammar (a string)",
}
_RESPONSE_FORMAT_USE = ('use {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}, '
                        '{"type": "json_object"} or {"type": "text"}')


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _hint(name: str, known) -> str | None:
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.75)
    return close[0] if close else None


def _only(v: dict, keys: tuple[str, ...], path: str, what: str) -> None:
    """Refuse a key of `v` that is not in `keys`, naming it (nothing is silently ignored)."""
    for k, x in v.items():
        if k not in keys:
            at, hint = _at(path, k), _hint(k, keys)
            raise BadLine("unknown_field", f'field "{at}" is {show(x)}, not a key flashgen reads; '
                          + (f'did you mean "{hint}"?' if hint else what), at)


def line_structured(obj: dict, where: str = "") -> tuple[str | None, StructuredOutputsParams | None]:
    """(the field the line constrains its output with, the constraint) from a line object's structured-output
    fields (`where` prefixes the field names: "body." on OpenAI batch lines). (None, None): the line says nothing,
    the job default applies; (field, None): the line turns the constraint off (response_format {"type": "text"})."""
    given = [k for k in FIELD_NAMES if obj.get(k) is not None]
    if not given:
        return None, None
    if len(given) > 1:
        a, b = where + given[0], where + given[1]
        raise BadLine("invalid_field", f'field "{b}" is {show(obj[given[1]])}, but field "{a}" constrains the '
                      "output too; keep one of them", b)
    name = given[0]
    path, v = where + name, obj[name]
    if name == "response_format":
        return path, response_format(v, path)
    if name in SO_FIELDS:
        return path, _structured_outputs(v, path)
    return path, _kind(GUIDED[name], v, path)


def structured_overrides(obj: dict, where: str = "", fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The line's structured-output override for make_params: {} (none, the job default applies) or
    {"structured_outputs": StructuredOutputsParams or None}; `fields` gets the field the line used."""
    path, so = line_structured(obj, where)
    if path is None:
        return {}
    if fields is not None:
        fields["structured_outputs"] = path
    return {"structured_outputs": so}


def response_format(v: Any, path: str) -> StructuredOutputsParams | None:
    """OpenAI's response_format object (None: {"type": "text"}, no constraint)."""
    if not isinstance(v, dict):
        raise BadLine("invalid_field", f'field "{path}" is {show(v)}; {_RESPONSE_FORMAT_USE}', path)
    kind = v.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        at = _at(path, "type")
        what = "missing" if "type" not in v else show(kind)
        extra = "; flashgen does not implement structural tags" if kind == "structural_tag" else ""
        raise BadLine("unsupported_field" if kind == "structural_tag" else "invalid_field",
                      f'field "{at}" is {what}{extra}; use "json_schema", "json_object" or "text"', at)
    keys = ("type", "json_schema") if kind == "json_schema" else ("type",)
    _only(v, keys, path, f'a response_format of type "{kind}" has only ' + " and ".join(f'"{k}"' for k in keys))
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return json_schema_object(v.get("json_schema"), _at(path, "json_schema"))


def json_schema_object(js: Any, path: str) -> StructuredOutputsParams:
    """OpenAI's json_schema object {"name", "schema", "strict", "description"}: the schema is enforced (always
    strictly, whatever "strict" says)."""
    if js is None:
        raise BadLine("invalid_field", f'field "{path}" is missing; a response_format of type "json_schema" needs '
                      '"json_schema": {"name": "...", "schema": {...}}', path)
    if not isinstance(js, dict):
        raise BadLine("invalid_field", f'field "{path}" is {show(js)}; use {{"name": "...", "schema": {{...}}}}',
                      path)
    _only(js, JSON_SCHEMA_KEYS, path, "json_schema has " + ", ".join(f'"{k}"' for k in JSON_SCHEMA_KEYS))
    name = js.get("name")
    at = _at(path, "name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        what = "missing" if "name" not in js else show(name)
        raise BadLine("invalid_field", f'field "{at}" is {what}; use a name of 1 to 64 letters, digits, "_" or "-" '
                      "(OpenAI requires one)", at)
    for key, ok, want in (("strict", lambda x: isinstance(x, bool), "true, false or null"),
                          ("description", lambda x: isinstance(x, str), "a string")):
        if js.get(key) is not None and not ok(js[key]):
            raise BadLine("invalid_field", f'field "{_at(path, key)}" is {show(js[key])}; use {want}',
                          _at(path, key))
    at = _at(path, "schema")
    if js.get("schema") is None:
        raise BadLine("invalid_field", f'field "{at}" is missing; give the JSON schema the output must match', at)
    if not isinstance(js["schema"], dict):
        raise BadLine("invalid_field", f'field "{at}" is {show(js["schema"])}; use a JSON schema (an object)', at)
    return _kind("json", js["schema"], at)


def _structured_outputs(v: Any, path: str) -> StructuredOutputsParams:
    """vLLM's structured_outputs object: exactly one of json, regex, choice, grammar, json_object."""
    one_of = ", ".join(f'"{k}"' for k in SO_KINDS)
    if not isinstance(v, dict):
        raise BadLine("invalid_field", f'field "{path}" is {show(v)}; use an object with one of {one_of}', path)
    for k, x in v.items():
        at = _at(path, k)
        if k in SO_KINDS:
            continue
        if k in SO_OPTIONS:
            if x is None or x is False:
                continue
            raise BadLine("unsupported_field", f'field "{at}" is {show(x)}; flashgen does not implement "{k}" '
                          "(yet): remove it", at)
        hint = _hint(k, SO_KINDS + SO_OPTIONS)
        raise BadLine("unknown_field", f'field "{at}" is {show(x)}, not a key of "{path}"; '
                      + (f'did you mean "{hint}"?' if hint else f"use one of {one_of}"), at)
    jo = v.get("json_object")
    if jo is not None and not isinstance(jo, bool):
        at = _at(path, "json_object")
        raise BadLine("invalid_field", f'field "{at}" is {show(jo)}; use true (any JSON object)', at)
    given = [k for k in SO_KINDS if v.get(k) is not None and v.get(k) is not False]
    if not given:
        raise BadLine("invalid_field", f'field "{path}" is {show(v)}; set exactly one of {one_of}', path)
    if len(given) > 1:
        a, b = _at(path, given[0]), _at(path, given[1])
        raise BadLine("invalid_field", f'field "{b}" is {show(v[given[1]])}, but field "{a}" constrains the output '
                      "too; keep one of them", b)
    kind = given[0]
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return _kind(kind, v[kind], _at(path, kind))


def _kind(kind: str, v: Any, path: str) -> StructuredOutputsParams:
    """A constraint of one kind (json / regex / choice / grammar), its shape and its grammar checked."""
    if kind == "json":
        if isinstance(v, str):  # vLLM takes the schema's JSON text too
            try:
                v = json.loads(v)
            except ValueError as e:
                msg = getattr(e, "msg", str(e))
                raise BadLine("invalid_grammar", f'field "{path}" is {show(v)}: the JSON schema is not valid JSON '
                              f"({msg}); use a JSON schema (an object, or its JSON text)", path) from None
        if not isinstance(v, dict):
            raise BadLine("invalid_field", f'field "{path}" is {show(v)}; {_USE["json"]}', path)
        so = StructuredOutputsParams(json=v if v else "{}")  # {} (any JSON value) as text: the dict form is falsy
    elif kind == "choice":
        if not isinstance(v, list) or not v:
            raise BadLine("invalid_field", f'field "{path}" is {show(v)}; {_USE["choice"]}', path)
        for i, c in enumerate(v):
            if not isinstance(c, str) or not c:
                raise BadLine("invalid_field", f'field "{path}" has {show(c)} at index {i}; {_USE["choice"]}', path)
        so = StructuredOutputsParams(choice=list(v))
    else:
        if not isinstance(v, str) or not v.strip():
            raise BadLine("invalid_field", f'field "{path}" is {show(v)}; {_USE[kind]}', path)
        so = StructuredOutputsParams(regex=v) if kind == "regex" else StructuredOutputsParams(grammar=v)
    problem = problem_of(so)
    if problem:
        raise BadLine("invalid_grammar", f'field "{path}" is {show(v)}: {problem}', path)
    return so


_LEAD = {"json": "not a JSON schema flashgen can enforce", "json_object": "not a JSON schema flashgen can enforce",
         "regex": "the regular expression does not compile", "choice": "the choices cannot be compiled",
         "grammar": "the grammar does not parse"}


def problem_of(so: StructuredOutputsParams) -> str | None:
    """What is wrong with a constraint's grammar, in words for a message; None when it can be enforced. Cheap on a
    constraint seen before (flashgen.engine.grammar caches it by content)."""
    from flashgen.engine.grammar import grammar_problem

    try:
        problem = grammar_problem(so)
    except Exception as e:  # llguidance refusing in a way of its own: this line's error, never the job's
        problem = str(e) or type(e).__name__
    if not problem:
        return None
    problem = re.sub(r"^at \d+\(\d+\): ", "", problem)  # a position in the grammar made from a regex: not the user's
    problem = problem.removeprefix("the grammar does not parse: ")
    reason = re.search(r"regex parse error: .*?error: (.+)$", problem)
    if reason:  # llguidance quotes the regex and an excerpt of the grammar it made: keep the reason
        problem = reason.group(1) if so.kind == "regex" else f"a regular expression does not compile: {reason.group(1)}"
    if "Unimplemented keys" in problem:
        problem += " (flashgen does not implement these JSON Schema keywords: remove them)"
    return f"{_LEAD[so.kind]}: {problem}"


# ---- job defaults ------------------------------------------------------------------------------------------------
# The [sampling] keys (and flags) that constrain every line's output; at most one may be set.
DEFAULT_KEYS = ("json_schema", "regex", "choice", "grammar")
_FLAG = {k: "--" + k.replace("_", "-") for k in DEFAULT_KEYS}


def job_default(sampling: dict[str, Any], sources: dict[str, str] | None = None) -> StructuredOutputsParams | None:
    """The job-wide constraint from the [sampling] json_schema / regex / choice / grammar settings (a flag or the
    config), read and validated now, before the model loads; FatalError naming the flag or key and the file."""
    set_keys = [k for k in DEFAULT_KEYS if sampling.get(k)]
    if not set_keys:
        return None

    def name(key: str) -> str:
        where = (sources or {}).get(f"sampling.{key}", "flag")
        return _FLAG[key] if where == "flag" else f"sampling.{key} (from {where})"

    if len(set_keys) > 1:
        raise FatalError(f"{name(set_keys[0])} and {name(set_keys[1])} both constrain every line's output; use one "
                         "(a line's own response_format / structured_outputs / guided_* fields override it)")
    key = set_keys[0]
    value = sampling[key]
    if key == "json_schema":
        label = f"{name(key)} {value}"
        so = _schema_file(value, label)
    elif key == "grammar":
        label = f"{name(key)} {value}"
        so = StructuredOutputsParams(grammar=_read_text(value, label, "a Lark or GBNF grammar"))
    elif key == "regex":
        label = f"{name(key)} {json.dumps(value, ensure_ascii=False)}"
        so = StructuredOutputsParams(regex=value)
    else:
        label = name(key)
        bad = next((c for c in value if not c), None)
        if bad is not None:
            raise FatalError(f'{label}: a choice is an empty string ""; give each choice as non-empty text')
        so = StructuredOutputsParams(choice=list(value))
    problem = problem_of(so)
    if problem:
        raise FatalError(f"{label}: {problem}")
    return so


def _read_text(path: str, label: str, what: str) -> str:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise FatalError(f"{label}: the file does not exist; give a file holding {what}") from None
    except IsADirectoryError:
        raise FatalError(f"{label}: is a directory; give a file holding {what}") from None
    except OSError as e:
        raise FatalError(f"{label}: cannot read the file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FatalError(f"{label}: the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                         "save it as UTF-8") from None
    if not text.strip():
        raise FatalError(f"{label}: the file is empty; it must hold {what}")
    return text


def _schema_file(path: str, label: str) -> StructuredOutputsParams:
    """A file holding a JSON schema; or OpenAI's response_format {"type": "json_schema", "json_schema": {...}} or
    its json_schema object {"name", "schema", ...}, when the shape is unmistakable."""
    text = _read_text(path, label, "a JSON schema")
    try:
        obj = json.loads(text)
    except ValueError as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise FatalError(f"{label}: not valid JSON ({getattr(e, 'msg', e)}{where}); the file must hold a JSON "
                         "schema") from None
    if not isinstance(obj, dict):
        raise FatalError(f"{label}: holds {show(obj)}, not a JSON schema (an object)")
    try:
        if obj.get("type") == "json_schema" and isinstance(obj.get("json_schema"), dict):
            so = response_format(obj, "")  # the whole response_format object
            assert so is not None, 'a response_format of type "json_schema" constrains'
            return so
        if (set(obj) <= set(JSON_SCHEMA_KEYS) and {"name", "schema"} <= set(obj) and isinstance(obj["schema"], dict)
                and isinstance(obj["name"], str)):
            return json_schema_object(obj, "")  # OpenAI's json_schema object
    except BadLine as b:
        raise FatalError(f"{label}: {b.message}") from None
    return StructuredOutputsParams(json=obj if obj else "{}")  # a bare schema (job_default checks it)
