"""Start-up time of the engine on a real checkpoint directory (safetensors on disk) of the Qwen3-0.6B shape:
model load + kernel compile (warm cache on the second start) + KV planning + CUDA-graph capture.
Run it twice: the first start compiles the kernels (CuPy's on-disk cache is cold), the second finds them cached.
Usage: PYTHONPATH=. python3 scripts/startup_check.py"""
import tempfile
import time

import torch
import transformers

from flashgen import LLM, SamplingParams
from flashgen.bench.synthetic import write_model_dir

with tempfile.TemporaryDirectory() as d:
    write_model_dir("qwen3-0.6b", d)
    cfg = transformers.AutoConfig.from_pretrained(d)
    with torch.device("cuda"):
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    llm = LLM(model=d)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"start-up: {dt:.1f} s (load + kernel compile or cache + KV planning + graph capture + first request); "
          f"KV cache {llm.engine.runner.num_blocks * llm.engine.runner.block_size} tokens")
