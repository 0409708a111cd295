"""Sampling parameters for one line: the job's defaults overridden by the line's own fields.

FIELDS is the one table of every sampling field's type and range. A line's fields are checked against it here
(`check_field`), the [sampling] config keys and flags by flashgen.jobs.settings.check_value (through the same
function), and SamplingParams.__post_init__ stays the final authority for the Python API. LOGPROB_FIELDS holds
the fields a line alone may carry (logprobs, prompt_logprobs, logprobs_mode, logit_bias, allowed_token_ids; no
flag or config key sets them), read by `logprob_overrides` through the same check; SAMPLE_FIELDS likewise holds
`n`, the number of samples of a line's prompt, read by `sample_overrides`.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from flashgen.sampling_params import LOGPROBS_MODES, MAX_LOGPROBS, MAX_N, SEED_RANGE, SamplingParams, is_int


@dataclass(frozen=True)
class Field:
    kind: str                      # int | int|null | number | bool | str|list[str] | list[int] | choice
    lo: float | None = None        # smallest allowed value (numbers; the elements of list[int])
    hi: float | None = None        # largest allowed value
    lo_open: bool = False          # lo itself is not allowed
    hi_open: bool = False
    note: str = ""                 # what a special value means, appended to the fix: "(0 is greedy)"
    choices: tuple[str, ...] = ()  # the allowed strings of a choice

    def range_text(self) -> str:
        """The allowed range in words: "a number >= 0", "a number in (0, 1]"."""
        if self.kind == "choice":
            return " or ".join(f'"{c}"' for c in self.choices)
        what = {"int": "an integer", "int|null": "an integer", "number": "a number", "list[int]": "integers"}[self.kind]
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"{what} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        elif self.lo is not None:
            text = f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = what
        return text + (f" {self.note}" if self.note else "")

    def in_range(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))


def _num(v: float) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return "2**64" if v == 2**64 else str(v)


# Every sampling field a line may carry to override the job's defaults. Floats must also be finite.
FIELDS: dict[str, Field] = {
    "max_tokens": Field("int|null", 1, note="(or null for up to the context length)"),
    "min_tokens": Field("int", 0, note="(and <= max_tokens)"),
    "temperature": Field("number", 0, note="(0 is greedy)"),
    "top_p": Field("number", 0, 1, lo_open=True),
    "top_k": Field("int", -1, note="(-1 or 0: all tokens)"),
    "min_p": Field("number", 0, 1),
    "seed": Field("int", SEED_RANGE[0], SEED_RANGE[1], hi_open=True),
    "stop": Field("str|list[str]"),
    "stop_token_ids": Field("list[int]", 0, note="(token ids of this model)"),
    "ignore_eos": Field("bool"),
    "repetition_penalty": Field("number", 0, lo_open=True, note="(1 is off)"),
    "presence_penalty": Field("number", -2, 2),
    "frequency_penalty": Field("number", -2, 2),
    "skip_special_tokens": Field("bool"),
}
_WANT = {
    "int": "an integer", "int|null": "an integer (or null for up to the context length)", "number": "a number",
    "bool": "true or false", "str|list[str]": "a non-empty string or a list of them",
    "list[int]": "a list of integers",
}

# Fields of vLLM / OpenAI requests that flashgen does not implement (yet): refused with `unsupported_field`, never
# silently ignored. Each stays here until the change that implements it lands.
# (The structured-output fields — response_format, structured_outputs, guided_* — are read by
# flashgen.jobs.structured.)
UNSUPPORTED = {
    "tools", "tool_choice", "functions", "function_call", "stream", "stream_options", "echo", "best_of", "suffix",
    "use_beam_search", "length_penalty", "guided_decoding_backend", "guided_whitespace_pattern",
    "structural_tag", "bad_words", "include_stop_str_in_output", "logits_processors",
    "truncate_prompt_tokens", "spaces_between_special_tokens", "reasoning_effort", "modalities", "audio",
    "prediction", "web_search_options", "detokenize", "output_kind",
}
# Fields that change nothing in the output, accepted and ignored: any value of HARMLESS; an unimplemented field at
# the value that means "off" (null, or the one listed in NEUTRAL).
HARMLESS = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier"}
NEUTRAL: dict[str, tuple] = {
    "stream": (False,), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "use_beam_search": (False,),
    "include_stop_str_in_output": (False,),
}


def is_neutral(name: str, value: Any) -> bool:
    """Whether a field that flashgen does not implement has a value that changes nothing (it may be ignored)."""
    if name in HARMLESS:
        return True
    if name not in UNSUPPORTED:
        return False
    return value is None or any(type(value) is type(x) and value == x for x in NEUTRAL.get(name, ()))


# Other names people write for a field flashgen has.
ALIASES = {"max_completion_tokens": "max_tokens", "max_new_tokens": "max_tokens", "stop_sequences": "stop",
           "random_seed": "seed", "eos_token_id": "stop_token_ids"}


class BadLine(Exception):
    """One line cannot run. `field` and `message` go into its error record; the parser adds the line number."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def show(value: Any, limit: int = 60) -> str:
    """A value as it appears in JSON, shortened so one bad line cannot flood the error message (lone surrogates
    are shown escaped, so the message itself is always valid UTF-8)."""
    import json

    if isinstance(value, bytes):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(value)
        except (ValueError, TypeError, RecursionError):  # a huge int, an unserializable object
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "int":
        return is_int(v)
    if kind == "int|null":
        return v is None or is_int(v)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str|list[str]":
        return (isinstance(v, str) and v != "") or (
            isinstance(v, list) and all(isinstance(s, str) and s != "" for s in v))
    if kind == "list[int]":
        return isinstance(v, list) and all(is_int(t) for t in v)
    if kind == "choice":
        return isinstance(v, str)
    raise AssertionError(kind)


