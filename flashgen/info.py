"""What a checkpoint costs in memory, read from config.json and the safetensors headers only.

`describe_model` never loads a weight: a safetensors file starts with a JSON header that lists every tensor's
dtype and shape, so parameter counts and sizes come from a few kilobytes per file. That makes `flashgen info`
instant even for checkpoints far larger than the machine's memory.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

__all__ = ["describe_model", "format_info", "DTYPE_BYTES"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# safetensors' dtype codes -> bytes per element
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_ST_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_GIB = 1024 ** 3


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; flashgen reads safetensors checkpoints only")
    return files


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}}; the weights stay on disk."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:  # real headers are kilobytes to a few megabytes
            raise ValueError(f"{path}: header length {size} is implausible; the file is not a safetensors file")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _tensor_stats(files: list[Path]) -> tuple[int, int, list[str]]:
    """(parameter count, bytes on disk, stored dtypes) over all tensors of all files."""
    params = stored = 0
    dtypes: set[str] = set()
    for path in files:
        for info in _read_header(path).values():
            n = math.prod(info["shape"])
            params += n
            stored += n * _ST_BYTES.get(info["dtype"], 0)
            dtypes.add(_ST_NAMES.get(info["dtype"], info["dtype"]))
    return params, stored, sorted(dtypes)


def _run_dtype(requested: str | None, cfg: dict, stored: list[str], where: Path) -> str:
    """The dtype the weights and KV cache would use: the request, else config.json's, else the stored one."""
    for source, value in (("dtype", requested), (f"{where}: torch_dtype", cfg.get("torch_dtype") or cfg.get("dtype"))):
        if value in (None, "", "auto"):
            continue
        name = _DTYPE_ALIASES.get(str(value).replace("torch.", ""), str(value).replace("torch.", ""))
        if name not in DTYPE_BYTES:
            raise ValueError(f"{source}={value!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
        return name
    floats = [d for d in stored if d in DTYPE_BYTES]
    return floats[0] if len(floats) == 1 else "float32"


def describe_model(path: str, dtype: str | None = None, memory_gb: float | None = None) -> dict:
    """Shape and memory needs of the checkpoint in directory `path`.

    dtype: the dtype to size weights and KV cache for (default: config.json's torch_dtype). memory_gb: a memory
    budget in GiB; the result then says how many tokens of KV cache fit in it next to the weights.
    """
    model_dir = Path(path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found; give a HuggingFace checkpoint directory with config.json")
    cfg = json.loads(config_path.read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ValueError(f"{config_path}: field {key!r} is missing; the file is not a complete HF config.json")

    params, stored_bytes, stored_dtypes = _tensor_stats(_safetensors_files(model_dir))
    run_dtype = _run_dtype(dtype, cfg, stored_dtypes, config_path)
    nbytes = DTYPE_BYTES[run_dtype]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    # One K and one V vector per layer and KV head for every cached token.
    kv_per_token = 2 * layers * kv_heads * head_dim * nbytes
    info = {
        "path": str(model_dir),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        "parameters": params,
        "dtype": run_dtype,
        "stored_dtypes": stored_dtypes,
        "hidden_size": cfg["hidden_size"],
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.get("vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "kv_bytes_per_token": kv_per_token,
        "weight_bytes": params * nbytes,
        "stored_bytes": stored_bytes,
    }
    if memory_gb is not None:
        free = memory_gb * _GIB - info["weight_bytes"]
        info["memory_gb"] = memory_gb
        info["kv_cache_tokens"] = max(0, int(free // kv_per_token))
        if info["max_position_embeddings"]:
            info["full_length_sequences"] = info["kv_cache_tokens"] // info["max_position_embeddings"]
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
        ("dtype", f"{d['dtype']} (stored: {', '.join(d['stored_dtypes'])})"),
        ("layers", d["num_layers"]),
        ("heads / kv heads / head_dim", f"{d['num_heads']} / {d['num_kv_heads']} / {d['head_dim']}"),
        ("hidden size", d["hidden_size"]),
        ("vocab size", d["vocab_size"]),
        ("max position embeddings", d["max_position_embeddings"]),
        ("weights", _human_bytes(d["weight_bytes"])),
        ("KV cache per token", _human_bytes(d["kv_bytes_per_token"])),
    ]
    if "kv_cache_tokens" in d:
        fits = f"{d['kv_cache_tokens']:,} tokens"
        if "full_length_sequences" in d:
            fits += f" ({d['full_length_sequences']:,} sequences of {d['max_position_embeddings']:,})"
        rows.append((f"KV cache in {d['memory_gb']:g} GiB", fits))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
