"""Host time of two per-request costs on the engine's thread, on the CPU (no GPU needed):

- admission: Engine.add_request of token-id prompts shaped like the extract job's (a shared 1,000-token
  instruction plus 50-300 tokens), microseconds per request;
- detokenization: a sequence's text built token by token (detokenizer.detokenize_step, the path of requests with
  stop strings) against decoded once at the end (detokenizer.decode_output, every other request), microseconds per
  generated token, with a real BPE tokenizer.

    PYTHONPATH=. python3 tools/probes/host_cost_probe.py TOKENIZER_DIR

Run it in two trees to compare a change with its base (the same machine, one after the other).
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from flashgen import LLM, SamplingParams  # noqa: E402
from flashgen.engine import detokenizer  # noqa: E402
from flashgen.engine.sequence import Sequence  # noqa: E402
from flashgen.tokenizer import Tokenizer  # noqa: E402


def admission_us(n: int = 400) -> float:
    from test_cli_support import tiny_model

    llm = LLM(model=tiny_model(), device="cpu", kv_cache_gb=0.5, max_num_seqs=256)
    rng = random.Random(0)
    shared = [rng.randrange(3, 250) for _ in range(1000)]
    prompts = [shared + [rng.randrange(3, 250) for _ in range(rng.randrange(50, 300))] for _ in range(n)]
    sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        llm.add_request(f"r{i}", p, sp)
    return (time.perf_counter() - t0) / n * 1e6


def detok_us(tokenizer_dir: str, seqs: int = 256, tokens: int = 100, vocab: int = 49152) -> tuple[float, float | None]:
    """(token by token, decoded once at the end) microseconds per generated token, random ids below `vocab` (the
    embedded SmolLM2's vocabulary); None where this tree has no decode_output."""
    tok = Tokenizer(tokenizer_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(50)] for _ in range(seqs)]
    outs = [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(seqs)]
    sp = SamplingParams(max_tokens=tokens)
    ss = [Sequence(f"r{i}", None, p, sp, 64, 0) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    for j in range(tokens):
        for s, o in zip(ss, outs, strict=True):
            detokenizer.detokenize_step(tok, s, o[j])
    inc = (time.perf_counter() - t0) / (seqs * tokens) * 1e6
    if not hasattr(detokenizer, "decode_output"):
        return inc, None
    ss = [Sequence(f"r{i}", None, p, sp, 64, 0) for i, p in enumerate(prompts)]
    for s, o in zip(ss, outs, strict=True):
        s.token_ids.extend(o)
    t0 = time.perf_counter()
    for s in ss:
        detokenizer.decode_output(tok, s, len(s.token_ids))
    return inc, (time.perf_counter() - t0) / (seqs * tokens) * 1e6


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    a = admission_us()
    inc, once = detok_us(sys.argv[1])
    print(f"add_request, 1,050-1,300-token id prompts: {a:.0f} us per request")
    print(f"detokenization: token by token {inc:.2f} us per token; decoded once at the end "
          + (f"{once:.2f} us per token" if once is not None else "n/a (not in this tree)"))


if __name__ == "__main__":
    main()