class FieldError(ValueError):
    """A value outside its field's type (`code` invalid_field) or range (invalid_param); `fix` says what to use."""

    def __init__(self, code: str, fix: str, detail: str = ""):
        super().__init__(fix)
        self.code, self.fix, self.detail = code, fix, detail


def check_field(name: str, v: Any, spec: Field | None = None) -> Any:
    """`v` checked against FIELDS[name] (type, finite, range) and normalized (numbers -> float), or FieldError.
    The one check of a sampling value, for lines, flags and config alike."""
    spec = spec or FIELDS[name]
    if not _type_ok(spec.kind, v):
        raise FieldError("invalid_field", f"use {spec.range_text() if spec.kind == 'choice' else _WANT[spec.kind]}")
    if spec.kind == "choice":
        if v not in spec.choices:
            raise FieldError("invalid_param", f"use {spec.range_text()}")
        return v
    if spec.kind == "number":
        try:
            v = float(v)
        except OverflowError:
            v = math.inf  # a huge integer: not representable, like inf
        if not math.isfinite(v):
            raise FieldError("invalid_param", f"use a finite {spec.range_text()[2:]}")
    values = v if spec.kind == "list[int]" else [v] if spec.kind in ("int", "int|null", "number") else []
    for i, x in enumerate(values):
        if x is not None and not spec.in_range(x):
            at = f" (at index {i})" if spec.kind == "list[int]" else ""
            raise FieldError("invalid_param", f"use {spec.range_text()}", at)
    return v


def line_overrides(obj: dict, names: dict[str, str] | None = None, where: str = "",
                   fields: dict[str, str] | None = None, table: dict[str, Field] | None = None) -> dict[str, Any]:
    """The sampling fields present in `obj`, type- and range-checked. `names` maps a field name on the line to the
    SamplingParams name (OpenAI bodies say max_completion_tokens); `where` prefixes field names (e.g. "body.").
    `fields`, when given, collects SamplingParams name -> the field name the line used, for later messages.
    `table`: the specs to check against (FIELDS unless given)."""
    table = FIELDS if table is None else table
    names = names or {k: k for k in table}
    out = {}
    for field, name in names.items():
        if field not in obj:
            continue
        v = obj[field]
        try:
            out[name] = check_field(name, v, table[name])
        except FieldError as e:
            raise BadLine(e.code, f'field "{where}{field}" is {show(v)}{e.detail}; {e.fix}', where + field) from None
        if fields is not None:
            fields[name] = where + field
    return out


