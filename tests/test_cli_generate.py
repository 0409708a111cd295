"""`flashgen generate` end to end on a tiny random checkpoint with the real engine: formats, fields, order."""
from __future__ import annotations

import json

from flashgen.jobs.errors import ExitCode
from test_cli_support import FAST, PROMPTS, cli, gen, proc, read_jsonl, tiny_model


def test_plain_lines_file_to_file(tmp_path):
    lines = [{"id": "a", "prompt": "The quick brown fox"}, {"id": 7, "prompt": "Paged attention"},
             {"prompt": "no id here"}]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == ExitCode.OK, r.stderr
    assert r.stdout == ""  # with -o, stdout stays empty
    assert [rec["id"] for rec in recs] == ["a", 7, 3]  # input order; a line without id gets its line number
    for rec in recs:
        assert set(rec) == {"id", "text", "finish_reason", "usage", "request_hash"}
        assert rec["finish_reason"] in ("stop", "length")
        assert 1 <= rec["usage"]["completion_tokens"] <= 4 and rec["usage"]["prompt_tokens"] > 0
    assert "3 lines: 3 ok, 0 errors" in r.stderr  # the summary goes to stderr


def test_stdin_to_stdout(tmp_path):
    text = "\n".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) for i in range(5)) + "\n"
    r = cli(["generate", "-", "-o", "-", "--model", tiny_model(), *FAST], cwd=tmp_path, input=text)
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [0, 1, 2, 3, 4]
    assert "flashgen: ok (exit 0)" in r.stderr and "flashgen" not in r.stdout


