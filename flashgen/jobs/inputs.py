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
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from flashgen.jobs import openai_batch
from flashgen.jobs.errors import FatalError
from flashgen.jobs.fingerprint import request_hash
from flashgen.jobs.params import (
    CHAT_LOGPROB_FIELDS,
    FIELDS,
    SAMPLE_FIELDS,
    UNSUPPORTED,
    BadLine,
    is_neutral,
    line_overrides,
    logprob_overrides,
    make_params,
    near_miss,
    sample_overrides,
    show,
)
from flashgen.jobs.structured import FIELD_NAMES as STRUCTURED_FIELDS
from flashgen.jobs.structured import structured_overrides
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
    # int32 ids (a PendingIds until encode_pending): an array holds no int object a token, pickles as one block of
    # bytes to and from a preparation worker, and gives the collector nothing to walk while the line waits
    prompt_ids: Sequence[int] | None
    params: Any               # SamplingParams
    request_hash: str = ""    # the line and the job's settings, hashed (flashgen.jobs.fingerprint): --resume checks it


class PendingIds(list):
    """A prompt's token ids still to come: build(defer=True) leaves the text for encode_pending(), which tokenizes
    the texts of many lines in one call. Empty until then."""

    __slots__ = ("text", "field", "special")

    def __init__(self, text: str, field: str, special: bool):
        super().__init__()
        self.text, self.field, self.special = text, field, special


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


DEFAULT_MAX_LINE_BYTES = 64 << 20  # the [job] max_line_bytes default (flashgen.jobs.settings)
MAX_DEPTH = 100                    # deepest JSON nesting a line may have (json.loads recurses: bound it first)
LONG_LINE_HEAD = 4096              # bytes of an overlong line kept to find its id


@dataclass
class LongLine:
    """Stands in for a line longer than max_line_bytes, which was skipped unread: its size and first bytes."""
    nbytes: int
    head: bytes
    limit: int


def read_lines(stream: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               start: int = 1) -> Iterator[tuple[int, bytes | LongLine]]:
    """(1-based line number, raw bytes) for each non-blank line, read lazily: memory stays flat on any size. A line
    longer than `max_line_bytes` (0: no limit) is skipped without holding it and yields a LongLine instead.
    `start`: the number of the stream's first line (a stream that starts inside a file: flashgen.ray)."""
    lines: Iterator[bytes | LongLine]
    if not hasattr(stream, "readline") or max_line_bytes <= 0:
        lines = iter(stream)
    else:
        lines = _bounded_lines(stream, max_line_bytes)
    for lineno, raw in enumerate(lines, start):
        if isinstance(raw, LongLine):
            yield lineno, raw
            continue
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # editors on Windows add one; it is not part of the JSON
        if raw.strip():
            yield lineno, raw


def _bounded_lines(stream: BinaryIO, limit: int) -> Iterator[bytes | LongLine]:
    while raw := stream.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):  # a whole line (its newline may be byte limit + 1)
            yield raw
            continue
        head, n = raw[:LONG_LINE_HEAD], len(raw)
        del raw
        while chunk := stream.readline(1 << 20):  # skip the rest of the line, 1 MiB at a time
            n += len(chunk)
            if chunk.endswith(b"\n"):
                n -= 1
                break
        yield LongLine(n, head, limit)


