"""Read a HF checkpoint's safetensors straight onto the target device, fusing q/k/v and gate/up.

Every tensor is checked against the shape config.json implies; a missing or misshapen tensor stops the load
with the file, the tensor, the expected and the found value.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flashgen.models.spec import ModelSpec


def _index(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file holding it, for one file or a sharded checkpoint."""
    idx = model_dir / "model.safetensors.index.json"
    if idx.is_file():
        weight_map = json.loads(idx.read_text())["weight_map"]
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {idx.name} but not found")
        return files
    single = model_dir / "model.safetensors"
    shards = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")
    files = {}
    for f in shards:
        with safe_open(f, framework="pt") as h:
            files.update({k: f for k in h.keys()})
    return files


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, d = spec.hidden_size, spec.head_dim
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (spec.q_size, h),
            p + "self_attn.k_proj.weight": (spec.kv_size, h),
            p + "self_attn.v_proj.weight": (spec.kv_size, h),
            p + "self_attn.o_proj.weight": (h, spec.q_size),
            p + "mlp.gate_proj.weight": (spec.intermediate_size, h),
            p + "mlp.up_proj.weight": (spec.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, spec.intermediate_size),
        })
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (spec.q_size,), p + "self_attn.k_proj.bias": (spec.kv_size,),
                           p + "self_attn.v_proj.bias": (spec.kv_size,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def load_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All weights by HF name, on `device` in `dtype`, each checked against `expected_shapes`."""
    model_dir = Path(model_dir)
    files = _index(model_dir)
    want = expected_shapes(spec)
    missing = [k for k in want if k not in files]
    if missing:
        raise ValueError(
            f"{model_dir}: tensor {missing[0]!r} is missing from the safetensors files"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the checkpoint does not match "
            f"config.json ({spec.architecture})"
        )
    dev = str(device)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in want:
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt", device=dev) as h:
            for name in names:
                found = tuple(h.get_slice(name).get_shape())
                if found != want[name]:
                    raise ValueError(
                        f"{f}: tensor {name!r} has shape {list(found)}, expected {list(want[name])} from config.json"
                    )
                out[name] = h.get_tensor(name).to(dtype)
    return out


def dummy_weights(spec: ModelSpec, dtype: torch.dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes, made on `device` (load_format="dummy", for benchmarks): norms near
    1, matrices N(0, 0.02) as HF initialises them, so activations keep realistic magnitudes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(spec).items():
        t = torch.empty(shape, dtype=torch.float32 if len(shape) == 1 else dtype, device=device)
        if name.endswith("norm.weight") or "layernorm" in name:
            t.normal_(1.0, 0.05, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t.to(dtype)
    return out


def fuse_layer_weights(w: dict[str, torch.Tensor], spec: ModelSpec, layer: int) -> dict[str, torch.Tensor | None]:
    """One decoder layer's weights in the fused layout the model runs: qkv (q|k|v rows), gate_up (gate|up)."""
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    fused = {
        "input_norm": w.pop(p + "input_layernorm.weight"),
        "post_norm": w.pop(p + "post_attention_layernorm.weight"),
        "qkv": torch.cat([w.pop(a + "q_proj.weight"), w.pop(a + "k_proj.weight"), w.pop(a + "v_proj.weight")]),
        "qkv_bias": None, "q_norm": None, "k_norm": None,
        "o": w.pop(a + "o_proj.weight"),
        "gate_up": torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")]),
        "down": w.pop(p + "mlp.down_proj.weight"),
    }
    if spec.qkv_bias:
        fused["qkv_bias"] = torch.cat([w.pop(a + "q_proj.bias"), w.pop(a + "k_proj.bias"), w.pop(a + "v_proj.bias")])
    if spec.qk_norm:
        fused["q_norm"], fused["k_norm"] = w.pop(a + "q_norm.weight"), w.pop(a + "k_norm.weight")
    return fused
