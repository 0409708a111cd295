"""Workloads of `flashgen bench throughput` for logprobs, prompt logprobs and n samples, each against the same
work without the feature, measured in the same process on the Qwen3-0.6B shape (random weights):

- logprobs: nanovllm's requests with logprobs=5 on every request, against nanovllm's requests without;
- prompt_logprobs: 16 prompts of 16,384 tokens, one new token each (prefill only), with prompt_logprobs=1,
  against the same prefill without;
- samples: 256 prompts of 500-1,000 tokens, n = 8, 512 new tokens, temperature 1, against the same 2,048
  requests sent one by one with prefix caching off; the prompt tokens each run computed are counted.
"""
from __future__ import annotations

import gc
import random
import tempfile

import torch

from flashgen.bench.throughput import timed_generate

WORKLOADS = ("logprobs", "prompt_logprobs", "samples")


def _release_gpu_memory() -> None:
    """Give back the memory of engines the caller has closed and dropped every reference to."""
    gc.collect()
    torch.cuda.empty_cache()


def main(workload: str, out_dir: str | None = None, **engine_kw) -> dict:
    from flashgen import LLM, SamplingParams
    from flashgen.bench.synthetic import write_model_dir
    from flashgen.bench.throughput import make_workload

    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} is unknown here; use one of {', '.join(WORKLOADS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("flashgen bench throughput needs a CUDA GPU")
    rng = random.Random(0)
    res: dict = {"workload": workload, "device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as d:
        mdir = str(write_model_dir("qwen3-0.6b", d))
        kw = dict(model=mdir, load_format="dummy", dtype="bfloat16", **engine_kw)
        if workload == "logprobs":
            w = make_workload("nanovllm")
            llm = LLM(**kw)
            llm.generate([[1] * 64], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5))
            base = w.sampling_params()
            with_lp = [SamplingParams(temperature=w.temperature, max_tokens=m, ignore_eos=True, detokenize=False,
                                      logprobs=5) for m in w.max_tokens]
            t_plain, outs = timed_generate(llm, w.prompts, base)
            t_lp, outs_lp = timed_generate(llm, [[t + 1 for t in p] for p in w.prompts], with_lp)  # no cache hits
            assert all(len(o.logprobs) == len(o.token_ids) for o in outs_lp)
            tokens = sum(len(o.token_ids) for o in outs)
            res.update(plain_tok_per_s=tokens / t_plain, logprobs_tok_per_s=tokens / t_lp, ratio=t_plain / t_lp)
            line = (f"  logprobs=5 on every request {res['logprobs_tok_per_s']:,.0f} output tok/s, without "
                    f"{res['plain_tok_per_s']:,.0f} -> {100 * res['ratio']:.0f}%")
        elif workload == "prompt_logprobs":
            llm = LLM(**kw)
            prompts = [[rng.randrange(10000) for _ in range(16384)] for _ in range(16)]
            llm.generate([[1] * 64], SamplingParams(max_tokens=1, prompt_logprobs=1))
            t_plain, _ = timed_generate(llm, prompts, SamplingParams(max_tokens=1, detokenize=False))
            shifted = [[t + 1 for t in p] for p in prompts]
            t_lp, outs = timed_generate(llm, shifted, SamplingParams(max_tokens=1, prompt_logprobs=1))
            assert all(len(o.prompt_logprobs) == 16384 for o in outs)
            n_tok = 16 * 16384
            res.update(plain_prompt_tok_per_s=n_tok / t_plain, logprobs_prompt_tok_per_s=n_tok / t_lp,
                       ratio=t_plain / t_lp)
            line = (f"  prefill with prompt_logprobs=1 {res['logprobs_prompt_tok_per_s']:,.0f} prompt tok/s, "
                    f"without {res['plain_prompt_tok_per_s']:,.0f} -> {100 * res['ratio']:.0f}%")
        else:
            prompts = [[rng.randrange(10000) for _ in range(rng.randint(500, 1000))] for _ in range(256)]

            def sp(seed: int, n: int = 1) -> SamplingParams:
                return SamplingParams(temperature=1.0, max_tokens=512, ignore_eos=True, detokenize=False, seed=seed,
                                      n=n)

            separate = LLM(**kw, enable_prefix_caching=False)
            separate.generate([[1] * 64], SamplingParams(max_tokens=4))
            p0 = separate.stats.prompt_tokens
            t_sep, outs = timed_generate(separate, [p for p in prompts for _ in range(8)],
                                 [sp(8 * i + j) for i in range(256) for j in range(8)])
            sep_prompt = separate.stats.prompt_tokens - p0
            separate.close()
            del separate  # its KV cache is gone before the next engine plans its own
            _release_gpu_memory()
            grouped = LLM(**kw)
            grouped.generate([[1] * 64], SamplingParams(max_tokens=4))
            p0 = grouped.stats.prompt_tokens
            t_n, outs_n = timed_generate(grouped, prompts, [sp(i, n=8) for i in range(256)])
            n_prompt = grouped.stats.prompt_tokens - p0
            tokens = sum(len(c.token_ids) for o in outs_n for c in o.outputs)
            assert tokens == sum(len(o.token_ids) for o in outs) == 256 * 8 * 512
            distinct = sum(map(len, prompts))
            res.update(n_tok_per_s=tokens / t_n, separate_tok_per_s=tokens / t_sep, speedup=t_sep / t_n,
                       prompt_tokens_n=n_prompt, prompt_tokens_separate=sep_prompt, distinct_prompt_tokens=distinct)
            line = (f"  n=8 {res['n_tok_per_s']:,.0f} output tok/s, 2,048 separate requests (no prefix cache) "
                    f"{res['separate_tok_per_s']:,.0f} -> {res['speedup']:.2f}x; prompt tokens computed: "
                    f"{n_prompt:,} with n (the prompts hold {distinct:,}; samples 1..7 recompute only their last "
                    f"partial block), {sep_prompt:,} separately")
            llm = grouped
        llm.close()
        del llm
        _release_gpu_memory()
    print(f"workload {workload} on {res['device']} (Qwen3-0.6B shape)\n{line}", flush=True)
    if out_dir:
        import json

        with open(f"{out_dir}/throughput_{workload}.json", "w") as f:
            json.dump(res, f, indent=1)
    return res
