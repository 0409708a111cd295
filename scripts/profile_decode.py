"""Where a decode step's GPU time goes: run a `flashgen bench throughput` workload's first decode steps, then
profile 20 steps with torch.profiler and print the kernels by total CUDA time. Usage:
  PYTHONPATH=. python3 scripts/profile_decode.py [--workload nanovllm|latency8b] [--after STEPS]"""
import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from flashgen import LLM
from flashgen.bench.synthetic import write_model_dir
from flashgen.bench.throughput import make_workload

ap = argparse.ArgumentParser()
ap.add_argument("--workload", default="nanovllm")
ap.add_argument("--after", type=int, default=320)
a = ap.parse_args()
w = make_workload(a.workload)
with tempfile.TemporaryDirectory() as d:
    llm = LLM(model=str(write_model_dir(w.shape, d)), load_format="dummy", dtype="bfloat16")
    for i, (p, sp) in enumerate(zip(w.prompts, w.sampling_params(), strict=True)):
        llm.add_request(str(i), p, sp)
    for _ in range(a.after):
        llm.step()
    torch.cuda.synchronize()
    running = llm.engine.scheduler.running
    ctx = sum(len(s) for s in running)
    kv = llm.engine.spec.kv_bytes_per_token(torch.bfloat16) * ctx
    print(f"{a.workload} after {a.after} steps: {len(running)} running sequences, {ctx} context tokens, "
          f"KV {kv / 1e9:.2f} GB per step ({kv / 1e9 / llm.engine.spec.num_layers * 1e3:.1f} MB per layer)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    from flashgen.ops import cuda_ops

    print("linear plans (rows, N, K, weight dtype): time per call and weight bytes per second, cuBLAS and skinny "
          "(warps, unroll)")
    for key, times in sorted(cuda_ops.LINEAR_TIMES.items(), key=lambda kv: (kv[0][2:5], str(kv[0]))):
        w = key[3] * key[4] * key[1].itemsize  # bf16/fp16 weights, or FP8 (linear_fp8_plan)
        print(f"  {(*key[2:5], str(key[1]).removeprefix('torch.'))}: "
              + ", ".join(f"{k}: {v * 1e6:.1f} us ({w / v / 1e12:.2f} TB/s)" for k, v in times.items()))
