"""ModelSpec: the few numbers of config.json the engine needs, read and checked once."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        """K + V bytes per token over all layers; `num_kv_heads`: a tensor-parallel rank's share."""
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        return 2 * self.num_layers * heads * self.head_dim * torch.tensor([], dtype=dtype).element_size()


def _need(cfg: dict, key: str, path: Path):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{path}: field {key!r} is missing; the file is not a complete HF config.json")
    return cfg[key]


def load_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --model must be a HuggingFace model directory with config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(
            f"{path}: architectures={archs!r} is not supported; flashgen runs {', '.join(SUPPORTED)}"
        )
    family = SUPPORTED[arch]
    hidden = _need(cfg, "hidden_size", path)
    heads = _need(cfg, "num_attention_heads", path)
    head_dim = cfg.get("head_dim") or hidden // heads
    # transformers >= 5 keeps rope settings in rope_parameters; older files use rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = rope or cfg.get("rope_scaling") or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ValueError(f"{path}: rope scaling type {kind!r} is not supported; use default, llama3 or linear")
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    if cfg.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={cfg.get('hidden_act')!r} is not supported; flashgen runs silu MLPs")
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", family == "mistral") else None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        dtype = "float32"
    spec = ModelSpec(
        architecture=arch, family=family, hidden_size=hidden,
        num_layers=_need(cfg, "num_hidden_layers", path), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=_need(cfg, "intermediate_size", path), vocab_size=_need(cfg, "vocab_size", path),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3", sliding_window=sliding, torch_dtype=dtype,
    )
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(
            f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={spec.num_kv_heads}"
        )
    return spec


def rope_cos_sin(spec: ModelSpec, max_positions: int, device) -> torch.Tensor:
    """(max_positions, head_dim) float32: [:, :D/2] = cos, [:, D/2:] = sin, with HF's inverse frequencies."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling
    if sc and sc["rope_type"] == "linear":
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
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