# Logprobs and the fields that shape the logits: read by `logprob_overrides`, per line only (they are no [sampling]
# key or flag, so they stay out of FIELDS and out of the job fingerprint). The OpenAI bodies say logprobs their own
# ways: chat {"logprobs": true, "top_logprobs": k}, completions {"logprobs": k}; native lines {"logprobs": k}.
LOGPROB_FIELDS: dict[str, Field] = {
    "logprobs": Field("int", 0, MAX_LOGPROBS),
    "top_logprobs": Field("int", 0, MAX_LOGPROBS),
    "prompt_logprobs": Field("int", 0, MAX_LOGPROBS),
    "logprobs_mode": Field("choice", choices=LOGPROBS_MODES),
    "logit_bias": Field("number", -100, 100),  # each bias; the keys are token ids
    "allowed_token_ids": Field("list[int]", 0, note="(token ids of this model)"),
}
# The line fields each kind of request reads (chat: "logprobs" is true / false and "top_logprobs" the k).
LOGPROB_LINE_FIELDS = ("logprobs", "prompt_logprobs", "logprobs_mode", "logit_bias", "allowed_token_ids")
CHAT_LOGPROB_FIELDS = (*LOGPROB_LINE_FIELDS, "top_logprobs")
_TOKEN_KEY = re.compile(r"[0-9]{1,18}")


def logprob_overrides(obj: dict, api: str | None = None, where: str = "",
                      fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The logprob and logit-shaping fields of a native line (`api` None) or of an OpenAI body (`api` "chat" or
    "completions"), type- and range-checked, as SamplingParams keyword arguments (null is the same as leaving a
    field out). Token ids are checked against the vocabulary later (LineParser.check_token_ids); `fields`
    collects SamplingParams name -> the field the line used, for those messages."""
    fields = {} if fields is None else fields
    out: dict[str, Any] = {}

    def bad(code: str, field: str, text: str) -> BadLine:
        return BadLine(code, f'field "{where}{field}" is {show(obj[field])}{text}', where + field)

    def read(field: str) -> Any:
        try:
            return check_field(field, obj[field], LOGPROB_FIELDS[field])
        except FieldError as e:
            raise bad(e.code, field, f"{e.detail}; {e.fix}") from None

    def put(name: str, field: str, value: Any) -> None:
        out[name], fields[name] = value, where + field

    lp, top = obj.get("logprobs"), obj.get("top_logprobs")
    per_token = ("the number of most likely tokens given with each token's logprob (0: the chosen token's alone)"
                 f", an integer in [0, {MAX_LOGPROBS}]")
    if api == "chat":
        if lp is not None and not isinstance(lp, bool):
            raise bad("invalid_field", "logprobs", '; use true or false (a chat request gives the number of most '
                      'likely tokens in "top_logprobs")')
        k = None if top is None else read("top_logprobs")
        if lp:
            put("logprobs", "top_logprobs" if k is not None else "logprobs", k or 0)
        elif k:  # as OpenAI and vLLM: top_logprobs needs logprobs (0 asks for nothing, and is let be)
            raise bad("invalid_param", "top_logprobs", f', but "{where}logprobs" is {show(lp)}; set "logprobs": '
                      "true to get logprobs (top_logprobs is how many of the most likely tokens come with each)")
    else:
        if top is not None:
            what = '"/v1/completions" requests' if api else "a plain line"
            use = f'"logprobs": {show(top)}' if is_int(top) else '"logprobs": K'
            raise bad("unknown_field", "top_logprobs", f', not a field of {what}; use {use} (here "logprobs" is '
                      f"{per_token}; top_logprobs is the chat form)")
        if lp is True:
            raise bad("invalid_field", "logprobs", f'; use {per_token}, or null (true / false is the chat form)')
        if lp is not None and lp is not False:  # false: off, as null
            put("logprobs", "logprobs", read("logprobs"))
    if obj.get("prompt_logprobs") is not None:
        put("prompt_logprobs", "prompt_logprobs", read("prompt_logprobs"))
    if obj.get("logprobs_mode") is not None:
        put("logprobs_mode", "logprobs_mode", read("logprobs_mode"))
    if obj.get("logit_bias") is not None:
        bias = _logit_bias(obj["logit_bias"], where + "logit_bias")
        if bias:  # {} biases nothing
            put("logit_bias", "logit_bias", bias)
    if obj.get("allowed_token_ids") is not None:
        ids = read("allowed_token_ids")
        if not ids:
            raise bad("invalid_param", "allowed_token_ids", "; use a non-empty list of token ids (or leave the "
                      "field out: any token may be generated)")
        put("allowed_token_ids", "allowed_token_ids", [int(t) for t in ids])
    return out


# The number of samples of a line's prompt (OpenAI's and vLLM's `n`): per line only, like LOGPROB_FIELDS (no
# [sampling] key or flag, so it stays out of FIELDS and out of the job fingerprint).
SAMPLE_FIELDS: dict[str, Field] = {"n": Field("int", 1, MAX_N, note="(the number of samples)")}


def sample_overrides(obj: dict, where: str = "", fields: dict[str, str] | None = None) -> dict[str, Any]:
    """{"n": k} when the line (or OpenAI body) has `n`, type- and range-checked (null is the same as leaving it
    out: one sample); `fields` collects "n" -> the field the line used."""
    return line_overrides({k: v for k, v in obj.items() if k in SAMPLE_FIELDS and v is not None},
                          {k: k for k in SAMPLE_FIELDS}, where, fields, SAMPLE_FIELDS)


def _logit_bias(v: Any, path: str) -> dict[int, float]:
    """OpenAI's logit_bias: {token id: bias in [-100, 100]}; JSON object keys are strings ("50256": -100)."""
    if not isinstance(v, dict):
        raise BadLine("invalid_field", f'field "{path}" is {show(v)}; use an object of token id -> bias in '
                      '[-100, 100], e.g. {"50256": -100}', path)
    out: dict[int, float] = {}
    for key, b in v.items():
        if is_int(key) and key >= 0:
            tid: int | None = int(key)
        elif isinstance(key, str) and _TOKEN_KEY.fullmatch(key):
            tid = int(key)
        else:
            tid = None
        if tid is None:
            raise BadLine("invalid_field", f'field "{path}" has the key {show(key)}, not a token id; the keys are '
                          'token ids (integers >= 0, written as strings in JSON), e.g. {"50256": -100}', path)
        if tid in out:
            raise BadLine("invalid_field", f'field "{path}" has token {tid} twice (the key {show(key)}); give '
                          "each token one bias", path)
        spec = LOGPROB_FIELDS["logit_bias"]
        try:
            out[tid] = check_field("logit_bias", b, spec)
        except FieldError as e:
            raise BadLine(e.code, f'field "{path}" has {show(b)} for the token {show(key)}; use a finite '
                          f"{spec.range_text()[2:]}", path) from None
    return out


def near_miss(name: str, known) -> str | None:
    """The known field `name` is probably a misspelling of, or None."""
    if name in ALIASES:
        return ALIASES[name]
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.8)
    return close[0] if close else None


