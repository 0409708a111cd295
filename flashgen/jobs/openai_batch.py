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
from typing import TYPE_CHECKING, Any

from flashgen.jobs.params import LINE_FIELDS, BadLine, line_overrides, show

if TYPE_CHECKING:
    from flashgen.jobs.inputs import LineParser

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OBJECT = {CHAT_URL: "chat.completion", COMPLETIONS_URL: "text_completion"}
# Body fields that map onto sampling parameters; max_completion_tokens (the newer name) wins over max_tokens.
BODY_FIELDS = {k: k for k in LINE_FIELDS}


def is_batch_line(obj: dict) -> bool:
    return "custom_id" in obj or "body" in obj


def parse(obj: dict, parser: "LineParser") -> tuple[str, list[int], dict[str, Any]]:
    """(object kind, prompt token ids, sampling overrides) for one batch line, or BadLine."""
    method = obj.get("method", "POST")
    if method != "POST":
        raise BadLine("invalid_method", f'field "method" is {show(method)}; batch lines use "POST"', "method")
    url = obj.get("url")
    if url not in OBJECT:
        raise BadLine(
            "unsupported_url",
            f'field "url" is {show(url)}; flashgen answers "{CHAT_URL}" and "{COMPLETIONS_URL}"', "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadLine("invalid_field", f'field "body" is {show(body)}; use an object with the request', "body")
    n = body.get("n", 1)
    if n != 1:
        raise BadLine(
            "unsupported_param",
            f'field "body.n" is {show(n)}; flashgen makes one choice per line: repeat the line with other custom_ids',
            "body.n",
        )
    overrides = line_overrides(body, BODY_FIELDS, where="body.")
    if "max_completion_tokens" in body:
        overrides.update(line_overrides(body, {"max_completion_tokens": "max_tokens"}, where="body."))
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
    return OBJECT[url], ids, overrides


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
