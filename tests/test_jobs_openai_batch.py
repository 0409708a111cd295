"""OpenAI Batch API lines in, OpenAI batch output lines out, through the real CLI."""
from __future__ import annotations

from flashgen.jobs.errors import ExitCode
from test_cli_support import gen, tiny_model


def batch_line(cid, url, body, method="POST"):
    return {"custom_id": cid, "method": method, "url": url, "body": body}


def test_chat_and_completion_lines_get_openai_output(tmp_path):
    lines = [
        batch_line("chat", "/v1/chat/completions",
                   {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
                    "ignore_eos": True}),
        batch_line("cmpl", "/v1/completions", {"model": "m", "prompt": "Once upon", "max_tokens": 2,
                                               "ignore_eos": True, "temperature": 0, "seed": 3}),
        {"id": "plain", "prompt": "a plain line in the same file"},
    ]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.OK, r.stderr
    chat, cmpl, plain = recs
    for rec, cid, obj, n in ((chat, "chat", "chat.completion", 3), (cmpl, "cmpl", "text_completion", 2)):
        assert rec["custom_id"] == cid and rec["id"].startswith("batch_req_") and rec["error"] is None
        resp = rec["response"]
        assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
        body = resp["body"]
        assert body["object"] == obj and body["model"] == tiny_model() and isinstance(body["created"], int)
        usage = body["usage"]
        assert usage["completion_tokens"] == n and usage["total_tokens"] == usage["prompt_tokens"] + n
        assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["index"] == 0
    assert chat["response"]["body"]["id"].startswith("chatcmpl-")
    assert chat["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(chat["response"]["body"]["choices"][0]["message"]["content"], str)
    assert isinstance(cmpl["response"]["body"]["choices"][0]["text"], str)
    assert plain["id"] == "plain" and "text" in plain  # formats mix freely, detected per line


def test_completion_text_matches_a_plain_line(tmp_path):
    lines = [batch_line("c", "/v1/completions", {"prompt": "The quick brown fox"}),
             {"id": "p", "prompt": "The quick brown fox"}]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == 0, r.stderr
    assert recs[0]["response"]["body"]["choices"][0]["text"] == recs[1]["text"]


def test_bad_batch_lines_get_400_and_error(tmp_path):
    lines = [
        batch_line("url", "/v1/embeddings", {"input": "x"}),
        batch_line("body", "/v1/chat/completions", "not an object"),
        batch_line("nomsg", "/v1/chat/completions", {"model": "m"}),
        batch_line("n", "/v1/completions", {"prompt": "x", "n": 129}),  # n is 1..128
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no custom_id"}},
    ]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.LINE_ERRORS
    codes = ["unsupported_url", "invalid_field", "missing_prompt", "invalid_param", "invalid_id"]
    for rec, code, cid in zip(recs, codes, ["url", "body", "nomsg", "n", 5], strict=True):
        assert rec["custom_id"] == cid
        assert rec["error"]["code"] == code and rec["error"]["message"].startswith("line ")
        assert rec["response"]["status_code"] == 400
        assert rec["response"]["body"]["error"]["code"] == code
        assert rec["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert recs[0]["response"]["body"]["error"]["param"] == "url"
