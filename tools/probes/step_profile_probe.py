"""Where a throughput workload's GPU time goes, kernel by kernel: torch.profiler over one generate() of the
workload (CUDA-graph replays included: the profiler sees the kernels of a replayed graph), kernels summed by
name, the top ones printed with their share of the kernels' total and of the wall time, and how much of the
wall the GPU was busy at all (the rest: launch gaps and the host).

    PYTHONPATH=. python3 tools/probes/step_profile_probe.py WORKLOAD [--quantization fp8] [--kv-cache-dtype fp8]
        [--requests N] [--max-num-seqs S] [--top K]

--requests N keeps the workload's first N requests (a shorter profile of the same shape).

A JSONL job of flashgen/bench/jobs.py (extract, synth, summarize), start-up included, the same way:

    PYTHONPATH=. python3 tools/probes/step_profile_probe.py --job extract --scale 0.05 --tokenizer DIR
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from unittest import mock

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


def report(prof, wall: float, top: int) -> None:
    """The kernels' GPU time by name (top ones), and the share of the wall the GPU was busy at all."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            by_name[ev.name][0] += ev.time_range.elapsed_us() / 1e6
            by_name[ev.name][1] += 1
            intervals.append((ev.time_range.start, ev.time_range.end))
    total = sum(v[0] for v in by_name.values())
    busy = busy_seconds(intervals)
    print(f"GPU kernels {total:.3f} s in all, GPU busy {busy:.3f} s = {100 * busy / wall:.0f}% of the wall")
    print(f"{'kernel':<70}{'calls':>8}{'ms':>10}{'us/call':>9}{'of kernels':>11}")
    for name, (sec, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{name[:69]:<70}{calls:>8}{sec * 1e3:>10.1f}{sec / calls * 1e6:>9.1f}{100 * sec / total:>10.1f}%")


def profile_job(job: str, scale: float, tokenizer: str | None, top: int, cpu: bool = False) -> None:
    """flashgen/bench/jobs.py's job under the profiler (its own report first: where the wall went). `cpu`: a smoke
    run of the probe itself on the CPU (tiny shape, no GPU kernels to report)."""
    from flashgen.bench import jobs, throughput

    kw = {"device": "cpu", "shape": "tiny"} if cpu else {}
    # a tiny job first: a fresh machine compiles the kernels on its first start
    jobs.main("extract", 0.005, tokenizer, **kw)
    acts = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    # the job's report measures the GPU's ceilings (a copy and a bf16 8192^3 matmul, ~1.5 ms a call) before it
    # starts: measured here once, outside the profile, so that they are not counted among the job's kernels
    ceil = None if cpu else throughput.measure_ceilings()
    with mock.patch.object(throughput, "measure_ceilings", lambda: ceil), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        jobs.main(job, scale, tokenizer, **kw)
        if not cpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"job {job} at scale {scale}: {wall:.3f} s under the profiler, start-up included")
    report(prof, wall, top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", nargs="?", default=None)
    ap.add_argument("--job", default=None, help="a flashgen.bench.jobs workload instead of a throughput one")
    ap.add_argument("--scale", type=float, default=0.05, help="--job: the share of the job's lines")
    ap.add_argument("--tokenizer", default=None, help="--job: tokenizer directory (default: the embedded model's)")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="the engine's sequence slots (default: its own)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu", action="store_true", help="--job: a smoke run of the probe on the CPU")
    a = ap.parse_args()
    if (a.workload is None) == (a.job is None):
        ap.error("give a throughput WORKLOAD or --job JOB")
    if a.job is not None:
        profile_job(a.job, a.scale, a.tokenizer, a.top, a.cpu)
        return
    w = make_workload(a.workload)
    n = a.requests or len(w.prompts)
    prompts, params = w.prompts[:n], w.sampling_params()[:n]
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(model=str(write_model_dir(w.shape, d)), load_format="dummy", dtype="bfloat16",
                  quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype,
                  **({"max_num_seqs": a.max_num_seqs} if a.max_num_seqs else {}))
        llm.generate([[(t + 1) % 10007 + 10001 for t in prompts[0]]], SamplingParams(max_tokens=4, ignore_eos=True))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        llm.close()
    ntok = sum(len(o.token_ids) for o in outs)
    print(f"workload {a.workload} ({n} requests, quantization={a.quantization}, kv_cache_dtype={a.kv_cache_dtype}):"
          f" {ntok} tokens in {wall:.3f} s = {ntok / wall:,.1f} tok/s under the profiler")
    report(prof, wall, a.top)


if __name__ == "__main__":
    main()
