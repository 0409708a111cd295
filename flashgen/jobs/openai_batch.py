"""OpenAI Batch API lines: requests in, batch output lines out.

Input: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
Output: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"} where body is a
chat.completion or text_completion object with usage, as OpenAI writes it: one choice per sample (`n`), each with
its `index` (and its logprobs in OpenAI's format for each kind when the request asked for them), and vLLM's
prompt_logprobs. A line that cannot run gets status_code 400 with an OpenAI-style error body *and* a top-level
error {code, message}, so readers that check either one see it.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from flashgen.jobs.params import (
    CHAT_LOGPROB_FIELDS,
    FIELDS,
    HARMLESS,
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

    def check_token_ids(self, overrides: dict[str, Any], fields: dict[str, str]) -> None: ...

    def chat_ids(self, messages: Any, field: str) -> Sequence[int]: ...

    def text_ids(self, text: str, field: str, chat: bool | None = None) -> Sequence[int]: ...

    def token_ids(self, ids: Any, field: str) -> Sequence[int]: ...


def is_batch_line(obj: dict) -> bool:
    return "custom_id" in obj or "body" in obj


def parse(obj: dict, parser: Parser, key: str) -> tuple[str, Sequence[int], Any]:
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
    _check_body_fields(body, url)
    fields: dict[str, str] = {}
    overrides = line_overrides(body, where="body.", fields=fields)  # the sampling fields, by their names
    if "max_completion_tokens" in body:  # the newer name wins
        overrides.update(line_overrides(body, {"max_completion_tokens": "max_tokens"}, where="body.", fields=fields))
    # response_format, and vLLM's structured_outputs / guided_* extras, as vLLM's server takes them in a body
    overrides.update(structured_overrides(body, "body.", fields))
    # logprobs (chat: true + top_logprobs k; completions: k), logit_bias, and vLLM's prompt_logprobs /
    # allowed_token_ids extras, as vLLM's server takes them in a body
    overrides.update(logprob_overrides(body, "chat" if url == CHAT_URL else "completions", "body.", fields))
    overrides.update(sample_overrides(body, "body.", fields))  # n: one choice per sample
    parser.check_token_ids(overrides, fields)
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
    known = {PROMPT_FIELD[url], "max_completion_tokens", *FIELDS, *STRUCTURED_FIELDS, *CHAT_LOGPROB_FIELDS,
             *SAMPLE_FIELDS}
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


def samples_of(out: Any) -> list | None:
    """A RequestOutput's samples (CompletionOutputs, by index) when it has more than one (SamplingParams.n > 1),
    else None: a one-sample request is written from its flat fields (sample 0's), exactly as before n existed."""
    outputs = getattr(out, "outputs", None) or []
    return list(outputs) if len(outputs) > 1 else None


def completion_tokens(out: Any) -> int:
    """The tokens generated for a request: every sample's, summed (as OpenAI's usage counts them)."""
    samples = samples_of(out)
    return len(out.token_ids) if samples is None else sum(len(c.token_ids) for c in samples)


def result_record(custom_id: Any, kind: str, model: str, text: str, finish_reason: str, n_prompt: int,
                  n_gen: int, out: Any = None, params: Any = None) -> dict:
    """A 200 batch output line. With `out` (the RequestOutput) and `params` (its SamplingParams): one choice per
    sample (n), by index, with usage.completion_tokens summed over them; the logprobs the request asked for, in
    OpenAI's format for its kind (chat_logprobs / completion_logprobs; null when the engine gave none), and vLLM's
    prompt_logprobs (the body's for chat, each choice's for completions, as vLLM's server writes them)."""
    chat = kind == "chat.completion"
    k = None if params is None else params.logprobs
    prompt_lp = None
    want_prompt = params is not None and params.prompt_logprobs is not None
    if want_prompt:
        prompt_lp = vllm_prompt_logprobs(getattr(out, "prompt_logprobs", None))

    def choice(index: int, text: str, finish_reason: str, positions: Any, token_ids: Any) -> dict:
        logprobs = None
        if k is not None and positions is not None:
            logprobs = (chat_logprobs if chat else completion_logprobs)(positions, token_ids, k)
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if want_prompt:
            c["prompt_logprobs"] = prompt_lp
        return c

    samples = samples_of(out)
    if samples is None:
        choices = [choice(0, text, finish_reason, getattr(out, "logprobs", None), getattr(out, "token_ids", None))]
    else:
        choices = [choice(c.index, c.text, c.finish_reason, c.logprobs, c.token_ids) for c in samples]
        n_gen = sum(len(c.token_ids) for c in samples)
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "object": kind, "created": int(time.time()),
        "model": model, "choices": choices,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
    }
    if chat and want_prompt:
        body["prompt_logprobs"] = prompt_lp
    line_id, request_id = _ids()
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_record(custom_id: Any, code: str, message: str, field: str | None) -> dict:
    line_id, request_id = _ids()
    body = {"error": {"message": message, "type": "invalid_request_error", "param": field, "code": code}}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": request_id, "body": body},
            "error": {"code": code, "message": message}}


