"""Structured outputs on the GPU: the CUDA path (fused sampling kernel reading the bitmask, pipelined decode,
CUDA graphs) with a tiny random checkpoint. Every generated token must be allowed by an independent llguidance
matcher, no request may fail, and outputs that end on their own must be complete (JSON parses, a choice, a
regex match). The CPU suite (tests/test_structured_outputs.py) checks the same with jsonschema."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU; none is visible", allow_module_level=True)

llguidance = pytest.importorskip("llguidance")


def test_constrained_batch_on_the_cuda_path(tmp_path):
    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams, StructuredOutputsParams
    from structured_schemas import CHOICES, REGEXES, SCHEMAS

    d = make_checkpoint(tmp_path / "m", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                        intermediate_size=256, vocab_size=512)
    llm = LLM(model=str(d), dtype="bfloat16", kv_cache_gb=0.25, max_num_seqs=64)
    runner = llm.engine.runner
    assert runner.backend == "cuda" and runner.async_capable and runner.graphs is not None
    cases = [("json", StructuredOutputsParams(json=s)) for s in SCHEMAS.values()]
    cases += [("regex:" + r, StructuredOutputsParams(regex=r)) for r in REGEXES.values()]
    cases += [("choice", StructuredOutputsParams(choice=c)) for c in CHOICES.values()]
    prompts, params, kinds = [], [], []
    for t in (0.0, 1.0):
        for i, (kind, so) in enumerate(cases):
            prompts.append(f"Record {i}:")
            params.append(SamplingParams(temperature=t, seed=i, max_tokens=192, structured_outputs=so))
            kinds.append((kind, so))
        for i in range(8):  # unconstrained neighbours in the same batches
            prompts.append(f"Free {i}:")
            params.append(SamplingParams(temperature=t, seed=i, max_tokens=64, ignore_eos=True))
            kinds.append(None)
    outs = llm.generate(prompts, params)

    tok = llguidance.LLTokenizer((d / "tokenizer.json").read_text(), n_vocab=512, eos_token=[0, 2])
    stopped = 0
    for out, kind in zip(outs, kinds, strict=True):
        assert out.finish_reason in ("stop", "length"), (out.finish_reason, out.error)
        if kind is None:
            assert len(out.token_ids) == 64
            continue
        name, so = kind
        from flashgen.engine.grammar import grammar_text

        m = llguidance.LLMatcher(tok, grammar_text(so), log_level=0)
        assert m.consume_tokens(out.token_ids), (name, out.text, m.get_error())
        if out.finish_reason != "stop":
            continue
        stopped += 1
        if name == "json":
            json.loads(out.text)
        elif name == "choice":
            assert out.text in so.choice
        else:
            assert re.fullmatch(so.regex, out.text), (so.regex, out.text)
    # random weights wander (free whitespace in JSON): most, not all, requests end on their own
    assert stopped >= 0.6 * sum(k is not None for k in kinds)
    assert llm.engine.runner.masks.rows > 0
