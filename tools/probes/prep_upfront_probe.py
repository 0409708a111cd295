"""Whether the job's input preparation, running on its thread beside the engine, slows the engine's steps: one
`flashgen bench jobs` workload run with the preparation thread as the job runs it (`normal`), with every line
prepared before the engine's first step (`upfront`: nothing is prepared beside the engine; the preparation's
time then lands in start-up), or with a shorter interpreter switch interval (`switchSECONDS`, e.g. switch0.0005).
Compare the report's GPU lines (decode and prefill steps' spans, the idle between steps) within one call.

    PYTHONPATH=. python3 tools/probes/prep_upfront_probe.py normal|upfront|switchS SCALE MAX_NUM_SEQS \
        [--workload W] [--tokenizer DIR] [--cpu]
"""
from __future__ import annotations

import argparse
import sys
import time

import flashgen.jobs.runner as runner
from flashgen.bench import jobs
from flashgen.jobs.source import EOF, Prepared


class Upfront(Prepared):
    """Prepared with no bound on what it holds, returning only once every line is prepared."""

    def __init__(self, source, prepare, ahead, group=32):
        super().__init__(source, prepare, 10**9, group)
        t = time.perf_counter()
        while True:
            with self._cv:
                if self._ready and self._ready[-1] is EOF:
                    break
            time.sleep(0.01)
        print(f"prepared every line first: {time.perf_counter() - t:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", help="normal, upfront, or switchSECONDS")
    ap.add_argument("scale", type=float)
    ap.add_argument("max_num_seqs", type=int)
    ap.add_argument("--workload", default="extract")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--cpu", action="store_true", help="a smoke run on the CPU (tiny shape, no floor)")
    a = ap.parse_args()
    if a.mode == "upfront":
        runner.Prepared = Upfront  # type: ignore[misc]
    elif a.mode.startswith("switch"):
        sys.setswitchinterval(float(a.mode[len("switch"):]))
    elif a.mode != "normal":
        raise SystemExit(f"mode {a.mode!r}: use normal, upfront or switchSECONDS")
    kw = {"device": "cpu", "shape": "tiny"} if a.cpu else {}
    jobs.main(a.workload, a.scale, a.tokenizer, max_num_seqs=a.max_num_seqs, **kw)
