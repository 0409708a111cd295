"""Input lines -> engine requests or error records.

Parsing is two-phase so --resume and duplicate detection can skip a line on its id alone, before paying for
its tokenization: `head()` decodes the JSON and finds the id; `build()` validates the rest and tokenizes.
The format is detected per line: OpenAI batch (custom_id/body), "messages", "prompt_token_ids", "prompt";
--template / --field take the prompt from other fields. Every problem becomes a LineError whose message names
the line number, the field, its value and the fix; the job goes on.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from flashgen.jobs import openai_batch
from flashgen.jobs.params import BadLine, line_overrides, make_params, show
from flashgen.jobs.templates import render


@dataclass
class LineError:
    lineno: int
    id: Any
    key: str
    batch: bool               # an OpenAI batch line: its error record has the batch output shape
    code: str
    message: str
    field: str | None = None


@dataclass
class LineRequest:
    lineno: int
    id: Any
    key: str
    kind: str | None          # None: a plain line; else the OpenAI object ("chat.completion" / "text_completion")
    prompt_ids: list[int] | None
    params: Any               # SamplingParams


@dataclass
class Line:
    lineno: int
    id: Any
    key: str
    batch: bool
    obj: dict | None
    error: LineError | None = None
    own_id: bool = True       # False: the id is a stand-in (the line number), which must not claim a user's id


def key_of(id_value: Any) -> str:
    """The identity of an id: JSON text, so 1 and "1" are different ids, as they are in the JSON."""
    return json.dumps(id_value, ensure_ascii=False)


def read_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for each non-blank line, read lazily: memory stays flat on any size."""
    for lineno, raw in enumerate(stream, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # editors on Windows add one; it is not part of the JSON
        if raw.strip():
            yield lineno, raw


class LineParser:
    def __init__(self, tokenizer, max_model_len: int, defaults: dict[str, Any], *, template=None,
                 template_name: str = "", field: str = "", chat: bool = False):
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size
        self.defaults = defaults
        self.template, self.template_name = template, template_name
        self.field, self.chat = field, chat

    # ---- phase 1: the id -------------------------------------------------------------------------------------
    def head(self, lineno: int, raw: bytes) -> Line:
        def fail(code: str, message: str, obj=None, field=None, batch=None) -> Line:
            id_value, guessed, own = _guess_id(obj, lineno)
            batch = guessed if batch is None else batch
            err = LineError(lineno, id_value, key_of(id_value), batch, code, f"line {lineno}: {message}", field)
            return Line(lineno, id_value, err.key, batch, None, err, own)

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            obj = _loads_or_none(raw.decode("utf-8", "replace"))  # still find the id, so the record carries it
            return fail("invalid_utf8", f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} is not valid UTF-8; "
                        "save the input file as UTF-8", obj)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return fail("invalid_json", f"not valid JSON ({e.msg} at column {e.colno}): {show(text.strip())}; "
                        "each line must be one JSON object")
        if not isinstance(obj, dict):
            return fail("not_an_object", f"{show(obj)} is not a JSON object; each line must be an object such as "
                        '{"id": 1, "prompt": "..."}')
        batch = openai_batch.is_batch_line(obj)
        name = "custom_id" if batch else "id"
        id_value = obj.get(name)
        if id_value is None and not batch:
            id_value = lineno  # a line without an id is known by its line number
        if isinstance(id_value, bool) or not isinstance(id_value, (str, int)) or id_value == "":
            return fail("invalid_id", f'field "{name}" is {show(id_value)}; use a non-empty string'
                        f"{'' if batch else ' or an integer (or leave it out: the line number is used)'}",
                        None, name, batch)
        return Line(lineno, id_value, key_of(id_value), batch, obj)

    # ---- phase 2: the request --------------------------------------------------------------------------------
    def build(self, line: Line) -> LineRequest | LineError:
        if line.error:
            return line.error
        try:
            if line.batch:
                kind, ids, overrides = openai_batch.parse(line.obj, self)
                params = make_params(self.defaults, overrides, line.key, "body.")
            else:
                kind = None
                params = make_params(self.defaults, line_overrides(line.obj), line.key)
                ids = self._plain_ids(line.obj)
        except BadLine as b:
            return self.error(line, b.code, b.message, b.field)
        return LineRequest(line.lineno, line.id, line.key, kind, ids, params)

    def error(self, line: Line | LineRequest, code: str, message: str, field: str | None = None) -> LineError:
        batch = getattr(line, "batch", None)
        if batch is None:
            batch = line.kind is not None
        return LineError(line.lineno, line.id, line.key, batch, code, f"line {line.lineno}: {message}", field)

    def _plain_ids(self, obj: dict) -> list[int]:
        if self.template is not None:
            return self.text_ids(render(self.template, self.template_name, obj), f"(template {self.template_name})")
        if self.field:
            if self.field not in obj:
                raise BadLine("missing_prompt", f'field "{self.field}" (named by --field) is missing; add it '
                              "to the line", self.field)
            return self._text_field(obj, self.field)
        if "messages" in obj:
            return self.chat_ids(obj["messages"], "messages")
        if "prompt_token_ids" in obj:
            return self.token_ids(obj["prompt_token_ids"], "prompt_token_ids")
        if "prompt" in obj:
            return self._text_field(obj, "prompt")
        raise BadLine("missing_prompt", 'no prompt: give "prompt" text, "messages", or "prompt_token_ids" '
                      "(or use --field / --template to build the prompt from other fields)", "prompt")

    def _text_field(self, obj: dict, field: str) -> list[int]:
        v = obj[field]
        if not isinstance(v, str):
            hint = ' (token ids go in "prompt_token_ids")' if isinstance(v, list) else ""
            raise BadLine("invalid_field", f'field "{field}" is {show(v)}; use a string{hint}', field)
        return self.text_ids(v, field)

    def text_ids(self, text: str, field: str, chat: bool | None = None) -> list[int]:
        if not text:
            raise BadLine("empty_prompt", f'field "{field}" is an empty string ""; give the prompt text', field)
        if self.chat if chat is None else chat:
            return self.chat_ids([{"role": "user", "content": text}], field)
        return self._check_len(self.tok.encode(text, add_special_tokens=True), field)

    def chat_ids(self, messages: Any, field: str) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadLine("empty_prompt" if messages == [] else "invalid_field",
                          f'field "{field}" is {show(messages)}; use a non-empty list of '
                          '{"role": ..., "content": ...} objects', field)
        msgs = [self._message(m, f"{field}[{i}]") for i, m in enumerate(messages)]
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
        except ValueError as e:
            raise BadLine("no_chat_template", f'field "{field}": {e}; give "prompt" text instead, or use a model '
                          "with a chat template", field) from None
        except Exception as e:  # the model's own template raised (e.g. it insists on alternating roles)
            raise BadLine("chat_template_error", f'field "{field}": the chat template failed: {e}', field) from None
        return self._check_len(self.tok.encode(text, add_special_tokens=False), field)

    @staticmethod
    def _message(m: Any, where: str) -> dict:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadLine("invalid_field", f'field "{where}" is {show(m)}; use {{"role": "user", "content": "..."}}',
                          where)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise BadLine("invalid_field", f'field "{where}.content" is {show(content)}; only text parts '
                              '{"type": "text", "text": "..."} are supported', f"{where}.content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadLine("invalid_field", f'field "{where}.content" is {show(content)}; use a string',
                          f"{where}.content")
        return {**m, "content": content}

    def token_ids(self, ids: Any, field: str) -> list[int]:
        if not isinstance(ids, list) or not ids:
            code = "empty_prompt" if ids == [] else "invalid_field"
            raise BadLine(code, f'field "{field}" is {show(ids)}; use a non-empty list of token ids', field)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise BadLine("invalid_token_id", f'field "{field}" has {show(t)} at index {i}, not a token id of '
                              f"this model (integers 0..{self.vocab_size - 1}); use ids from the model's tokenizer",
                              field)
        return self._check_len(list(ids), field)

    def _check_len(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise BadLine("empty_prompt", f'field "{field}" tokenizes to no tokens; give the prompt text', field)
        if len(ids) >= self.max_model_len:
            raise BadLine(
                "prompt_too_long",
                f'field "{field}" is {len(ids)} tokens, but the model context (max_model_len) is '
                f"{self.max_model_len} tokens, prompt and output together; shorten the prompt or raise "
                "--max-model-len if the model allows it", field,
            )
        return ids


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _guess_id(obj: Any, lineno: int) -> tuple[Any, bool, bool]:
    """(id, is a batch line, the id is the line's own) for the error record of a line that could not be read in
    full: its own id when recognizable, else its line number."""
    if not isinstance(obj, dict):
        return lineno, False, False
    batch = openai_batch.is_batch_line(obj)
    v = obj.get("custom_id" if batch else "id")
    ok = isinstance(v, (str, int)) and not isinstance(v, bool) and v != ""
    return (v if ok else lineno), batch, ok
