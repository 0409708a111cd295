"""Where a constrained decode step's host time goes, and whether matchers deep-copied from one compiled grammar
(they share llguidance's lexer cache) fill masks slower than matchers built each on their own.

Runs bench/structured.py's one-schema case (2,048 requests, Qwen3-0.6B shape, random weights) in three ways on
one engine: deep copies (the engine's way), a matcher built from the grammar per request, and deep copies with a
4-thread mask executor; then the unconstrained baseline of the same lengths. For each: tok/s and the host time
in reading tokens + detokenizing (Engine._process), filling masks and launching the sampling.
    PYTHONPATH=. python3 tools/probes/structured_mask_probe.py TOKENIZER_DIR
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import llguidance
import torch

from flashgen import LLM, SamplingParams, StructuredOutputsParams
from flashgen.bench import structured as st
from flashgen.bench.throughput import timed_generate
from flashgen.engine import engine as engine_mod
from flashgen.engine import grammar as G
from flashgen.engine import model_runner as mr

TIMES: dict[str, float] = {}


def timed(cls, name: str, key: str) -> None:
    real = getattr(cls, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            TIMES[key] = TIMES.get(key, 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)


def main(tokenizer_dir: str) -> None:
    timed(engine_mod.Engine, "_process", "process")
    timed(G.TokenMasks, "fill", "masks")
    timed(mr.ModelRunner, "complete", "complete")
    timed(mr.ModelRunner, "launch", "launch")
    rng = random.Random(0)
    n = st.N_REQUESTS
    lengths = [rng.randint(100, 600) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(model=str(st.model_dir(d, Path(tokenizer_dir))), load_format="dummy", dtype="bfloat16")
        vocab = llm.engine.spec.vocab_size
        so = StructuredOutputsParams(json=st.SCHEMA)
        llm.generate([[1] * 600], SamplingParams(max_tokens=4, structured_outputs=so))
        grammars = llm.engine.grammars()
        deep = G.Grammars.matcher

        def fresh(self, s):
            deep(self, s)  # validates and counts
            return llguidance.LLMatcher(self.tokenizer, G.grammar_text(s), log_level=0)

        n_out = None
        for name in ("deep copies", "fresh matchers", "deep copies, 4 mask threads"):
            G.Grammars.matcher = fresh if name == "fresh matchers" else deep
            llm.engine.runner.masks.executor = llguidance.LLExecutor(4 if "4 mask" in name else None)
            TIMES.clear()
            sps = [SamplingParams(temperature=0.6, seed=i, max_tokens=st.MAX_TOKENS, structured_outputs=so)
                   for i in range(n)]
            t, outs = timed_generate(llm, st.random_prompts(rng, lengths, vocab), sps)
            n_out = [len(o.token_ids) for o in outs]
            print(f"{name}: {sum(n_out) / t:,.0f} tok/s in {t:.2f} s; host: " +
                  ", ".join(f"{k} {v:.2f} s" for k, v in TIMES.items()), flush=True)
        G.Grammars.matcher = deep
        TIMES.clear()
        base = [SamplingParams(temperature=0.6, seed=i, max_tokens=m, ignore_eos=True) for i, m in enumerate(n_out)]
        t, _ = timed_generate(llm, st.random_prompts(rng, lengths, vocab), base)
        print(f"unconstrained, same lengths: {sum(n_out) / t:,.0f} tok/s in {t:.2f} s; host: " +
              ", ".join(f"{k} {v:.2f} s" for k, v in TIMES.items()), flush=True)
        del grammars
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