class LineParser:
    def __init__(self, tokenizer, max_model_len: int, defaults: dict[str, Any], *, template=None,
                 template_name: str = "", field: str = "", chat: bool = False, fingerprint: str = "",
                 system: str = ""):
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size
        self.defaults = defaults
        self.template, self.template_name = template, template_name
        self.field, self.chat = field, chat
        self.system = system      # --system: put first in chat prompts whose messages have no system message
        # Fields a line may carry besides the known ones: with --template / --field lines carry data fields.
        self.data_fields = _template_fields(template) | ({field} if field else set())
        self.allow_data = template is not None or bool(field)
        self._token_bytes: int | None = -1    # longest token of the vocabulary in UTF-8 bytes (-1: not yet known)
        self._defer = False                   # inside build(defer=True): _encode leaves the text for later
        bad = [t for t in (defaults.get("stop_token_ids") or []) if not 0 <= t < self.vocab_size]
        if bad:
            raise FatalError(f"sampling.stop_token_ids has {bad[0]}, not a token id of this model (integers "
                             f"0..{self.vocab_size - 1}); use ids from the model's tokenizer")
        self.fingerprint = fingerprint  # the settings that change a line's result (flashgen.jobs.fingerprint)

    def __getstate__(self) -> dict:
        """For a process of its own (flashgen.jobs.prepare_pool): a --template is compiled again there from its
        file (template_name, its path) rather than pickled."""
        return {**self.__dict__, "template": None,
                "_template_path": os.path.abspath(self.template_name) if self.template is not None else None}

    def __setstate__(self, state: dict) -> None:
        path = state.pop("_template_path", None)
        self.__dict__.update(state)
        if path is not None:
            from flashgen.jobs.templates import load_template

            self.template = load_template(path)

    # ---- phase 1: the id -------------------------------------------------------------------------------------
    def head(self, lineno: int, raw: bytes | LongLine) -> Line:
        def fail(code: str, message: str, obj=None, field=None, batch=None) -> Line:
            id_value, guessed, own = _guess_id(obj, lineno)
            batch = guessed if batch is None else batch
            err = LineError(lineno, id_value, key_of(id_value), batch, code, f"line {lineno}: {message}", field)
            return Line(lineno, id_value, err.key, batch, None, err, own)

        def fail_sniffed(code: str, message: str, head: bytes) -> Line:  # the line was not parsed: guess its id
            id_value, batch = _sniff_id(head)
            line = fail(code, message, None, None, batch)
            return line if id_value is None else _with_id(line, id_value)

        if isinstance(raw, LongLine):
            return fail_sniffed("line_too_long", f"the line is {raw.nbytes:,} bytes, more than --max-line-bytes "
                                f"{raw.limit:,}; shorten it, or raise --max-line-bytes (0 = no limit)", raw.head)
        if _too_deep(raw):
            return fail_sniffed("too_deep", f"the JSON is nested more than {MAX_DEPTH} levels deep; flatten the "
                                "line", raw[:LONG_LINE_HEAD])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            obj = _loads_or_none(raw.decode("utf-8", "replace"))  # still find the id, so the record carries it
            message = (f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} is not valid UTF-8; save the input file "
                       "as UTF-8")
            line = fail("invalid_utf8", message, obj)
            if isinstance(line.id, str) and "\ufffd" in line.id:  # the bad byte is in the id: not the line's id
                line = fail("invalid_utf8", message, None, None, line.batch)
            return line
        try:
            obj = json.loads(text)
        except RecursionError:  # cannot happen after _too_deep; kept so no line can crash the job
            return fail_sniffed("too_deep", "the JSON is nested too deep; flatten the line", raw[:LONG_LINE_HEAD])
        except json.JSONDecodeError as e:
            return fail("invalid_json", f"not valid JSON ({e.msg} at column {e.colno}): {show(text.strip())}; "
                        "each line must be one JSON object")
        except ValueError:  # an integer of more than 4300 digits (Python's limit on int conversion)
            return fail_sniffed("invalid_json", "a number has more than 4300 digits; write it with fewer digits",
                                raw[:LONG_LINE_HEAD])
        if not isinstance(obj, dict):
            return fail("not_an_object", f"{show(obj)} is not a JSON object; each line must be an object such as "
                        '{"id": 1, "prompt": "..."}')
        if _SURROGATE.search(raw):
            bad = _lone_surrogate(obj)
            if bad is not None:
                path, value = bad
                return fail("invalid_unicode", f'field "{path}" is {show(value)}, which has a lone surrogate (a '
                            "\\ud800-\\udfff escape without its pair); no tokenizer can encode it: fix the text "
                            "(write the character itself, or both halves of the pair)", obj, path or None)
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
    def build(self, line: Line, defer: bool = False) -> LineRequest | LineError:
        """The line's request or its error. `defer`: the prompt text is checked and rendered but not tokenized (its
        request's prompt_ids is a PendingIds): encode_pending() then tokenizes many lines' texts in one call, with
        the same result as build() alone. One thread at a time builds with a parser."""
        if line.error:
            return line.error
        obj = line.obj
        assert obj is not None, "a line that head() did not fail has its object"
        self._defer = defer
        try:
            if line.batch:
                kind, ids, params = openai_batch.parse(obj, self, line.key)
            else:
                kind = None
                source = self._prompt_field(obj)
                self._check_fields(obj)
                fields: dict[str, str] = {}
                overrides = line_overrides(obj, fields=fields)
                overrides.update(structured_overrides(obj, fields=fields))  # checked before tokenizing too
                overrides.update(logprob_overrides(obj, fields=fields))
                if "n" not in self.data_fields:  # a --template that reads "n" keeps it as its data, as before
                    overrides.update(sample_overrides(obj, fields=fields))
                self.check_token_ids(overrides, fields)
                params = make_params(self.defaults, overrides, line.key, fields=fields)
                ids = self._plain_ids(obj, source)
        except BadLine as b:
            return self.error(line, b.code, b.message, b.field)
        finally:
            self._defer = False
        return LineRequest(line.lineno, line.id, line.key, kind, ids, params, request_hash(obj, self.fingerprint))

    def encode_pending(self, items: list) -> list:
        """`items` with every request of build(defer=True) tokenized: its prompt_ids filled in, or the request
        replaced by its error record (prompt empty or too long), exactly as build() would have. The texts go to
        the tokenizer in one encode_batch call per add_special_tokens setting (outside the GIL, on all cores); a
        tokenizer without encode_batch encodes them one by one. Nothing is changed if the tokenizer raises."""
        out = list(items)
        pending = [(i, r.prompt_ids) for i, r in enumerate(items)
                   if isinstance(r, LineRequest) and isinstance(r.prompt_ids, PendingIds)]
        encoded: dict[int, Sequence[int]] = {}
        for special in (True, False):
            group = [(i, p) for i, p in pending if p.special is special]
            if not group:
                continue
            texts = [p.text for _, p in group]
            # int32 arrays where the tokenizer gives them (flashgen's own): what _check_len keeps, not copied again
            batch = getattr(self.tok, "encode_batch_ids", None) or getattr(self.tok, "encode_batch", None)
            if batch is not None:
                ids_list = batch(texts, add_special_tokens=special)
            else:
                ids_list = [self.tok.encode(t, add_special_tokens=special) for t in texts]
            encoded.update((i, ids) for (i, _), ids in zip(group, ids_list, strict=True))
        for i, p in pending:
            req = out[i]
            try:
                req.prompt_ids = self._check_len(encoded[i], p.field)
            except BadLine as b:
                out[i] = self.error(req, b.code, b.message, b.field)
        return out

    def duplicate(self, line: Line) -> LineError:
        """The error record of a line whose id an earlier line has (that line keeps the id; this one does not run).
        One place for its text: `flashgen merge` writes it for such lines that sharding put in different shards."""
        name = "custom_id" if line.batch else "id"
        return self.error(line, "duplicate_id", f'field "{name}" is {show(line.id)}, which an earlier line already '
                          "has; give each line a unique id (this line did not run)", name)

    def error(self, line: Line | LineRequest, code: str, message: str, field: str | None = None) -> LineError:
        batch = line.batch if isinstance(line, Line) else line.kind is not None
        return LineError(line.lineno, line.id, line.key, batch, code, f"line {line.lineno}: {message}", field)

    def _prompt_field(self, obj: dict) -> str | None:
        """Where a plain line's prompt comes from (None: the template), before anything costly is done."""
        if self.template is not None:
            return None
        if self.field:
            if self.field not in obj:
                raise BadLine("missing_prompt", f'field "{self.field}" (named by --field) is missing; add it '
                              "to the line", self.field)
            return self.field
        given = [k for k in ("messages", "prompt_token_ids", "prompt") if k in obj]
        if len(given) > 1:
            raise BadLine("ambiguous_prompt", f'field "{given[1]}" is {show(obj[given[1]])}, but field "{given[0]}" '
                          "gives the prompt too; keep one of them", given[1])
        if not given:
            raise BadLine("missing_prompt", 'no prompt: field "prompt" is missing (and so are "messages" and '
                          '"prompt_token_ids"); give "prompt" text, "messages", or "prompt_token_ids" (or use --field '
                          "/ --template to build the prompt from other fields)", "prompt")
        return given[0]

    def _check_fields(self, obj: dict) -> None:
        """Refuse the fields of a plain line that flashgen would otherwise ignore: unimplemented request fields,
        misspelled sampling fields, and (without --template / --field) any field it does not read."""
        for k, v in obj.items():
            if k in _PLAIN_FIELDS or k in self.data_fields or is_neutral(k, v):
                continue
            if k in UNSUPPORTED:
                raise BadLine("unsupported_field", f'field "{k}" is {show(v)}; flashgen does not implement '
                              f'"{k}" (yet): remove it from the line', k)
            hint = near_miss(k, _PLAIN_FIELDS)
            if hint is not None:
                raise BadLine("unknown_field", f'field "{k}" is {show(v)}, not a field flashgen reads; did you mean '
                              f'"{hint}"?', k)
            if not self.allow_data:
                raise BadLine("unknown_field", f'field "{k}" is {show(v)}, not a field flashgen reads; remove it '
                              '(a line has "id", "prompt" / "messages" / "prompt_token_ids" and sampling fields '
                              "such as \"max_tokens\"), or use --template / --field, which read other fields", k)

    def check_token_ids(self, overrides: dict[str, Any], fields: dict[str, str]) -> None:
        """The token ids of stop_token_ids, allowed_token_ids and logit_bias (its keys) must be of this model."""
        for key in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            for i, t in enumerate(overrides.get(key) or ()):
                if not 0 <= t < self.vocab_size:
                    name = fields.get(key, key)
                    at = f'the key "{t}"' if key == "logit_bias" else f"{show(t)} at index {i}"
                    raise BadLine("invalid_token_id", f'field "{name}" has {at}, not a token id of this model '
                                  f"(integers 0..{self.vocab_size - 1}); use ids from the model's tokenizer", name)


    def _plain_ids(self, obj: dict, source: str | None) -> Sequence[int]:
        if source is None:
            return self.text_ids(render(self.template, self.template_name, obj), f"(template {self.template_name})")
        if source == "messages":
            return self.chat_ids(obj["messages"], "messages")
        if source == "prompt_token_ids":
            return self.token_ids(obj["prompt_token_ids"], "prompt_token_ids")
        return self._text_field(obj, source)

    def _text_field(self, obj: dict, field: str) -> Sequence[int]:
        v = obj[field]
        if not isinstance(v, str):
            hint = ' (token ids go in "prompt_token_ids")' if isinstance(v, list) else ""
            raise BadLine("invalid_field", f'field "{field}" is {show(v)}; use a string{hint}', field)
        return self.text_ids(v, field)

    def text_ids(self, text: str, field: str, chat: bool | None = None) -> Sequence[int]:
        if not text:
            raise BadLine("empty_prompt", f'field "{field}" is an empty string ""; give the prompt text', field)
        if self.chat if chat is None else chat:
            return self.chat_ids([{"role": "user", "content": text}], field)
        return self._encode(text, field, add_special_tokens=True)

    def chat_ids(self, messages: Any, field: str) -> Sequence[int]:
        if not isinstance(messages, list) or not messages:
            raise BadLine("empty_prompt" if messages == [] else "invalid_field",
                          f'field "{field}" is {show(messages)}; use a non-empty list of '
                          '{"role": ..., "content": ...} objects', field)
        msgs = [self._message(m, f"{field}[{i}]") for i, m in enumerate(messages)]
        if self.system and msgs[0]["role"] != "system":  # the line's own system message wins
            msgs.insert(0, {"role": "system", "content": self.system})
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
        except ValueError as e:
            raise BadLine("no_chat_template", f'field "{field}": {e}; give "prompt" text instead, or use a model '
                          "with a chat template", field) from None
        except Exception as e:  # the model's own template raised (e.g. it insists on alternating roles)
            raise BadLine("chat_template_error", f'field "{field}": the chat template failed: {e}', field) from None
        return self._encode(text, field, add_special_tokens=False)

    @staticmethod
    def _message(m: Any, where: str) -> dict:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadLine("invalid_field", f'field "{where}" is {show(m)}; use {{"role": "user", "content": "..."}}',
                          where)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p["text"] for p in content
                     if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
            if len(parts) != len(content):
                raise BadLine("invalid_field", f'field "{where}.content" is {show(content)}; only text parts '
                              '{"type": "text", "text": "..."} are supported', f"{where}.content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadLine("invalid_field", f'field "{where}.content" is {show(content)}; use a string',
                          f"{where}.content")
        return {**m, "content": content}

    def token_ids(self, ids: Any, field: str) -> array:
        if not isinstance(ids, list) or not ids:
            code = "empty_prompt" if ids == [] else "invalid_field"
            raise BadLine(code, f'field "{field}" is {show(ids)}; use a non-empty list of token ids', field)
        if len(ids) >= self.max_model_len:  # before looking at each id
            self._check_len(ids, field)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise BadLine("invalid_token_id", f'field "{field}" has {show(t)} at index {i}, not a token id of '
                              f"this model (integers 0..{self.vocab_size - 1}); use ids from the model's tokenizer",
                              field)
        return self._check_len(ids, field)  # a copy: an int32 array

    def _encode(self, text: str, field: str, add_special_tokens: bool) -> Sequence[int]:
        """Tokenize `text`, unless its size alone proves it longer than the context: a text of B UTF-8 bytes has at
        least B / (L * 3) tokens, L being the longest token in bytes (3: a normalizer such as NFC can merge up to
        three code points into one), so a 50 MB prompt is refused at once instead of after a minute of work."""
        limit = self._longest_token_bytes()
        if limit and len(text) >= self.max_model_len:  # chars <= bytes: a short text cannot be over the bound
            n_bytes = len(text.encode("utf-8", "surrogatepass"))
            at_least = -(-n_bytes // (limit * 3))
            if at_least >= self.max_model_len:
                raise BadLine(
                    "prompt_too_long",
                    f'field "{field}" is {n_bytes:,} bytes, at least {at_least:,} tokens, but the model context '
                    f"(max_model_len) is {self.max_model_len} tokens, prompt and output together; shorten the "
                    "prompt or raise --max-model-len if the model allows it", field,
                )
        if self._defer:
            return PendingIds(text, field, add_special_tokens)
        return self._check_len(self.tok.encode(text, add_special_tokens=add_special_tokens), field)

    def _longest_token_bytes(self) -> int | None:
        """The longest token string of the vocabulary in UTF-8 bytes (at least the bytes it decodes to), once."""
        if self._token_bytes == -1:
            self._token_bytes = None
            for tok in (getattr(self.tok, "_tok", None), self.tok):
                get_vocab = getattr(tok, "get_vocab", None)
                if get_vocab is None:
                    continue
                try:
                    vocab = get_vocab(with_added_tokens=True)
                except TypeError:
                    vocab = get_vocab()
                if vocab:
                    self._token_bytes = max(len(t.encode("utf-8", "surrogatepass")) for t in vocab)
                    break
        return self._token_bytes

    def _check_len(self, ids: Sequence[int], field: str) -> array:
        if not ids:
            raise BadLine("empty_prompt", f'field "{field}" tokenizes to no tokens; give the prompt text', field)
        if len(ids) >= self.max_model_len:
            raise BadLine(
                "prompt_too_long",
                f'field "{field}" is {len(ids)} tokens, but the model context (max_model_len) is '
                f"{self.max_model_len} tokens, prompt and output together; shorten the prompt or raise "
                "--max-model-len if the model allows it", field,
            )
        return ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)


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
    ok = _id_ok(v)
    return (v if ok else lineno), batch, ok


