"""How a job's steps are shaped when its lines stop at different places: the engine's Scheduler alone (no model,
no GPU) runs a `flashgen bench jobs` workload's shape (extract: 4,000 lines of a shared 1,000-token instruction plus
a 50-300-token document; synth and summarize: their prompt lengths, no shared part) with every line generating the
workload's max_tokens (--lengths fixed) and with each line its own (--lengths spread, an eighth of it to all of it,
as EOS would end them), each admitting as soon as a slot is free (admit_min_free 0, the old policy) and with the
scheduler's default hold-back (Scheduler.admit_min_free, $FLASHGEN_ADMIT_MIN_FREE), then with spread limits at each
N given. It counts decode and prefill steps and the prefill steps' sizes. Each step that finishes a line frees its
slot and blocks; a prompt is admitted when the scheduler would admit it, as in Engine.step (run-ahead and sampling
are not modelled; prompt tokens are random ids, the chat template left out).

    PYTHONPATH=. python3 tools/probes/admission_steps_probe.py [--workload W] [--lines N] [--min-free N ...]
        [--prompt-tokens P --max-tokens M] [--kv-blocks K]

--prompt-tokens and --max-tokens replace the workload's lines by P-token prompts generating M tokens (spread: M / 8
to M), e.g. TensorRT-LLM's 1000/1000 rows; --kv-blocks sets the cache (64-token blocks; default 60,000, more than
these jobs need), e.g. 6,693 for the 8B shape's cache on an H100: a KV-bound batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import random

from flashgen.bench.jobs import WORKLOADS, output_lengths
from flashgen.config import EngineConfig
from flashgen.engine.scheduler import Scheduler
from flashgen.engine.sequence import Sequence
from flashgen.sampling_params import SamplingParams


def steps(workload: str, lines: int, lengths: str, min_free: int | None = None, num_blocks: int = 60_000,
          prompt_tokens: int | None = None, max_tokens: int | None = None) -> dict:
    """The step counts of one run; `min_free` None keeps the scheduler's default; `prompt_tokens` and
    `max_tokens` replace the workload's line shape."""
    w = WORKLOADS[workload]
    if prompt_tokens is not None:
        w = dataclasses.replace(w, instruction_tokens=0, text_tokens=(prompt_tokens, prompt_tokens),
                                max_tokens=max_tokens or w.max_tokens)
    cfg = EngineConfig(model="unused")
    sched = Scheduler(cfg, num_blocks, max_model_len=8192)
    if min_free is not None:
        sched.admit_min_free = min_free
    rng = random.Random(0)
    shared = [rng.randrange(3, 40_000) for _ in range(w.instruction_tokens)]
    limit = {}
    for i, m in enumerate(output_lengths(w, lines, lengths)):
        ids = shared + [rng.randrange(3, 40_000) for _ in range(rng.randint(*w.text_tokens))]
        seq = Sequence(f"r{i}", None, ids, SamplingParams(max_tokens=m, ignore_eos=True), cfg.block_size, 0)
        limit[seq.seq_id] = m
        sched.add(seq)
    prefill: list[int] = []
    decode_rows: list[int] = []
    while sched.has_unfinished():
        batch = sched.schedule()
        if batch is None:
            raise RuntimeError("the scheduler stalled")
        sched.commit(batch)
        if batch.is_prefill:
            prefill.append(batch.num_tokens)
            sampled = [s for s in batch.seqs if s.num_computed_tokens >= s.num_tokens]
        else:
            decode_rows.append(len(batch.seqs))
            sampled = batch.seqs
        for seq in sampled:
            seq.token_ids.append(5)
            if seq.num_tokens - seq.num_prompt_tokens >= limit[seq.seq_id]:
                sched.finish(seq, seq.num_tokens)
    return {"decode_steps": len(decode_rows), "mean_decode_batch": sum(decode_rows) / len(decode_rows),
            "prefill_steps": len(prefill), "small_prefill_steps": sum(t < 2048 for t in prefill),
            "mean_prefill_tokens": sum(prefill) / len(prefill), "min_free": sched.admit_min_free,
            "preemptions": sched.num_preemptions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="extract", choices=tuple(WORKLOADS))
    ap.add_argument("--lines", type=int, default=4000)
    ap.add_argument("--min-free", type=int, nargs="*", default=[16, 32])
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--kv-blocks", type=int, default=60_000)
    a = ap.parse_args()
    shape = (f"{a.prompt_tokens}/{a.max_tokens or WORKLOADS[a.workload].max_tokens} tokens" if a.prompt_tokens
             else f"{a.workload}'s shape")
    print(f"{shape}, {a.lines:,} lines, {a.kv_blocks:,} KV blocks, max_num_seqs {EngineConfig.max_num_seqs}, "
          f"max_num_batched_tokens {EngineConfig.max_num_batched_tokens:,}")
    runs = [(lengths, n) for lengths in ("fixed", "spread") for n in (0, None)]
    for lengths, n in runs + [("spread", n) for n in a.min_free]:
        r = steps(a.workload, a.lines, lengths, n, a.kv_blocks, a.prompt_tokens, a.max_tokens)
        held = "admitting at once" if n == 0 else f"admitted at {r['min_free']} free slots" + (
            " (the default)" if n is None else "")
        print(f"  --lengths {lengths:<6} {held}: {r['decode_steps']:,} decode steps "
              f"(mean batch {r['mean_decode_batch']:.0f}), {r['prefill_steps']:,} prefill steps of "
              f"{r['mean_prefill_tokens']:,.0f} tokens on average, {r['small_prefill_steps']:,} under 2,048 tokens, "
              f"{r['preemptions']} preemptions")


if __name__ == "__main__":
    main()
