"""Output records: what one input line becomes in the output file, and how --resume reads them back."""
from __future__ import annotations

from typing import Any

from flashgen.jobs import openai_batch
from flashgen.jobs.inputs import LineError, LineRequest, key_of


def result_record(req: LineRequest, out, n_prompt: int, model: str, return_token_ids: bool) -> dict:
    if req.kind is not None:
        rec = openai_batch.result_record(req.id, req.kind, model, out.text, out.finish_reason, n_prompt,
                                         len(out.token_ids))
    else:
        rec = {"id": req.id, "text": out.text, "finish_reason": out.finish_reason,
               "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(out.token_ids)}}
        if return_token_ids:
            rec["token_ids"] = list(out.token_ids)
    request_hash = getattr(req, "request_hash", "")
    if request_hash:  # see flashgen.jobs.fingerprint; a top-level extra key on OpenAI batch lines too
        rec["request_hash"] = request_hash
    return rec


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


def is_error(rec: dict) -> bool:
    return rec.get("error") is not None
