"""Engine vs HF transformers on tiny random checkpoints (float32, CPU): logits and greedy tokens."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams

# (arch, kwargs): every family, GQA 1/3/4, head_dim 64/128, tied and untied, rope scaling, bias, q/k norm
CASES = {
    "llama-gqa1-d64": ("llama", dict(num_heads=2, num_kv_heads=2, head_dim=64)),
    "llama-gqa3-d64-llama3rope": ("llama", dict(hidden_size=192, num_heads=6, num_kv_heads=2, head_dim=64,
                                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 64})),
    "llama-gqa4-d128-tied-linear": ("llama", dict(num_heads=4, num_kv_heads=1, head_dim=128, tie_word_embeddings=True,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-gqa4-d64": ("mistral", dict(num_heads=4, num_kv_heads=1, head_dim=64)),
    "qwen2-gqa1-d64-bias": ("qwen2", dict(hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64)),
    "qwen2-gqa4-d64-tied": ("qwen2", dict(hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=64,
                                          tie_word_embeddings=True)),
    "qwen3-gqa3-d128-tied-qknorm": ("qwen3", dict(hidden_size=192, num_heads=3, num_kv_heads=1, head_dim=128,
                                                  tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare against ignore_eos: HF must neither stop nor mask EOS
    return path, hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def prompts_of(lengths, seed=0, vocab=500):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_prefill_logits_match_hf(ckpt):
    path, hf = ckpt
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=16)
    for ids in prompts_of([1, 97, 300], seed=1):
        ours = llm.prompt_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-4


def test_decode_logits_match_hf(ckpt):
    path, hf = ckpt
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=16)
    seen: list[torch.Tensor] = []
    llm.engine.runner.on_logits = lambda seqs, logits: seen.append(logits[0].float().clone())
    ids = prompts_of([29], seed=2)[0]  # 29 + 12 tokens cross the 32-token block boundary
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    full = ids + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0].float()
    assert len(seen) == 12
    for k, logits in enumerate(seen):
        assert rel_err(logits, ref[len(ids) - 1 + k]) <= 1e-4, f"decode step {k}"


@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_matches_hf_generate(ckpt, block_size):
    path, hf = ckpt
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=block_size)
    prompts = prompts_of([1, 7, 97, 300], seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 32), f"prompt of {len(ids)} tokens"
        assert out.finish_reason == "length" and len(out.token_ids) == 32