def _id_ok(v: Any) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool) and v != "" and (
        not isinstance(v, str) or _encodable(v))


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Fields a plain line may carry besides data fields.
_PLAIN_FIELDS = {"id", "prompt", "messages", "prompt_token_ids", *FIELDS, *STRUCTURED_FIELDS, *SAMPLE_FIELDS,
                 *CHAT_LOGPROB_FIELDS}  # top_logprobs: read to say that a plain line has "logprobs": K
_ID_RE = re.compile(rb'"(custom_id|id)"\s*:\s*("(?:[^"\\\n]|\\.){1,200}"|-?\d{1,18})(?=\s*[,}])')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _sniff_id(head: bytes) -> tuple[Any, bool]:
    """(id, is a batch line) found by a cheap search of a line's first bytes (None: no id found); for lines too long
    or too deep to parse. custom_id wins, as it does for a parsed line."""
    found: dict[bytes, bytes] = {}
    for m in _ID_RE.finditer(head):
        found.setdefault(m.group(1), m.group(2))
    batch = b"custom_id" in found or b'"body"' in head
    token = found.get(b"custom_id" if batch else b"id")
    if token is None:
        return None, batch
    try:
        v = json.loads(token)
    except ValueError:
        return None, batch
    return (v if _id_ok(v) else None), batch