def test_stdout_carries_results_only_in_a_real_process(tmp_path):
    """Through `python -m flashgen` (the console script's code path): every stdout line is a JSON record."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": "hello world"}) + "\n" for i in range(4)))
    p = proc(["generate", src, "--model", tiny_model(), *FAST], cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode().splitlines()
    assert len(out) == 4 and all(json.loads(line)["text"] is not None for line in out)
    assert b"4 lines: 4 ok" in p.stderr


def test_line_fields_override_defaults(tmp_path):
    lines = [
        {"id": "short", "prompt": "hello", "max_tokens": 2, "ignore_eos": True},
        {"id": "long", "prompt": "hello", "max_tokens": 9, "ignore_eos": True},
        {"id": "default", "prompt": "hello", "ignore_eos": True},  # --max-tokens 4 from FAST
    ]
    r, recs = gen(tmp_path, lines)
    assert r.exit_code == 0, r.stderr
    assert [rec["usage"]["completion_tokens"] for rec in recs] == [2, 9, 4]
    assert all(rec["finish_reason"] == "length" for rec in recs)


def test_stop_string_ends_text(tmp_path):
    base, _ = gen(tmp_path, [{"id": 1, "prompt": "The quick brown fox", "max_tokens": 12, "ignore_eos": True}])
    text = read_jsonl(tmp_path / "in.jsonl.out")[0]["text"]
    assert base.exit_code == 0 and len(text) > 3
    stop = text[2:4]  # a string the greedy text is known to contain
    r, recs = gen(tmp_path, [{"id": 1, "prompt": "The quick brown fox", "max_tokens": 12, "ignore_eos": True}],
                  "--stop", stop)
    assert r.exit_code == 0, r.stderr
    assert recs[0]["finish_reason"] == "stop" and recs[0]["text"] == text[: text.index(stop)]


def test_return_token_ids(tmp_path):
    r, recs = gen(tmp_path, [{"id": "x", "prompt": "hello"}], "--return-token-ids", "--ignore-eos")
    assert r.exit_code == 0, r.stderr
    assert len(recs[0]["token_ids"]) == recs[0]["usage"]["completion_tokens"] == 4
    assert all(isinstance(t, int) for t in recs[0]["token_ids"])


def test_greedy_text_matches_the_python_api(tmp_path):
    """The CLI tokenizes and submits prompts exactly as LLM.generate does (special tokens included)."""
    from flashgen import LLM, SamplingParams

    prompts = ["The quick brown fox", "naïve café 東京", "def f(x):"]
    r, recs = gen(tmp_path, [{"id": i, "prompt": p} for i, p in enumerate(prompts)], "--max-tokens", "6")
    assert r.exit_code == 0, r.stderr
    llm = LLM(tiny_model(), device="cpu", max_num_seqs=16)
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [rec["text"] for rec in recs] == [o.text for o in want]


def test_messages_and_chat_flag_use_the_chat_template(tmp_path):
    from flashgen.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model())
    msgs = [{"role": "user", "content": "hello there"}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
    lines = [{"id": "m", "messages": msgs}, {"id": "t", "prompt_token_ids": ids},
             {"id": "parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}]
    r, recs = gen(tmp_path, lines, "--max-tokens", "6")
    assert r.exit_code == 0, r.stderr
    assert recs[0]["text"] == recs[1]["text"] == recs[2]["text"]
    assert recs[0]["usage"]["prompt_tokens"] == len(ids)
    r2, recs2 = gen(tmp_path, [{"id": "c", "prompt": "hello there"}], "--max-tokens", "6", "--chat")
    assert r2.exit_code == 0 and recs2[0]["text"] == recs[0]["text"]


def test_field_takes_the_prompt_from_another_field(tmp_path):
    lines = [{"id": 1, "question": "The quick brown fox"}, {"id": 2, "other": "x"}, {"id": 3, "question": 5}]
    r, recs = gen(tmp_path, lines, "--field", "question")
    assert r.exit_code == ExitCode.LINE_ERRORS
    assert "text" in recs[0]
    assert recs[1]["error"]["code"] == "missing_prompt" and '"question"' in recs[1]["error"]["message"]
    assert recs[2]["error"]["code"] == "invalid_field" and "line 3" in recs[2]["error"]["message"]


def test_template_renders_fields_and_names_missing_ones(tmp_path):
    docs = [json.loads(line) for line in (PROMPTS / "documents.jsonl").read_text().splitlines()]
    lines = docs[:2] + [{"id": "no-question", "text": "some text"}]
    r, recs = gen(tmp_path, lines, "--template", PROMPTS / "qa.j2")
    assert r.exit_code == ExitCode.LINE_ERRORS
    assert "text" in recs[0] and "text" in recs[1]
    err = recs[2]["error"]
    assert recs[2]["id"] == "no-question" and err["code"] == "template_missing_field"
    assert 'field "question"' in err["message"] and "line 3" in err["message"] and "qa.j2" in err["message"]


def test_template_errors_are_fatal_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.j2"
    bad.write_text("{{ title ")
    r, _ = gen(tmp_path, [{"id": 1, "title": "x"}], "--template", bad)
    assert r.exit_code == ExitCode.FATAL and "bad.j2, line 1" in r.stderr
    r, _ = gen(tmp_path, [{"id": 1, "title": "x"}], "--template", tmp_path / "missing.j2")
    assert r.exit_code == ExitCode.FATAL and "missing.j2 does not exist" in r.stderr
    r, _ = gen(tmp_path, [{"id": 1}], "--template", bad, "--field", "title")
    assert r.exit_code == ExitCode.FATAL and "use one" in r.stderr


def test_order_completion_writes_each_line_once(tmp_path):
    lines = [{"id": i, "prompt": "hello", "max_tokens": 1 + (7 * i) % 6, "ignore_eos": True} for i in range(12)]
    r, recs = gen(tmp_path, lines, "--order", "completion", "--max-num-seqs", "4")
    assert r.exit_code == 0, r.stderr
    assert sorted(rec["id"] for rec in recs) == list(range(12))
    assert [rec["id"] for rec in recs] != list(range(12))  # short lines overtook long ones


def test_every_example_in_prompts_runs(tmp_path):
    cases = [("examples.jsonl", []), ("chat.jsonl", []), ("openai_batch.jsonl", []), ("token_ids.jsonl", []),
             ("documents.jsonl", ["--template", PROMPTS / "summarize.j2"]),
             ("documents.jsonl", ["--template", PROMPTS / "qa.j2", "--chat"])]
    for name, extra in cases:
        out = tmp_path / f"{name}.{len(extra)}.out"
        r = cli(["generate", PROMPTS / name, "-o", out, "--model", tiny_model(), *FAST, "--overwrite", *extra],
                cwd=tmp_path)
        assert r.exit_code == 0, (name, r.stderr)
        n_in = len((PROMPTS / name).read_text().splitlines())
        assert len(read_jsonl(out)) == n_in


def test_sampled_text_depends_on_seed_and_id_not_on_batching(tmp_path):
    """Each line gets a seed made from the job seed and its id, so an interrupted-then-resumed sampled job (other
    batches, other order) writes the same text as an uninterrupted one."""
    lines = [{"id": f"s{i}", "prompt": "hello there"} for i in range(6)]
    sample = ["--temperature", "1.0", "--max-tokens", "8"]
    _, a = gen(tmp_path, lines, *sample, "--max-num-seqs", "1")
    _, b = gen(tmp_path, lines[::-1], *sample, "--max-num-seqs", "16")
    texts = {r["id"]: r["text"] for r in a}
    assert texts == {r["id"]: r["text"] for r in b}
    assert len(set(texts.values())) > 1  # same prompt, different ids: different samples
    _, c = gen(tmp_path, lines, *sample, "--seed", "1")
    assert {r["id"]: r["text"] for r in c} != texts
