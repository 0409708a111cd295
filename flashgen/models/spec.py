"""ModelSpec: the few numbers of config.json the engine needs, read and checked once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch

from flashgen.config import DTYPE_NAMES
from flashgen.models.errors import ModelFileMissing, ModelLoadError, read_json_object
from flashgen.models.moe import MoESpec, parse_moe
from flashgen.models.quant import FP8Checkpoint, parse_quantization
from flashgen.models.rope import check_longrope, longrope_inv_freq, partial_rotary_factor

__all__ = ["DTYPES", "ModelSpec", "ModelLoadError", "ModelFileMissing", "load_spec", "spec_from_config",
           "rope_cos_sin"]

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",            # Phi-3 and Phi-4: fused qkv / gate_up, longrope, partial rotary
    "Qwen3MoeForCausalLM": "qwen3_moe",   # mixture of experts (flashgen/models/moe.py)
    "MixtralForCausalLM": "mixtral",
    "Gemma3ForCausalLM": "gemma3",        # text only; sliding-window layers: the attention ops' `window`
}
# The one name -> torch dtype table, over config.DTYPE_NAMES (which EngineConfig checks without importing torch).
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str
    # an FP8-weight checkpoint's scheme (config.json's quantization_config), None for float weights
    quant: FP8Checkpoint | None = None
    # Phi-4-mini's partial rotary: the first int(head_dim * factor) dims of each head rotate, the rest do not
    partial_rotary_factor: float = 1.0
    # the experts of a mixture-of-experts model (Qwen3-MoE, Mixtral), None for a dense one
    moe: MoESpec | None = None
    # Gemma 3 (flashgen/models/gemma3.py): the MLP's activation ("silu" or "gelu_tanh"); RMSNorm weights stored
    # as w for x * (1 + w) (the loader folds 1 + w in); pre/post-feedforward norms and the post-attention norm
    # applied to the attention output; embeddings times embed_scale; softmax scale query_pre_attn_scalar ** -0.5
    # (0: head_dim ** -0.5); logits soft-capped by final_logit_softcapping (0: none); local_layers attend to the
    # last local_window tokens only, rotated with local_rope_theta
    hidden_act: str = "silu"
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    embed_scale: float = 1.0
    query_pre_attn_scalar: float = 0.0
    final_logit_softcapping: float = 0.0
    local_layers: tuple[int, ...] = ()
    local_window: int = 0
    local_rope_theta: float = 10000.0

    @property
    def softmax_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer` (a query at p sees keys in (p - window, p]); 0 for full attention."""
        return self.local_window if layer in self.local_layers else 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)  # HF's int(), not a rounding

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        """K + V bytes per token over all layers for a cache of `dtype` (kv_dtype_of's: torch.int8 is the int8k
        cache, whose float32 K and V scales per token and kv head count too); `num_kv_heads`: a tensor-parallel
        rank's share."""
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        scales = 2 * 4 if dtype == torch.int8 else 0
        return self.num_layers * heads * (2 * self.head_dim * dtype.itemsize + scales)


# --kv-cache-dtype -> the K cache's torch dtype ("auto": the model's). torch.int8 stands for the int8k format: K in
# int8, V in float8_e4m3fn, a float32 scale per token and kv head for each (ops.torch_ops, "int8k KV cache").
KV_CACHE_TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "int8k": torch.int8}