def _with_id(line: Line, id_value: Any) -> Line:
    """`line` (a failed one) carrying a sniffed id. The id is a guess, so it claims nothing (own_id False)."""
    err = line.error
    assert err is not None, "only a failed line gets a sniffed id"
    err.id, err.key = id_value, key_of(id_value)
    line.id, line.key = err.id, err.key
    return line


def _too_deep(raw: bytes) -> bool:
    """Whether the JSON nests deeper than MAX_DEPTH, judged on the bytes, without recursion: brackets inside
    strings do not count. Cheap: most lines have too few brackets to look further."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for c in brackets:
        if c == 91 or c == 123:  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(path, string) of the first string (a key or a value) holding a lone surrogate, walked without recursion."""
    stack = [(obj, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not _encodable(v):
                return path, v
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                name = k.encode("utf-8", "backslashreplace").decode("utf-8")
                sub = f"{path}.{name}" if path else name
                if not _encodable(k):
                    return sub, k
                stack.append((x, sub))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in reversed(list(enumerate(v))))
    return None


def _template_fields(template) -> set[str]:
    """The line fields a --template uses (they are data, never unknown fields)."""
    if template is None:
        return set()
    try:
        from jinja2 import meta

        env = template.environment
        source = env.loader.get_source(env, template.name)[0]
        return set(meta.find_undeclared_variables(env.parse(source)))
    except Exception:  # a template that cannot be read back: treat no field as its own
        return set()
