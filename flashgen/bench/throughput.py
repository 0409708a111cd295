"""`flashgen bench throughput`: the field's offline workloads, next to their physical floor measured in the
same run (HBM bandwidth and matmul rate of this GPU) and, with --compare hf, HF transformers' figure.

Workloads (defined here; figures in BENCHMARKS.md): nanovllm (256 random prompts of 100-1024 tokens, 100-1024 new
tokens each), fixed512 (same prompts, 512 new tokens), sharedprefix (512 requests sharing a 2000-token prefix),
latency8b (Llama-3.1-8B shape, batch 1, 512-token prompt, 128 new tokens); trtllm128, trtllm1000, trtllm5000
(Llama-3.1-8B shape: 3000 requests of 128 tokens in and out, 600 of 1000/1000, 200 of 5000/500, as TensorRT-LLM's
published H100 table; with --quantization fp8 --kv-cache-dtype fp8 for its FP8 rows); moe30b and gemma4b
(nanovllm's requests on the Qwen3-30B-A3B and Gemma-3-4B shapes: a step's floor counts the experts the live
batch is expected to activate, and only the window of a sliding-window layer's KV); longctx (64 prompts of
256-8192 tokens, 256 new tokens each: decode reads a ragged set of long contexts, attention-bound); and
structured (JSON-schema-constrained requests against the same requests unconstrained: bench/structured.py);
logprobs, prompt_logprobs and samples (each feature against the same work without it: bench/sampling_extras.py).
"""
from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from flashgen.config import KV_CACHE_DTYPES
from flashgen.models.spec import kv_dtype_of


@dataclass
class Workload:
    name: str
    shape: str
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float = 0.6

    def sampling_params(self) -> list:
        """One SamplingParams per prompt: the workload's temperature and max_tokens, ignore_eos, no text."""
        from flashgen import SamplingParams

        return [SamplingParams(temperature=self.temperature, max_tokens=m, ignore_eos=True, detokenize=False)
                for m in self.max_tokens]


# name -> (input tokens, output tokens, requests): the three fixed-length rows TensorRT-LLM publishes for one H100
TRTLLM = {"trtllm128": (128, 128, 3000), "trtllm1000": (1000, 1000, 600), "trtllm5000": (5000, 500, 200)}


def make_workload(name: str) -> Workload:
    random.seed(0)
    if name in ("nanovllm", "fixed512"):
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        outs = [random.randint(100, 1024) for _ in range(256)]
        return Workload(name, "qwen3-0.6b", prompts, outs if name == "nanovllm" else [512] * 256)
    if name == "sharedprefix":
        prefix = [random.randint(0, 10000) for _ in range(2000)]
        prompts = [prefix + [random.randint(0, 10000) for _ in range(100)] for _ in range(512)]
        return Workload(name, "qwen3-0.6b", prompts, [128] * 512)
    if name == "latency8b":
        return Workload(name, "llama-3.1-8b", [[random.randint(0, 10000) for _ in range(512)]], [128], 0.0)
    if name in TRTLLM:  # TensorRT-LLM's fixed-length workloads (input/output tokens x requests) on the 8B shape
        n_in, n_out, n = TRTLLM[name]
        return Workload(name, "llama-3.1-8b", [[random.randint(0, 10000) for _ in range(n_in)] for _ in range(n)],
                        [n_out] * n)
    if name in ("moe30b", "gemma4b"):  # nanovllm's request mix on a MoE and on a sliding-window model
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        outs = [random.randint(100, 1024) for _ in range(256)]
        return Workload(name, "qwen3-30b-a3b" if name == "moe30b" else "gemma3-4b", prompts, outs)
    if name == "longctx":
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(256, 8192))] for _ in range(64)]
        return Workload(name, "qwen3-0.6b", prompts, [256] * 64)
    raise ValueError(f"workload {name!r} is unknown; use nanovllm, fixed512, sharedprefix, latency8b, longctx, "
                     "moe30b, gemma4b, "
                     f"{', '.join(TRTLLM)}, structured, logprobs, prompt_logprobs or samples")


def timed_generate(llm, prompts, params) -> tuple[float, list]:
    """(wall seconds, outputs) of one llm.generate, the GPU idle before and after the clock."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate of this GPU, measured now (the kernel
    benchmark's ceilings, under this module's key names)."""
    from flashgen.bench.kernels import ceilings

    c = ceilings(torch.device("cuda"))
    return {"copy_bytes_per_s": c["copy_bytes_per_s"], "matmul_flop_per_s": c["matmul_bf16_flops"]}


