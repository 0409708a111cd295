"""Garbage-collector passes while a job runs its lines (`flashgen bench jobs` on the CPU with the tiny model, the
extract workload at a given share of its lines; from the run loop's start, so start-up is left out): how many of
each generation, their seconds in all and the longest. The
oldest generation's passes walk every tracked object, and on the job's thread the engine launches nothing while
one runs (flashgen.engine.gc_heap). Runs on any CPU.

    PYTHONPATH=. python3 tools/probes/gc_pause_probe.py TOKENIZER_DIR [SCALE]
"""
from __future__ import annotations

import gc
import sys
import time
from collections import Counter


def main() -> None:
    tokenizer = sys.argv[1]
    scale = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    passes: Counter = Counter()
    seconds: Counter = Counter()
    longest = [0.0, -1]
    started = [0.0]
    running = [False]

    def on_gc(phase: str, info: dict) -> None:
        if not running[0]:
            return
        if phase == "start":
            started[0] = time.perf_counter()
            return
        d = time.perf_counter() - started[0]
        g = info["generation"]
        passes[g] += 1
        seconds[g] += d
        if d > longest[0]:
            longest[:] = [d, g]

    from flashgen.bench import jobs
    from flashgen.jobs.runner import Runner

    run = Runner.run

    def timed_run(self, *a, **k):  # only marks the run loop's start: the job code runs unchanged
        running[0] = True
        return run(self, *a, **k)

    Runner.run = timed_run  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    try:
        jobs.main("extract", scale, device="cpu", shape="tiny", tokenizer=tokenizer)
    finally:
        gc.callbacks.remove(on_gc)
    by = ", ".join(f"generation {g}: {passes[g]} passes, {seconds[g] * 1e3:.0f} ms" for g in sorted(passes))
    print(f"collector while the lines ran: {by}; the longest {longest[0] * 1e3:.1f} ms (generation {longest[1]}); "
          f"{len(gc.get_objects()):,} tracked objects at the end, {gc.get_freeze_count():,} frozen")


if __name__ == "__main__":
    main()
