"""Where a workload's wall time goes, step by step, against each step's own floor.

Runs a `flashgen bench throughput` workload through LLM.add_request/step, records every step's wall time, kind and
batch, and prints the time by step kind and decode batch size next to the floor of those steps (weights + live KV bytes
over the copy bandwidth for a decode step; 2 * params FLOPs per prompt token over the matmul rate for a
prefill step), both ceilings measured in the same process. Usage:
  PYTHONPATH=. python3 scripts/step_timeline.py [--workload nanovllm|latency8b|fixed512] [--json FILE]"""
import argparse
import json
import math
import tempfile
import time

import torch

from flashgen import LLM, SamplingParams
from flashgen.bench.synthetic import write_model_dir
from flashgen.bench.throughput import make_workload, measure_ceilings
from flashgen.models.loader import expected_shapes

BINS = [(1, 1), (2, 16), (17, 64), (65, 128), (129, 192), (193, 256)]


def main(workload: str, json_path: str | None) -> None:
    w = make_workload(workload)
    ceil = measure_ceilings()
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(model=str(write_model_dir(w.shape, d)), load_format="dummy", dtype="bfloat16")
        spec = llm.engine.spec
        weight_bytes = 2 * sum(math.prod(s) for s in expected_shapes(spec).values())
        kv_tok = spec.kv_bytes_per_token(torch.bfloat16)
        runner = llm.engine.runner
        launched = []
        orig = runner.launch

        def launch(seqs, is_prefill):
            ctx = sum(s.num_computed_tokens + s.num_scheduled_tokens if is_prefill else len(s) for s in seqs)
            new = sum(s.num_scheduled_tokens for s in seqs) if is_prefill else len(seqs)
            launched.append((is_prefill, len(seqs), ctx, new))
            return orig(seqs, is_prefill)

        runner.launch = launch
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        launched.clear()
        for i, (p, sp) in enumerate(zip(w.prompts, w.sampling_params(), strict=True)):
            llm.add_request(str(i), p, sp)
        steps = []
        torch.cuda.synchronize()
        t_start = time.perf_counter()
        while llm.has_unfinished_requests():
            n = len(launched)
            t0 = time.perf_counter()
            llm.step()
            dt = time.perf_counter() - t0
            steps.append((dt, launched[n] if len(launched) > n else None))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t_start
    bw, fl = ceil["copy_bytes_per_s"], ceil["matmul_flop_per_s"]
    rows = {}

    def add(key, dt, floor, tokens):
        r = rows.setdefault(key, [0, 0.0, 0.0, 0])
        r[0] += 1
        r[1] += dt
        r[2] += floor
        r[3] += tokens

    for dt, info in steps:
        if info is None:
            add("drain (read last tokens)", dt, 0.0, 0)
            continue
        is_prefill, B, ctx, new = info
        if is_prefill:
            add("prefill", dt, 2 * (weight_bytes / 2) * new / fl, 0)
        else:
            lo, hi = next(b for b in BINS if b[0] <= B <= b[1])
            add(f"decode B {lo}-{hi}", dt, (weight_bytes + kv_tok * ctx) / bw, B)
    print(f"workload {workload}: {len(steps)} steps, wall {wall:.3f} s; copy {bw / 1e12:.2f} TB/s, "
          f"matmul {fl / 1e12:.0f} TFLOP/s")
    print(f"{'steps':<26}{'count':>7}{'wall s':>9}{'floor s':>9}{'% floor':>9}{'ms/step':>9}{'tokens':>9}")
    for key in sorted(rows, key=lambda k: (not k.startswith("prefill"), k)):
        n, t, f, tok = rows[key]
        pct = f"{100 * f / t:.0f}%" if f else "-"
        print(f"{key:<26}{n:>7}{t:>9.3f}{f:>9.3f}{pct:>9}{1e3 * t / n:>9.3f}{tok:>9}")
    tot_f = sum(r[2] for r in rows.values())
    print(f"{'total':<26}{len(steps):>7}{wall:>9.3f}{tot_f:>9.3f}{100 * tot_f / wall:>8.0f}%")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"workload": workload, "wall_s": wall, "ceilings": ceil, "rows": rows,
                       "steps": [(dt, info) for dt, info in steps]}, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="nanovllm")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    main(a.workload, a.json)
