"""The error a model file that cannot be used raises (no torch import, so the tokenizer can raise it too)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message reads `{file}: {what is wrong}; {how to fix it}`."""


class ModelFileMissing(ModelLoadError, FileNotFoundError):
    """A file the model needs is not there (still a FileNotFoundError for callers that test for one)."""


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words: for 'holds a JSON list, not an object'."""
    if isinstance(value, bool) or value is None:
        return "true/false" if value is not None else "null"
    return {list: "list", str: "string", int: "number", float: "number", dict: "object"}.get(type(value), "value")


def read_json(path: str | Path, fix: str) -> Any:
    """One JSON file of a checkpoint, parsed; a ModelLoadError naming the file when it cannot be."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e}); check the file's permissions") from None


def read_json_object(path: str | Path, fix: str, what: str) -> dict:
    """read_json for a file that must hold an object (`what` it holds, for the message)."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: holds a JSON {json_kind(value)}, not an object of {what}; {fix}")
    return value