def distinct_prefix_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens that must be computed at least once: the nodes of the prompts' prefix trie (a shared
    prefix counts once, as prefix caching computes it once)."""
    root: dict = {}
    n = 0
    for p in prompts:
        node = root
        for t in p:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def floor_seconds(w: Workload, spec, weight_bytes: int, ceil: dict, kv_dtype: torch.dtype = torch.bfloat16,
                  max_seqs: int | None = None, kv_capacity: int | None = None) -> float:
    """Every step at the ceiling: per decode step the weights it reads plus the live sequences' distinct KV (a
    shared prefix once, `kv_dtype` bytes per element) over the copy bandwidth; prefill as 2 * active params FLOPs
    per distinct prompt token over the matmul rate. With no limits every request is live from the start; with
    `max_seqs` and `kv_capacity` (tokens) the requests are admitted in order as the engine's limits allow
    (floor_from_lengths)."""
    return floor_from_lengths([len(p) for p in w.prompts], w.max_tokens, distinct_prefix_tokens(w.prompts), spec,
                              weight_bytes, ceil, kv_dtype, max_seqs, kv_capacity)


def floor_from_lengths(prompt_lens: list[int], max_tokens: list[int], distinct: int, spec, weight_bytes: int,
                       ceil: dict, kv_dtype: torch.dtype = torch.bfloat16, max_seqs: int | None = None,
                       kv_capacity: int | None = None) -> float:
    """floor_seconds from the prompts' lengths and their distinct prefix tokens (counted by the caller), for
    workloads whose prompts are too many to hold as lists of ints (flashgen bench jobs). Per decode step: the
    weights a step reads (a mixture of experts: the experts the live sequences are expected to activate, see
    moe_step_weight_bytes) plus the live sequences' KV (sliding-window layers: only the window of each).

    Without limits every request is live from the first step ("everything resident"). With `max_seqs` and / or
    `kv_capacity` (KV tokens the engine's cache holds) the requests are admitted in input order, each when a
    sequence slot is free and the cache holds its whole final length (its distinct prompt share plus max_tokens:
    the look-ahead admission of a job that runs to max_tokens), and leave when done: the best schedule those
    limits allow, so a model whose weights leave little room for KV gets the floor of the batches it can run."""
    kv_tok = spec.kv_bytes_per_token(kv_dtype)
    total_prompt = sum(prompt_lens)
    share = distinct / total_prompt  # fraction of prompt KV that is not a repeat of another prompt's
    windows = [spec.layer_window(i) for i in range(spec.num_layers)]
    step_weights = moe_step_weight_bytes(spec, weight_bytes)
    prefill_flops = 2 * active_params(spec, weight_bytes) * distinct
    if max_seqs is None and kv_capacity is None:
        decode_bytes = _resident_decode_bytes(prompt_lens, max_tokens, share, kv_tok, windows, step_weights)
    else:
        decode_bytes = _admitted_decode_bytes(prompt_lens, max_tokens, share, kv_tok, windows, step_weights,
                                              max_seqs or len(prompt_lens), kv_capacity)
    return decode_bytes / ceil["copy_bytes_per_s"] + prefill_flops / ceil["matmul_flop_per_s"]


def _kv_bytes(ctx, kv_tok: float, windows: list[int]) -> float:
    """KV bytes one decode step reads for live contexts `ctx` (a numpy array of tokens), each sliding-window
    layer only its window."""
    if not any(windows):
        return kv_tok * float(ctx.sum())
    per_layer = kv_tok / len(windows)
    return per_layer * sum(windows.count(w) * float((np.minimum(ctx, w) if w else ctx).sum()) for w in set(windows))


def _resident_decode_bytes(prompt_lens, max_tokens, share, kv_tok, windows, step_weights) -> float:
    order = sorted(zip(max_tokens, prompt_lens, strict=True))
    outs = np.array([m for m, _ in order], dtype=np.float64)
    prompts = np.array([p for _, p in order], dtype=np.float64) * share
    total, j = 0.0, 0
    for t in range(int(outs.max())):
        while j < len(order) and outs[j] <= t:
            j += 1
        total += step_weights(len(order) - j) + _kv_bytes(prompts[j:] + t + 1, kv_tok, windows)
    return total


def _admitted_decode_bytes(prompt_lens, max_tokens, share, kv_tok, windows, step_weights, max_seqs: int,
                           kv_capacity: int | None) -> float:
    prompts = np.array(prompt_lens, dtype=np.float64) * share
    outs = np.array(max_tokens, dtype=np.int64)
    demand = prompts + outs  # the KV tokens a request holds when it finishes
    live = np.zeros(0, dtype=np.int64)  # indices of the live requests
    done = np.zeros(0, dtype=np.int64)  # their tokens generated so far
    nxt, used, total = 0, 0.0, 0.0
    while nxt < len(prompts) or len(live):
        while nxt < len(prompts) and len(live) < max_seqs and (
                kv_capacity is None or used + demand[nxt] <= kv_capacity or not len(live)):
            live, done = np.append(live, nxt), np.append(done, 0)
            used += demand[nxt]
            nxt += 1
        total += step_weights(len(live)) + _kv_bytes(prompts[live] + done + 1, kv_tok, windows)
        done += 1
        finished = done >= outs[live]
        if finished.any():
            used -= float(demand[live[finished]].sum())
            live, done = live[~finished], done[~finished]
    return total


def _expert_bytes(spec) -> int:
    """Bytes (bf16) of one expert index's three projections in every MoE layer."""
    m = spec.moe
    layers = sum(m.is_moe_layer(i) for i in range(spec.num_layers))
    return 3 * spec.hidden_size * m.intermediate_size * 2 * layers


def moe_step_weight_bytes(spec, weight_bytes: int):
    """live sequences -> the weight bytes a decode step reads. Dense: all of them. Mixture of experts: all but
    the experts, plus the experts that `live` tokens are expected to route to, each token choosing top_k of E
    uniformly (random weights route close to uniformly): E (1 - (1 - k / E)^live) per layer."""
    if spec.moe is None:
        return lambda live: weight_bytes
    E, k, per_expert = spec.moe.num_experts, spec.moe.top_k, _expert_bytes(spec)
    rest = weight_bytes - E * per_expert
    return lambda live: rest + E * (1 - (1 - k / E) ** live) * per_expert


def active_params(spec, weight_bytes: int) -> float:
    """Parameters one token computes with (bf16 bytes / 2): all, or for a mixture of experts all but the experts
    it does not route to."""
    if spec.moe is None:
        return weight_bytes / 2
    E, k = spec.moe.num_experts, spec.moe.top_k
    return (weight_bytes - _expert_bytes(spec) * (E - k)) / 2


def _is_projection(name: str) -> bool:
    """A decoder layer's linear weight (what FP8 quantization stores in 1 byte); not embeddings, norms, lm_head."""
    return name.startswith("model.layers.") and name.endswith("proj.weight")


def weight_bytes_of(spec, fp8: bool = False) -> int:
    """Bytes of all weights as the engine holds them: bf16, or with FP8 weights the layers' projections at 1 byte."""
    from flashgen.models.loader import expected_shapes

    return sum(math.prod(shape) * (1 if fp8 and _is_projection(name) else 2)
               for name, shape in expected_shapes(spec).items())


def run_flashgen(w: Workload, model_dir: str, data_parallel: int = 1, **engine_kw) -> dict:
    from flashgen import LLM, EngineConfig, SamplingParams
    from flashgen.engine.data_parallel import DataParallelLLM
    from flashgen.models.spec import load_spec

    t0 = time.perf_counter()
    llm: LLM | DataParallelLLM
    if data_parallel > 1:
        llm = DataParallelLLM(EngineConfig(model=model_dir, load_format="dummy", dtype="bfloat16", **engine_kw),
                              data_parallel)
    else:
        llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", **engine_kw)
    startup = time.perf_counter() - t0
    sps = w.sampling_params()
    # Warm-up: the longest prompt's length with other token ids (no prefix-cache hit later), so that cuBLAS has
    # picked and loaded its kernels for a full-size prefill before the clock starts.
    longest = max(w.prompts, key=len)
    warm = [(t + 1) % 10007 + 10001 for t in longest]
    llm.generate([warm] * max(1, data_parallel), SamplingParams(max_tokens=4, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(w.prompts, sps)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ntok = sum(len(o.token_ids) for o in outs)
    assert ntok == sum(w.max_tokens), "every request must produce exactly max_tokens (ignore_eos)"
    spec = load_spec(model_dir)
    weight_bytes = weight_bytes_of(spec, engine_kw.get("quantization") == "fp8")
    max_num_seqs = llm.config.max_num_seqs
    if isinstance(llm, LLM):
        kv_tokens, backend = llm.engine.runner.num_blocks * llm.engine.runner.block_size, llm.engine.runner.backend
    else:  # data-parallel: the engines (and their KV caches) live in the worker processes
        kv_tokens, backend = 0, "cuda"
    llm.close()  # stops tensor- or data-parallel workers; a no-op for one process
    return {"output_tokens": ntok, "seconds": wall, "tok_per_s": ntok / wall, "startup_s": startup,
            "prefill_s": llm.stats.prefill_seconds, "decode_s": llm.stats.decode_seconds, "steps": llm.stats.steps,
            "weight_bytes": weight_bytes, "spec": spec, "kv_tokens": kv_tokens, "max_num_seqs": max_num_seqs,
            "preemptions": llm.stats.preemptions,
            "backend": backend, "data_parallel": data_parallel,
            "tensor_parallel": engine_kw.get("tensor_parallel_size", 1)}


def run_hf(w: Workload, model_dir: str, max_new: int) -> dict:
    """HF transformers generate, static batch, left padding, SDPA, same shapes with random weights."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    L = max(map(len, w.prompts))
    ids = torch.zeros(len(w.prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(w.prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                         do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ntok = (out.shape[1] - L) * len(w.prompts)
    del model
    torch.cuda.empty_cache()
    return {"output_tokens": ntok, "seconds": wall, "tok_per_s": ntok / wall}


def main(workload: str = "nanovllm", compare: str | None = None, hf_max_tokens: int = 512,
         out_dir: str | None = None, data_parallel: int = 1, tokenizer: str | None = None, **engine_kw) -> dict:
    from flashgen.bench.synthetic import write_model_dir

    if workload == "structured":
        from flashgen.bench import structured

        return structured.main(tokenizer, out_dir, **engine_kw)
    from flashgen.bench import sampling_extras

    if workload in sampling_extras.WORKLOADS:
        return sampling_extras.main(workload, out_dir, **engine_kw)
    if not torch.cuda.is_available():
        raise RuntimeError("flashgen bench throughput needs a CUDA GPU")
    w = make_workload(workload)
    ceil = measure_ceilings()
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(write_model_dir(w.shape, d))
        ours = run_flashgen(w, model_dir, data_parallel, **engine_kw)
        kv_dtype = kv_dtype_of(engine_kw.get("kv_cache_dtype"), torch.bfloat16)
        spec = ours.pop("spec")
        # the floor at the engine's limits (sequence slots, the KV cache it got), and everything resident; data
        # parallel: the KV caches live in the workers, so only the resident floor
        limits = {"max_seqs": ours["max_num_seqs"], "kv_capacity": ours["kv_tokens"]} if ours["kv_tokens"] else {}
        floor = floor_seconds(w, spec, ours["weight_bytes"], ceil, kv_dtype, **limits)
        resident = floor_seconds(w, spec, ours["weight_bytes"], ceil, kv_dtype)
        res = {"workload": workload, "device": torch.cuda.get_device_name(), **ceil, **ours,
               "floor_s": floor, "floor_tok_per_s": ours["output_tokens"] / floor,
               "pct_of_floor": 100 * floor / ours["seconds"], "floor_limits": limits,
               "floor_resident_s": resident, "pct_of_floor_resident": 100 * resident / ours["seconds"],
               "kv_cache_dtype": engine_kw.get("kv_cache_dtype", "auto"),
               "quantization": engine_kw.get("quantization")}
        if compare == "hf":
            hw = Workload(w.name, w.shape, w.prompts, [hf_max_tokens] * len(w.prompts))
            res["hf"] = run_hf(hw, model_dir, hf_max_tokens)
            res["speedup_vs_hf"] = ours["tok_per_s"] / res["hf"]["tok_per_s"]
    par = f", TP={ours['tensor_parallel']}, DP={ours['data_parallel']}" if max(
        ours["tensor_parallel"], ours["data_parallel"]) > 1 else ""
    kv = (", FP8 weights" if engine_kw.get("quantization") == "fp8" else "") + (
        {"fp8": ", FP8 KV cache", "int8k": ", int8k KV cache"}.get(engine_kw.get("kv_cache_dtype") or "auto", ""))
    lines = [f"workload {workload} on {res['device']} ({ours['backend']} backend{par}{kv})",
             f"  copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"bf16 matmul {ceil['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s",
             f"  flashgen {ours['tok_per_s']:,.0f} output tok/s "
             f"({ours['output_tokens']} tokens in {ours['seconds']:.2f} s;"
             f" start-up {ours['startup_s']:.1f} s; KV {ours['kv_tokens']} tokens; preemptions {ours['preemptions']})",
             f"  host time in prefill steps {ours['prefill_s']:.2f} s, decode steps {ours['decode_s']:.2f} s, "
             f"{ours['steps']} steps",
             f"  floor {res['floor_tok_per_s']:,.0f} tok/s -> {res['pct_of_floor']:.0f}% of floor"
             + (f" (at max_num_seqs {limits['max_seqs']} and {limits['kv_capacity']:,} KV tokens; everything resident: "
                f"{res['pct_of_floor_resident']:.0f}%)" if limits else "")]
    if "hf" in res:
        lines.append(f"  HF transformers {res['hf']['tok_per_s']:,.0f} tok/s ({hf_max_tokens} new tokens) ->"
                     f" flashgen {res['speedup_vs_hf']:.1f}x")
    print("\n".join(lines), flush=True)
    if out_dir:
        tag = workload + (f"_tp{ours['tensor_parallel']}_dp{ours['data_parallel']}" if par else "") + (
            "_fp8w" if engine_kw.get("quantization") == "fp8" else "") + (
            {"fp8": "_fp8kv", "int8k": "_int8kkv"}.get(engine_kw.get("kv_cache_dtype") or "auto", ""))
        with open(f"{out_dir}/throughput_{tag}.json", "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def refloor(path: str, max_num_seqs: int) -> dict:
    """The floor of a saved result (throughput_WORKLOAD.json) recomputed by this module's model, from the run's
    own ceilings, weight bytes and KV cache: for results saved before the floor knew the engine's limits (pass
    the run's --max-num-seqs), and to see a result against a changed model. Needs no GPU."""
    from flashgen.bench.synthetic import write_model_dir
    from flashgen.models.spec import load_spec

    r = json.loads(open(path).read())
    w = make_workload(r["workload"])
    # results saved before the file recorded its KV dtype say it in their name (throughput_W_fp8kv.json)
    kv_name = r.get("kv_cache_dtype") or ("fp8" if path.endswith("_fp8kv.json") else "auto")
    kv_dtype = kv_dtype_of(kv_name, torch.bfloat16)
    ceil = {k: r[k] for k in ("copy_bytes_per_s", "matmul_flop_per_s")}
    with tempfile.TemporaryDirectory() as d:
        spec = load_spec(write_model_dir(w.shape, d))
    out = {"workload": r["workload"], "tok_per_s": r["tok_per_s"], "max_seqs": max_num_seqs,
           "kv_capacity": r["kv_tokens"]}
    for key, limits in (("resident", {}), ("limited", {"max_seqs": max_num_seqs, "kv_capacity": r["kv_tokens"]})):
        f = floor_seconds(w, spec, r["weight_bytes"], ceil, kv_dtype, **limits)
        out[f"floor_{key}_tok_per_s"] = r["output_tokens"] / f
        out[f"pct_of_floor_{key}"] = 100 * f / r["seconds"]
    return out


if __name__ == "__main__":
    import argparse

    from flashgen.config import EngineConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="nanovllm")
    ap.add_argument("--compare", default=None)
    ap.add_argument("--hf-max-tokens", type=int, default=512)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--data-parallel", type=int, default=1)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    ap.add_argument("--quantization", default=None, choices=("auto", "fp8"), help="fp8: FP8 weights, quantized at load")
    ap.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    ap.add_argument("--tokenizer", default=None, help="structured: tokenizer directory (default: the embedded model's)")
    ap.add_argument("--refloor", default=None, metavar="JSON", help="recompute a saved result's floor (no GPU)")
    a = ap.parse_args()
    if a.refloor:
        print(json.dumps(refloor(a.refloor, a.max_num_seqs)))
        raise SystemExit(0)
    main(a.workload, a.compare, a.hf_max_tokens, a.out_dir, a.data_parallel, a.tokenizer, enforce_eager=a.enforce_eager,
         block_size=a.block_size, max_num_batched_tokens=a.max_num_batched_tokens,
         tensor_parallel_size=a.tensor_parallel_size, kv_cache_dtype=a.kv_cache_dtype, max_num_seqs=a.max_num_seqs,
         **({"quantization": a.quantization} if a.quantization else {}))
