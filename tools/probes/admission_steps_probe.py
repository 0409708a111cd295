"""How a job's steps are shaped when its lines stop at different places: the engine's Scheduler alone (no model,
no GPU) runs the extract job's shape, 4,000 lines of a shared 1,000-token instruction plus a 50-300-token document,
once with every line generating the workload's 64 tokens (`flashgen bench jobs`' default, --lengths fixed) and once
with each line its own max_tokens (--lengths spread: 8 to 64, as EOS would end them), and counts its decode and
prefill steps and the prefill steps' sizes; then, with spread limits, with admission held back until N sequence
slots are free (Scheduler.admit_min_free, $FLASHGEN_ADMIT_MIN_FREE), for each N given. Each step that finishes a
line frees its slot and blocks; a prompt is admitted when the scheduler would admit it, as in Engine.step (run-ahead
and sampling are not modelled).

    PYTHONPATH=. python3 tools/probes/admission_steps_probe.py [LINES [N ...]]
"""
from __future__ import annotations

import random
import sys

from flashgen.bench.jobs import WORKLOADS, output_lengths
from flashgen.config import EngineConfig
from flashgen.engine.scheduler import Scheduler
from flashgen.engine.sequence import Sequence
from flashgen.sampling_params import SamplingParams


def steps(lines: int, lengths: str, min_free: int = 0, num_blocks: int = 60_000) -> dict:
    w = WORKLOADS["extract"]
    cfg = EngineConfig(model="unused")
    sched = Scheduler(cfg, num_blocks, max_model_len=8192)
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
            "mean_prefill_tokens": sum(prefill) / len(prefill)}


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    min_free = [int(a) for a in sys.argv[2:]] or [16, 32, 64]
    print(f"extract's shape, {lines:,} lines, max_num_seqs {EngineConfig.max_num_seqs}, "
          f"max_num_batched_tokens {EngineConfig.max_num_batched_tokens:,}")
    for lengths, n in [("fixed", 0), ("spread", 0)] + [("spread", n) for n in min_free]:
        r = steps(lines, lengths, n)
        held = f", admitted at {n} free slots" if n else ""
        print(f"  --lengths {lengths:<6}{held}: {r['decode_steps']:,} decode steps "
              f"(mean batch {r['mean_decode_batch']:.0f}), "
              f"{r['prefill_steps']:,} prefill steps of {r['mean_prefill_tokens']:,.0f} tokens on average, "
              f"{r['small_prefill_steps']:,} of them under 2,048 tokens")


if __name__ == "__main__":
    main()
