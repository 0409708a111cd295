"""OpenAI Batch API lines: requests in, batch output lines out.

Input: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
Output: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"} where body is a
chat.completion or text_completion object with usage, as OpenAI writes it. A line that cannot run gets
status_code 400 with an OpenAI-style error body *and* a top-level error {code, message}, so readers that check
either one see it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from flashgen.jobs.params import (
    FIELDS,
    HARMLESS,
    UNSUPPORTED,
    BadLine,
    is_neutral,
    line_overrides,
    make_params,
    near_miss,
    show,
)
from flashgen.jobs.structured import FIELD_NAMES as STRUCTURED_FIELDS
from flashgen.jobs.structured import structured_overrides

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OBJECT = {CHAT_URL: "chat.completion", COMPLETIONS_URL: "text_completion"}
# The prompt field of each url's body.
PROMPT_FIELD = {CHAT_URL: "messages", COMPLETIONS_URL: "prompt"}
# A batch line's own fields (OpenAI writes exactly these).
LINE_KEYS = ("custom_id", "method", "url", "body")


class Parser(Protocol):
    """What `parse` needs of the line parser (flashgen.jobs.inputs.LineParser, which imports this module: a
    protocol here keeps the dependency one way)."""

    defaults: dict[str, Any]

    def check_stop_ids(self, overrides: dict[str, Any], fields: dict[str, str]) -> None: ...

    def chat_ids(self, messages: Any, field: str) -> list[int]: ...

    def text_ids(self, text: str, field: str, chat: bool | None = None) -> list[int]: ...

    def token_ids(self, ids: Any, field: str) -> list[int]: ...


def is_batch_line(obj: dict) -> bool:
    return "custom_id" in obj or "body" in obj


def parse(obj: dict, parser: Parser, key: str) -> tuple[str, list[int], Any]:
    """(object kind, prompt token ids, SamplingParams) for one batch line, or BadLine. Every field is checked before
    the prompt is tokenized."""
    for k, v in obj.items():
        if k not in LINE_KEYS:
            hint = near_miss(k, LINE_KEYS)
            raise BadLine("unknown_field", f'field "{k}" is {show(v)}, not a field of a batch line; '
                          + (f'did you mean "{hint}"?' if hint else 'a batch line has "custom_id", "method", "url" '
                             'and "body" (request fields go inside "body")'), k)
    method = obj.get("method", "POST")
    if method != "POST":
        raise BadLine("invalid_method", f'field "method" is {show(method)}; batch lines use "POST"', "method")
    url = obj.get("url")
    if not isinstance(url, str) or url not in OBJECT:
        raise BadLine(
            "unsupported_url",
            f'field "url" is {show(url)}; flashgen answers "{CHAT_URL}" and "{COMPLETIONS_URL}"', "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadLine("invalid_field", f'field "body" is {show(body)}; use an object with the request', "body")
    n = body.get("n")
    if not is_neutral("n", n):
        raise BadLine(
            "unsupported_param",
            f'field "body.n" is {show(n)}; flashgen makes one choice per line: repeat the line with other custom_ids',
            "body.n",
        )
    _check_body_fields(body, url)
    fields: dict[str, str] = {}
    overrides = line_overrides(body, where="body.", fields=fields)  # the sampling fields, by their names
    if "max_completion_tokens" in body:  # the newer name wins
        overrides.update(line_overrides(body, {"max_completion_tokens": "max_tokens"}, where="body.", fields=fields))
    # response_format, and vLLM's structured_outputs / guided_* extras, as vLLM's server takes them in a body
    overrides.update(structured_overrides(body, "body.", fields))
    parser.check_stop_ids(overrides, fields)
    params = make_params(parser.defaults, overrides, key, "body.", fields=fields)
    if url == CHAT_URL:
        if "messages" not in body:
            raise BadLine("missing_prompt", 'field "body.messages" is missing; chat requests need messages',
                          "body.messages")
        ids = parser.chat_ids(body["messages"], "body.messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # OpenAI allows a list of prompts; one is the same as the string
        if isinstance(prompt, str):
            ids = parser.text_ids(prompt, "body.prompt", chat=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = parser.token_ids(prompt, "body.prompt")
        elif prompt is None:
            raise BadLine("missing_prompt", 'field "body.prompt" is missing; completion requests need a prompt',
                          "body.prompt")
        else:
            raise BadLine(
                "invalid_field",
                f'field "body.prompt" is {show(prompt)}; use one string or one list of token ids per line',
                "body.prompt",
            )
    return OBJECT[url], ids, params


def _check_body_fields(body: dict, url: str) -> None:
    """Refuse every body field flashgen would otherwise ignore, unless it changes nothing in the output."""
    known = {PROMPT_FIELD[url], "max_completion_tokens", *FIELDS, *STRUCTURED_FIELDS}
    for k, v in body.items():
        if k in known or is_neutral(k, v):
            continue
        if k in UNSUPPORTED:
            raise BadLine("unsupported_field", f'field "body.{k}" is {show(v)}; flashgen does not implement '
                          f'"{k}" (yet): remove it from the body', "body." + k)
        other = next((u for u, f in PROMPT_FIELD.items() if f == k), None)
        if other is not None:
            raise BadLine("unknown_field", f'field "body.{k}" is {show(v)}, but "{url}" requests take '
                          f'"{PROMPT_FIELD[url]}"; use "{PROMPT_FIELD[url]}", or the url "{other}"', "body." + k)
        hint = near_miss(k, known | HARMLESS | UNSUPPORTED)
        raise BadLine("unknown_field", f'field "body.{k}" is {show(v)}, not a request field flashgen knows; '
                      + (f'did you mean "{hint}"?' if hint else "remove it"), "body." + k)


def _ids() -> tuple[str, str]:
    return f"batch_req_{uuid.uuid4().hex}", f"req_{uuid.uuid4().hex}"


def result_record(custom_id: Any, kind: str, model: str, text: str, finish_reason: str, n_prompt: int,
                  n_gen: int) -> dict:
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        prefix = "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        prefix = "cmpl-"
    body = {
        "id": prefix + uuid.uuid4().hex, "object": kind, "created": int(time.time()), "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
    }
    line_id, request_id = _ids()
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_record(custom_id: Any, code: str, message: str, field: str | None) -> dict:
    line_id, request_id = _ids()
    body = {"error": {"message": message, "type": "invalid_request_error", "param": field, "code": code}}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": request_id, "body": body},
            "error": {"code": code, "message": message}}
