"""Output records: what one input line becomes in the output file, and how --resume reads them back."""
from __future__ import annotations

import json
from typing import Any

from flashgen.jobs import openai_batch
from flashgen.jobs.inputs import LineError, LineRequest, key_of


def result_record(req: LineRequest, out, n_prompt: int, model: str, return_token_ids: bool) -> dict:
    """The record of a line that ran. One record holds every sample of the line (SamplingParams.n), so a line is
    done, for --resume, exactly when its record is written. n = 1: the record is as it was before n existed; n > 1:
    a native record adds "samples" (see native_sample) and keeps sample 0's text and finish_reason at the top."""
    params = getattr(req, "params", None)
    n_gen = openai_batch.completion_tokens(out)
    if req.kind is not None:
        rec = openai_batch.result_record(req.id, req.kind, model, out.text, out.finish_reason, n_prompt, n_gen, out,
                                         params)
    else:
        rec = {"id": req.id, "text": out.text, "finish_reason": out.finish_reason,
               "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen}}
        k, k_prompt = getattr(params, "logprobs", None), getattr(params, "prompt_logprobs", None)
        samples = openai_batch.samples_of(out)
        if samples is not None:
            rec["samples"] = [native_sample(c, k, return_token_ids) for c in samples]
        else:
            if return_token_ids:
                rec["token_ids"] = list(out.token_ids)
            if k is not None:  # only when asked for: other records stay as they were
                rec.update(_logprob_keys(out, k))
        if k_prompt is not None:
            positions = getattr(out, "prompt_logprobs", None)
            rec["prompt_logprobs"] = (None if positions is None else
                                      native_logprobs(positions, list(out.prompt_token_ids), k_prompt))
    request_hash = getattr(req, "request_hash", "")
    if request_hash:  # see flashgen.jobs.fingerprint; a top-level extra key on OpenAI batch lines too
        rec["request_hash"] = request_hash
    return rec


def native_sample(c, k: int | None, return_token_ids: bool) -> dict:
    """One of a native record's "samples" (a CompletionOutput): {"index", "text", "finish_reason", "stop_reason",
    "token_ids" (with --return-token-ids), "logprobs" and "cumulative_logprob" (when the line asked for logprobs)}."""
    rec = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if return_token_ids:
        rec["token_ids"] = list(c.token_ids)
    if k is not None:
        rec.update(_logprob_keys(c, k))
    return rec


def _logprob_keys(out, k: int) -> dict:
    """The keys "logprobs" and "cumulative_logprob" of one sample (a RequestOutput or a CompletionOutput)."""
    positions = getattr(out, "logprobs", None)
    cumulative = getattr(out, "cumulative_logprob", None)
    return {"logprobs": None if positions is None else native_logprobs(positions, list(out.token_ids), k),
            "cumulative_logprob": None if cumulative is None else openai_batch.finite(cumulative)}


def native_logprobs(positions: list, token_ids: list[int], k: int) -> list[dict | None]:
    """A native line's logprobs (or prompt_logprobs): per token (`token_ids[i]`, the chosen or the prompt's) null
    when the engine gave nothing for it (the first prompt token), else {"token_id", "token", "logprob", "rank",
    "top": [{"token_id", "token", "logprob", "rank"}, ...]}: the token itself, then the k most likely tokens at its
    position, most likely first (the token itself among them when its rank is <= k). "token" is the token's text
    decoded alone (null when the engine gave none); logprobs that are not finite are written as -9999.0."""
    def one(tid: int | None, lp) -> dict:
        return {"token_id": tid, "token": None if lp is None else lp.decoded_token,
                "logprob": None if lp is None else openai_batch.finite(lp.logprob),
                "rank": None if lp is None else lp.rank}

    out: list[dict | None] = []
    for i, position in enumerate(positions):
        if position is None:
            out.append(None)
            continue
        tid = token_ids[i] if i < len(token_ids) else None
        lp, top = openai_batch.ranked(position, tid, k)
        out.append({**one(tid, lp), "top": [one(t, x) for t, x in top]})
    return out


def error_record(err: LineError) -> dict:
    if err.batch:
        return openai_batch.error_record(err.id, err.code, err.message, err.field)
    return {"id": err.id, "error": {"code": err.code, "message": err.message}}


def record_key(rec: Any) -> str | None:
    """The key of the input line an output record answers (custom_id for batch lines), or None if `rec` is not
    a flashgen output record: a result {"id", "text", "finish_reason", ...}, an error record
    {"id", "error": {"code", "message"}}, or an OpenAI batch output line {"id", "custom_id", "response", "error"}.
    An input line ({"id", "prompt"}, say) is none of these."""
    if not isinstance(rec, dict):
        return None
    if "custom_id" in rec:
        if "response" in rec and "error" in rec:
            return key_of(rec["custom_id"])
        return None
    if "id" not in rec:
        return None
    err = rec.get("error")
    if isinstance(err, dict) and "code" in err and "message" in err:
        return key_of(rec["id"])
    if "text" in rec and "finish_reason" in rec:
        return key_of(rec["id"])
    return None


def read_record(raw: bytes) -> tuple[Any, str | None]:
    """One line of an output file: (its JSON, or None if it is not JSON; record_key of it, None if it is not a
    flashgen output record)."""
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    return rec, record_key(rec)


def input_line_hint(rec: Any) -> str:
    """For a line that is not an output record: a note when it looks like an input line (the usual mix-up)."""
    return " (it looks like an input line)" if isinstance(rec, dict) and any(
        k in rec for k in ("prompt", "messages", "body")) else ""


def is_error(rec: dict) -> bool:
    return rec.get("error") is not None