def line_seed(base: int, key: str) -> int:
    """A per-line seed from the job seed and the line's id: lines differ from each other, yet each line's text
    does not depend on what it was batched with, so an interrupted-then-resumed job samples the same text."""
    digest = hashlib.blake2b(f"{base}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def defaults_from_settings(sampling: dict[str, Any], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """SamplingParams keyword arguments from the [sampling] settings (TOML has no null: -1 / [] / "" mean none).
    The json_schema / regex / choice / grammar settings become `structured_outputs` (only when one is set), read
    and checked here, before the model loads: FatalError naming the flag or key (`sources`: where each came from)."""
    from flashgen.jobs.structured import DEFAULT_KEYS, job_default

    d = dict(sampling)
    structured = job_default(d, sources)
    for k in DEFAULT_KEYS:
        d.pop(k, None)
    if structured is not None:
        d["structured_outputs"] = structured
    d["seed"] = None if d["seed"] < 0 else d["seed"]
    d["stop"] = list(d["stop"]) or None
    d["stop_token_ids"] = list(d["stop_token_ids"]) or None
    return d


def make_params(defaults: dict[str, Any], overrides: dict[str, Any], key: str, where: str = "",
                fields: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams for one line; a value SamplingParams rejects becomes a BadLine naming the field the line
    has (`fields`: SamplingParams name -> the line's field name, e.g. body.max_completion_tokens)."""
    kw = {**defaults, **overrides}
    if "seed" not in overrides and defaults.get("seed") is not None:
        kw["seed"] = line_seed(defaults["seed"], key)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        bad = next((k for k in overrides if f" {k}=" in f" {e}"), None)
        if bad is None:  # the combination is wrong (e.g. min_tokens > max_tokens) or a default is
            raise BadLine("invalid_param", f"{e}", None) from None
        name = (fields or {}).get(bad, where + bad)
        raise BadLine("invalid_param", f'field "{name}" is {show(overrides[bad])}: {e}', name) from None