def kv_dtype_of(kv_cache_dtype: str | None, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for the --kv-cache-dtype setting, `dtype` (the model's) for auto."""
    return KV_CACHE_TORCH_DTYPES.get(kv_cache_dtype or "auto", dtype)


FIX_CONFIG = "fix config.json or download the checkpoint again"


def _need(cfg: dict, key: str, path: Path):
    if key not in cfg or cfg[key] is None:
        raise ModelLoadError(f"{path}: field {key!r} is missing, so the file is not a complete HF config.json; "
                             f"{FIX_CONFIG}")
    return cfg[key]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(cfg: dict, key: str, path: Path, default=None, *, required: bool = False) -> int:
    v = _need(cfg, key, path) if required else cfg.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():  # 4096.0, 1e3: harmless spellings of an integer
        v = int(v)
    if not _is_int(v) or v <= 0:
        raise ModelLoadError(f"{path}: {key}={v!r} must be a positive integer; {FIX_CONFIG}")
    return v


def _number(cfg: dict, key: str, path: Path, default: float, *, positive: bool = True) -> float:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not _is_number(v) or v < 0 or (positive and v == 0):
        raise ModelLoadError(f"{path}: {key}={v!r} must be a {'positive' if positive else 'non-negative'} "
                             f"finite number; {FIX_CONFIG}")
    return float(v)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileMissing(f"{path}: not found; --model must be a HuggingFace model directory with config.json")
    return read_json_object(path, FIX_CONFIG, "model settings")


def _rope_scaling(scaling, key: str, path: Path) -> dict | None:
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{path}: {key}={scaling!r} must be an object; {FIX_CONFIG}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it, as HF reads it
    if kind not in ("default", "llama3", "linear", "longrope"):
        raise ModelLoadError(f"{path}: {key}.rope_type={kind!r} is not supported; flashgen runs default, linear, "
                             "llama3 and longrope rotary embeddings: use a checkpoint with one of them")
    if kind == "default":
        return None
    if kind == "longrope":  # checked by check_longrope, which needs the rotary dims
        return {**scaling, "rope_type": kind}
    needed = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                           if kind == "llama3" else [])
    for k in needed:
        v = scaling.get(k)
        if not _is_number(v) or v <= 0:
            raise ModelLoadError(f"{path}: {key}.{k}={v!r} must be a positive number for rope type {kind!r}; "
                                 f"{FIX_CONFIG}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ModelLoadError(f"{path}: {key}.high_freq_factor={scaling['high_freq_factor']!r} must be greater than "
                             f"low_freq_factor={scaling['low_freq_factor']!r}; {FIX_CONFIG}")
    return {**scaling, "rope_type": kind}


def load_spec(model_dir: str | Path) -> ModelSpec:
    """The checked ModelSpec of `model_dir`/config.json; ModelLoadError naming the file and the key otherwise."""
    path = Path(model_dir) / "config.json"
    return spec_from_config(_read_config(path), path)


def spec_from_config(cfg: dict, path: Path) -> ModelSpec:
    """The checked ModelSpec of a config.json's contents `cfg`; `path` is the file its errors name (a GGUF
    converter checks the config it is about to write with it)."""
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelLoadError(f"{path}: architectures={archs!r} must be a list such as [\"LlamaForCausalLM\"]; "
                             f"{FIX_CONFIG}")
    arch = next((a for a in archs if isinstance(a, str) and a in SUPPORTED), None)
    if arch is None:
        raise ModelLoadError(
            f"{path}: architectures={archs!r} is not supported; flashgen runs {', '.join(SUPPORTED)}"
        )
    family = SUPPORTED[arch]
    hidden = _positive_int(cfg, "hidden_size", path, required=True)
    heads = _positive_int(cfg, "num_attention_heads", path, required=True)
    layers = _positive_int(cfg, "num_hidden_layers", path, required=True)
    intermediate = _positive_int(cfg, "intermediate_size", path, required=True)
    vocab = _positive_int(cfg, "vocab_size", path, required=True)
    kv_heads = _positive_int(cfg, "num_key_value_heads", path, heads)
    head_dim = _positive_int(cfg, "head_dim", path) or hidden // heads
    if head_dim < 2 or head_dim % 2:
        where = f"head_dim={head_dim}" if cfg.get("head_dim") else (
            f"hidden_size / num_attention_heads = {hidden} / {heads} gives head_dim={head_dim}, which")
        raise ModelLoadError(f"{path}: {where} is not even; rotary embeddings need an even head_dim of at least 2; "
                             f"{FIX_CONFIG}")
    if family == "gemma3":  # its own rope settings per layer type, norms, activation (flashgen/models/gemma3.py)
        from flashgen.models.gemma3 import gemma3_spec

        return _check_heads(gemma3_spec(cfg, path, arch, hidden, layers, heads, kv_heads, head_dim, intermediate,
                                        vocab), path)
    # transformers >= 5 keeps rope settings in rope_parameters; older files use rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{path}: rope_parameters={params!r} must be an object; {FIX_CONFIG}")
    rope = dict(params)
    rope_theta = _number({"rope_theta": rope.pop("rope_theta", cfg.get("rope_theta"))}, "rope_theta", path, 10000.0)
    scaling, key = (rope, "rope_parameters") if rope else (cfg.get("rope_scaling") or None, "rope_scaling")
    if scaling is not None:
        scaling = _rope_scaling(scaling, key, path)
    partial = partial_rotary_factor(cfg, rope, family, path)
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ModelLoadError(f"{path}: partial_rotary_factor={partial!r} gives {rotary_dim} rotary dims of "
                             f"head_dim={head_dim}; they must be even and at least 2; {FIX_CONFIG}")
    max_positions = _positive_int(cfg, "max_position_embeddings", path, 4096)
    if scaling is not None and scaling["rope_type"] == "longrope":
        scaling = check_longrope(scaling, key, cfg, family, rotary_dim, max_positions, path)
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act={cfg.get('hidden_act')!r} is not supported; "
                             "flashgen runs silu MLPs")
    # HF's Mistral, Mixtral and Phi-3 use sliding_window whenever it is set; Qwen's only with use_sliding_window
    sliding = (cfg.get("sliding_window") if cfg.get("use_sliding_window", family in ("mistral", "mixtral", "phi3"))
               else None)
    if sliding is not None:
        sliding = _positive_int(cfg, "sliding_window", path)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        dtype = "float32"
    spec = ModelSpec(
        architecture=arch, family=family, hidden_size=hidden,
        num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, vocab_size=vocab,
        rms_norm_eps=_number(cfg, "rms_norm_eps", path, 1e-6, positive=False), rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"), sliding_window=sliding, torch_dtype=dtype,
        quant=parse_quantization(cfg, path), partial_rotary_factor=partial,
        moe=parse_moe(cfg, family, layers, intermediate, path),
    )
    return _check_heads(spec, path)


def _check_heads(spec: ModelSpec, path: Path) -> ModelSpec:
    if spec.num_heads % spec.num_kv_heads:
        raise ModelLoadError(
            f"{path}: num_attention_heads={spec.num_heads} is not a multiple of num_key_value_heads="
            f"{spec.num_kv_heads}; "
            f"{FIX_CONFIG}"
        )
    return spec


def rope_cos_sin(spec: ModelSpec, max_positions: int, device) -> torch.Tensor:
    """(max_positions, R) float32: [:, :R/2] = cos, [:, R/2:] = sin, with HF's inverse frequencies; R is
    spec.rotary_dim (head_dim, or less for partial rotary). LongRoPE picks its factor set by max_positions (the
    engine's max_model_len; flashgen/models/rope.py says why) and scales cos and sin by its attention factor."""
    d = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling
    attention_factor = 1.0
    if sc and sc["rope_type"] == "longrope":
        inv_freq, attention_factor = longrope_inv_freq(sc, d, spec.rope_theta, max_positions)
    elif sc and sc["rope_type"] == "linear":
        inv_freq = inv_freq / float(sc["factor"])
    elif sc and sc["rope_type"] == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return (cos_sin * attention_factor if attention_factor != 1.0 else cos_sin).to(device)
