"""Where a throughput workload's GPU time goes, kernel by kernel: torch.profiler over one generate() of the
workload (CUDA-graph replays included: the profiler sees the kernels of a replayed graph), kernels summed by
name, the top ones printed with their share of the kernels' total and of the wall time, and how much of the
wall the GPU was busy at all (the rest: launch gaps and the host).

    PYTHONPATH=. python3 tools/probes/step_profile_probe.py WORKLOAD [--quantization fp8] [--kv-cache-dtype fp8]
        [--requests N] [--top K]

--requests N keeps the workload's first N requests (a shorter profile of the same shape).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from flashgen import LLM, SamplingParams
from flashgen.bench.synthetic import write_model_dir
from flashgen.bench.throughput import make_workload


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    w = make_workload(a.workload)
    n = a.requests or len(w.prompts)
    prompts, params = w.prompts[:n], w.sampling_params()[:n]
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(model=str(write_model_dir(w.shape, d)), load_format="dummy", dtype="bfloat16",
                  quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype)
        llm.generate([[(t + 1) % 10007 + 10001 for t in prompts[0]]], SamplingParams(max_tokens=4, ignore_eos=True))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        llm.close()
    ntok = sum(len(o.token_ids) for o in outs)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            by_name[ev.name][0] += ev.time_range.elapsed_us() / 1e6
            by_name[ev.name][1] += 1
            intervals.append((ev.time_range.start, ev.time_range.end))
    total = sum(v[0] for v in by_name.values())
    busy = busy_seconds(intervals)
    print(f"workload {a.workload} ({n} requests, quantization={a.quantization}, kv_cache_dtype={a.kv_cache_dtype}):"
          f" {ntok} tokens in {wall:.3f} s = {ntok / wall:,.1f} tok/s under the profiler")
    print(f"GPU kernels {total:.3f} s in all, GPU busy {busy:.3f} s = {100 * busy / wall:.0f}% of the wall")
    print(f"{'kernel':<70}{'calls':>8}{'ms':>10}{'us/call':>9}{'of kernels':>11}")
    for name, (sec, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{name[:69]:<70}{calls:>8}{sec * 1e3:>10.1f}{sec / calls * 1e6:>9.1f}{100 * sec / total:>10.1f}%")


if __name__ == "__main__":
    main()
