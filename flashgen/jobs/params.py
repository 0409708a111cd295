"""Sampling parameters for one line: the job's defaults overridden by the line's own fields."""
from __future__ import annotations

import hashlib
from typing import Any

from flashgen.sampling_params import SamplingParams

# Fields a line may carry to override the job's defaults, with the JSON type each must have.
LINE_FIELDS = {
    "max_tokens": "int|null", "min_tokens": "int", "temperature": "number", "top_p": "number", "top_k": "int",
    "min_p": "number", "seed": "int", "stop": "str|list[str]", "stop_token_ids": "list[int]", "ignore_eos": "bool",
    "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
    "skip_special_tokens": "bool",
}
_WANT = {
    "int": "an integer", "int|null": "an integer (or null for up to the context length)", "number": "a number",
    "bool": "true or false", "str|list[str]": "a string or a list of strings", "list[int]": "a list of integers",
}


class BadLine(Exception):
    """One line cannot run. `field` and `message` go into its error record; the parser adds the line number."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def show(value: Any, limit: int = 60) -> str:
    """A value as it appears in JSON, shortened so one bad line cannot flood the error message."""
    import json

    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "int":
        return _is_int(v)
    if kind == "int|null":
        return v is None or _is_int(v)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str|list[str]":
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    if kind == "list[int]":
        return isinstance(v, list) and all(_is_int(t) for t in v)
    raise AssertionError(kind)


def line_overrides(obj: dict, names: dict[str, str] | None = None, where: str = "") -> dict[str, Any]:
    """The sampling fields present in `obj`, type-checked. `names` maps a field name on the line to the
    SamplingParams name (OpenAI bodies say max_completion_tokens); `where` prefixes field names (e.g. "body.")."""
    names = names or {k: k for k in LINE_FIELDS}
    out = {}
    for field, name in names.items():
        if field not in obj:
            continue
        v = obj[field]
        kind = LINE_FIELDS[name]
        if not _type_ok(kind, v):
            raise BadLine("invalid_field", f'field "{where}{field}" is {show(v)}; use {_WANT[kind]}', where + field)
        out[name] = v
    return out


def line_seed(base: int, key: str) -> int:
    """A per-line seed from the job seed and the line's id: lines differ from each other, yet each line's text
    does not depend on what it was batched with, so an interrupted-then-resumed job samples the same text."""
    digest = hashlib.blake2b(f"{base}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def defaults_from_settings(sampling: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments from the [sampling] settings (TOML has no null: -1 / [] mean none)."""
    d = dict(sampling)
    d["seed"] = None if d["seed"] < 0 else d["seed"]
    d["stop"] = list(d["stop"]) or None
    d["stop_token_ids"] = list(d["stop_token_ids"]) or None
    return d


def make_params(defaults: dict[str, Any], overrides: dict[str, Any], key: str, where: str = "") -> SamplingParams:
    """SamplingParams for one line; a value SamplingParams rejects becomes a BadLine naming the field."""
    kw = {**defaults, **overrides}
    if "seed" not in overrides and defaults.get("seed") is not None:
        kw["seed"] = line_seed(defaults["seed"], key)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        bad = next((k for k in overrides if f" {k}=" in f" {e}"), None)
        if bad is None:  # the combination is wrong (e.g. min_tokens > max_tokens) or a default is
            raise BadLine("invalid_param", f"{e}", None) from None
        raise BadLine("invalid_param", f'field "{where}{bad}": {e}', where + bad) from None
