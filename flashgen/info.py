"""What a checkpoint costs in memory, read from config.json and the safetensors headers only.

`describe_model` never loads a weight: a safetensors file starts with a JSON header that lists every tensor's
dtype and shape, so parameter counts and sizes come from a few kilobytes per file. That makes `flashgen info`
instant even for checkpoints far larger than the machine's memory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from flashgen.models.loader import FP8_ST, ST_FLOATS, index_checkpoint, is_projection
from flashgen.models.moe import active_parameters
from flashgen.models.spec import DTYPES, ModelSpec, load_spec

__all__ = ["describe_model", "format_info"]

# Other spellings a --dtype may use for the names of DTYPES.
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_GIB = 1024 ** 3


def _tensor_stats(headers: dict[Path, dict]) -> tuple[int, int, list[str]]:
    """(parameter count, bytes on disk, stored dtypes) over all tensors of all files' headers."""
    params = stored = 0
    dtypes: set[str] = set()
    for header in headers.values():
        for info in header.values():
            begin, end = info["data_offsets"]  # checked against shape and dtype by read_header
            params += math.prod(info["shape"])
            stored += end - begin
            dtypes.add(ST_FLOATS.get(info["dtype"], info["dtype"]))
    return params, stored, sorted(dtypes)


def _fp8_weight_bytes(headers: dict[Path, dict], itemsize: int, quantize: bool) -> int:
    """Weight bytes as the engine holds FP8 weights: the projections (stored F8_E4M3, or all of them with
    `quantize`) at 1 byte per parameter plus a float32 scale per output row, every other weight in the run dtype;
    scale tensors are counted with their weights, a checkpoint's activation and KV scales not at all."""
    total = 0
    for header in headers.values():
        for name, info in header.items():
            if name.endswith("_scale"):
                continue
            n = math.prod(info["shape"])
            if is_projection(name) and (quantize or info["dtype"] == FP8_ST):
                total += n + 4 * info["shape"][0]
            else:
                total += n * itemsize
    return total


def _run_dtype(requested: str | None, spec: ModelSpec) -> str:
    """The dtype to size weights and KV cache for: the request, else config.json's torch_dtype as load_spec
    reads it."""
    if requested in (None, "", "auto"):
        return spec.torch_dtype
    name = str(requested).replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype={requested!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


def describe_model(path: str, dtype: str | None = None, memory_gb: float | None = None,
                   quantization: str | None = None) -> dict:
    """Shape and memory needs of the checkpoint in directory `path`, read by load_spec and the loader's header
    checks, so `flashgen info` and the engine agree on the numbers and refuse the same broken files.

    dtype: the dtype to size weights and KV cache for (default: config.json's torch_dtype). memory_gb: a memory
    budget in GiB; the result then says how many tokens of KV cache fit in it next to the weights. quantization:
    "fp8" sizes the weights as --quantization fp8 runs them (an FP8 checkpoint is sized so in any case).
    """
    model_dir = Path(path)
    spec = load_spec(model_dir)
    _, headers, _ = index_checkpoint(model_dir)
    params, stored_bytes, stored_dtypes = _tensor_stats(headers)
    run_dtype = _run_dtype(dtype, spec)
    kv_per_token = spec.kv_bytes_per_token(DTYPES[run_dtype])
    if quantization not in (None, "", "auto", "fp8"):
        raise ValueError(f"quantization={quantization!r} is not supported; use auto or fp8")
    fp8 = spec.quant is not None or quantization == "fp8"
    itemsize = DTYPES[run_dtype].itemsize
    info: dict[str, Any] = {
        "path": str(model_dir),
        "architecture": spec.architecture,
        "parameters": params,
        "dtype": run_dtype,
        "stored_dtypes": stored_dtypes,
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_per_token_fp8": spec.kv_bytes_per_token(torch.float8_e4m3fn),  # --kv-cache-dtype fp8
        "kv_bytes_per_token_int8k": spec.kv_bytes_per_token(torch.int8),  # --kv-cache-dtype int8k (scales included)
        "weights": "fp8" if fp8 else run_dtype,  # the linear layers' format; the rest runs in dtype
        "weight_bytes": _fp8_weight_bytes(headers, itemsize, quantization == "fp8") if fp8 else params * itemsize,
        "stored_bytes": stored_bytes,
    }
    if spec.moe is not None:  # a token runs through its top_k experts only
        info.update(num_experts=spec.moe.num_experts, experts_per_token=spec.moe.top_k,
                    active_parameters=active_parameters(spec, params))
    if memory_gb is not None:
        free = memory_gb * _GIB - info["weight_bytes"]
        info["memory_gb"] = memory_gb
        info["kv_cache_tokens"] = max(0, int(free // kv_per_token))
        info["full_length_sequences"] = info["kv_cache_tokens"] // spec.max_position_embeddings
        info["kv_cache_tokens_fp8"] = max(0, int(free // info["kv_bytes_per_token_fp8"]))
        info["kv_cache_tokens_int8k"] = max(0, int(free // info["kv_bytes_per_token_int8k"]))
    return info


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix} ({n:,})"
    return f"{n:,}"


def format_info(d: dict) -> str:
    """A short two-column table of describe_model's result."""
    rows = [
        ("model", d["path"]),
        ("architecture", d["architecture"]),
        ("parameters", _human_count(d["parameters"])),
        *([("active parameters per token", f"{_human_count(d['active_parameters'])} ({d['experts_per_token']} of "
            f"{d['num_experts']} experts)")] if "active_parameters" in d else []),
        ("dtype", f"{d['dtype']} (stored: {', '.join(d['stored_dtypes'])})"),
        ("layers", d["num_layers"]),
        ("heads / kv heads / head_dim", f"{d['num_heads']} / {d['num_kv_heads']} / {d['head_dim']}"),
        ("hidden size", d["hidden_size"]),
        ("vocab size", d["vocab_size"]),
        ("max position embeddings", d["max_position_embeddings"]),
        ("weights", _human_bytes(d["weight_bytes"]) + (
            f" (FP8 e4m3 linear layers with float32 scales; embeddings, norms and lm_head in {d['dtype']})"
            if d.get("weights") == "fp8" else "")),
        ("KV cache per token", f"{_human_bytes(d['kv_bytes_per_token'])} "
                               f"(--kv-cache-dtype fp8: {_human_bytes(d['kv_bytes_per_token_fp8'])}; "
                               f"int8k: {_human_bytes(d['kv_bytes_per_token_int8k'])})"),
    ]
    if "kv_cache_tokens" in d:
        rows.append((f"KV cache in {d['memory_gb']:g} GiB", f"{d['kv_cache_tokens']:,} tokens "
                     f"({d['full_length_sequences']:,} sequences of {d['max_position_embeddings']:,}); "
                     f"{d['kv_cache_tokens_fp8']:,} with --kv-cache-dtype fp8, "
                     f"{d['kv_cache_tokens_int8k']:,} with int8k"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
