"""Whether the engine runs a job faster in a process of its own, away from the job's Python threads (the reader,
the preparation thread, the writer): one `flashgen bench jobs` workload with the engine in the job's process as
today (`inproc`), or in one spawned engine process (`process`: the data-parallel front with one worker, so the job's
process only prepares lines and writes records, and the engine's process holds its own GIL). The process run
has no GPU lines in its report (its engine is in the other process) and its start-up includes the spawn; compare
the whole job and its time after start-up within one call.

    PYTHONPATH=. python3 tools/probes/engine_process_probe.py inproc|process SCALE [--workload W] \
        [--tokenizer DIR] [--cpu]
"""
from __future__ import annotations

import argparse

from flashgen.bench import jobs
from flashgen.engine import data_parallel
from flashgen.jobs import generate


def _one_engine_process(model, engine: dict, data_parallel_n: str = "1"):
    from flashgen.config import EngineConfig
    from flashgen.llm import resolve_model_name

    return data_parallel.DataParallelLLM(EngineConfig(model=resolve_model_name(model), **engine), 1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("inproc", "process"))
    ap.add_argument("scale", type=float)
    ap.add_argument("--workload", default="extract")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--cpu", action="store_true", help="a smoke run on the CPU (tiny shape, no floor)")
    a = ap.parse_args()
    if a.mode == "process":
        generate._load_model = _one_engine_process  # type: ignore[assignment]
    jobs.main(a.workload, a.scale, a.tokenizer, **({"device": "cpu", "shape": "tiny"} if a.cpu else {}))
