"""Where a decode step's GPU time goes: run the nanovllm workload's first 300 decode steps, then profile 20
steps with torch.profiler and print the kernels by total CUDA time. Usage:
  PYTHONPATH=. python3 scripts/profile_decode.py"""
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from flashgen import LLM, SamplingParams
from flashgen.bench.synthetic import write_model_dir
from flashgen.bench.throughput import make_workload

w = make_workload("nanovllm")
with tempfile.TemporaryDirectory() as d:
    llm = LLM(model=str(write_model_dir(w.shape, d)), load_format="dummy", dtype="bfloat16")
    for i, (p, m) in enumerate(zip(w.prompts, w.max_tokens)):
        llm.add_request(str(i), p, SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True, detokenize=False))
    for _ in range(320):
        llm.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            llm.step()
        torch.cuda.synchronize()
    print(f"running sequences: {len(llm.engine.scheduler.running)}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