# ---- logprobs ------------------------------------------------------------------------------------------------------
# A position's candidates come from the engine as {token id: Logprob(logprob, rank, decoded_token)}: the chosen token
# and the top k (k = the logprobs asked for), the chosen one also among the top k when its rank is within them.
# A logprob that is not finite (-inf: a token the processed distribution rules out) is written as -9999.0, as
# vLLM's server does, so every output line stays valid JSON.
MIN_LOGPROB = -9999.0


def finite(v: Any) -> float:
    v = float(v)
    return v if math.isfinite(v) else MIN_LOGPROB


def ranked(position: dict, chosen: int | None, k: int) -> tuple[Any, list[tuple[int, Any]]]:
    """(the chosen token's Logprob or None, the top k as (token id, Logprob), most likely first) of one position."""
    items = sorted(position.items(), key=lambda kv: (kv[1].rank, -finite(kv[1].logprob), kv[0]))
    if len(items) > k:  # the chosen token is the one beyond the top k
        items = [kv for kv in items if kv[0] != chosen]
    return position.get(chosen) if chosen is not None else None, items[:k]


def token_text(lp: Any) -> str:
    """A candidate's text: its decoded_token, or "" when the engine gave none."""
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else ""


def _bytes(lp: Any) -> list[int]:
    return list(token_text(lp).encode("utf-8", "surrogatepass"))


def _chosen(token_ids: list[int], i: int) -> int | None:
    return token_ids[i] if i < len(token_ids) else None


def chat_logprobs(positions: list[dict], token_ids: list[int], k: int) -> dict:
    """OpenAI chat's choices[].logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
    "logprob", "bytes"}] (k, most likely first)}] (one per generated token), "refusal": null}."""
    content = []
    for i, position in enumerate(positions):
        lp, top = ranked(position, _chosen(token_ids, i), k)
        content.append({
            "token": token_text(lp), "logprob": None if lp is None else finite(lp.logprob), "bytes": _bytes(lp),
            "top_logprobs": [{"token": token_text(t), "logprob": finite(t.logprob), "bytes": _bytes(t)}
                             for _, t in top],
        })
    return {"content": content, "refusal": None}


def completion_logprobs(positions: list[dict], token_ids: list[int], k: int) -> dict:
    """OpenAI completions' choices[].logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one
    entry per generated token. top_logprobs[i] maps text -> logprob for the top k and the chosen token (k + 1
    entries when the chosen one is not among the top k, as OpenAI says), most likely first; two tokens of the same
    text keep the likelier's logprob. text_offset[i]: where token i starts in the text, in characters."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    offset = 0
    for i, position in enumerate(positions):
        chosen = _chosen(token_ids, i)
        lp, top = ranked(position, chosen, k)
        text = token_text(lp)
        tokens.append(text)
        token_logprobs.append(None if lp is None else finite(lp.logprob))
        both: dict[int, Any] = dict(top)
        if lp is not None and chosen is not None:
            both[chosen] = lp
        entry: dict[str, float] = {}
        for _, t in sorted(both.items(), key=lambda kv: (kv[1].rank, -finite(kv[1].logprob), kv[0])):
            entry.setdefault(token_text(t), finite(t.logprob))
        top_logprobs.append(entry)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def vllm_prompt_logprobs(positions: list | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token null (the first) or {token id (a string): {"logprob", "rank",
    "decoded_token"}} for the prompt's token and the top k; null when the engine gave none."""
    if positions is None:
        return None
    return [None if p is None else {str(tid): {"logprob": finite(lp.logprob), "rank": lp.rank,
                                               "decoded_token": lp.decoded_token} for tid, lp in p.items()}
            for p in positions]
