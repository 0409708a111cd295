"""Gemma 3 text models (`Gemma3ForCausalLM`): what config.json says, read and checked into a ModelSpec.

Gemma 3 runs through the one decoder (flashgen/models/decoder.py) with these ModelSpec flags, as HF transformers'
modeling_gemma3 computes them:
  - GeLU-tanh MLP (`hidden_activation: gelu_pytorch_tanh`): ops.gelu_tanh_mul, gate first;
  - RMSNorm as x * (1 + w): the loader stores 1 + w (computed in float32, then cast to the model dtype), so the
    shared rms_norm op applies; four norms per layer, the post-attention and post-feedforward ones applied to the
    attention and MLP outputs before the residual add (`sandwich_norm`); per-head q/k norms (as Qwen3's);
  - embeddings times sqrt(hidden_size), the scale cast to the model dtype first (as HF);
  - softmax scale query_pre_attn_scalar ** -0.5;
  - local (sliding-window) and global layers (`layer_types`, else every `sliding_window_pattern`-th layer is
    global): a local layer's query at position p sees keys in (p - sliding_window, p] and is rotated with
    `rope_local_base_freq`; global layers see every key and use `rope_theta` + `rope_scaling` (transformers >= 5:
    rope_parameters.full_attention / .sliding_attention);
  - final logit soft-capping (`final_logit_softcapping`): cap * tanh(logits / cap).
Refused, naming the field: attention logit soft-capping, bidirectional attention, another activation, an unknown
layer type, rope scaling on the local layers.
"""
from __future__ import annotations

from pathlib import Path

from flashgen.models.errors import ModelLoadError
from flashgen.models.quant import parse_quantization

LAYER_TYPES = ("sliding_attention", "full_attention")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # HF's name, and the plain one


def gemma3_spec(cfg: dict, path: Path, arch: str, hidden: int, layers: int, heads: int, kv_heads: int,
                head_dim: int, intermediate: int, vocab: int):
    from flashgen.models.spec import DTYPES, FIX_CONFIG, ModelSpec, _is_number, _number, _positive_int, _rope_scaling

    act_key = "hidden_activation" if cfg.get("hidden_activation") is not None else "hidden_act"
    act = cfg.get(act_key) or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ModelLoadError(f"{path}: {act_key}={act!r} is not supported for Gemma 3; flashgen runs its "
                             "gelu_pytorch_tanh MLP")
    if cfg.get("attn_logit_softcapping") is not None:
        raise ModelLoadError(f"{path}: attn_logit_softcapping={cfg['attn_logit_softcapping']!r} is not supported; "
                             "flashgen's attention has no logit soft-capping (Gemma 3 checkpoints set it to null)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{path}: use_bidirectional_attention={cfg['use_bidirectional_attention']!r} is not "
                             "supported; flashgen generates with causal attention")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    cap = cfg.get("final_logit_softcapping")
    if cap is not None and (not _is_number(cap) or cap <= 0):
        raise ModelLoadError(f"{path}: final_logit_softcapping={cap!r} must be a positive number or null; "
                             f"{FIX_CONFIG}")
    # which layers are local (sliding window)
    types = cfg.get("layer_types")
    if types is None:
        pattern_key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
        pattern = _positive_int(cfg, pattern_key, path, 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif not isinstance(types, list) or len(types) != layers:
        raise ModelLoadError(f"{path}: layer_types must be a list of num_hidden_layers={layers} layer types, not "
                             f"{types!r}; {FIX_CONFIG}")
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise ModelLoadError(f"{path}: layer_types[{i}]={t!r} is not supported; flashgen runs "
                                 f"{' and '.join(LAYER_TYPES)} layers")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = _positive_int(cfg, "sliding_window", path, 4096) if local else 0
    # rope: global layers rope_theta + rope_scaling, local layers rope_local_base_freq (no scaling)
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ModelLoadError(f"{path}: rope_parameters={params!r} must be an object; {FIX_CONFIG}")
    if params is not None and any(k in params for k in LAYER_TYPES):
        glob, glob_key = dict(params.get("full_attention") or {}), "rope_parameters.full_attention"
        loc, loc_key = dict(params.get("sliding_attention") or {}), "rope_parameters.sliding_attention"
    else:
        glob = dict(params) if params else dict(cfg.get("rope_scaling") or {})
        glob_key = "rope_parameters" if params else "rope_scaling"
        glob.setdefault("rope_theta", cfg.get("rope_theta"))
        loc, loc_key = {"rope_theta": cfg.get("rope_local_base_freq")}, "rope_local_base_freq"
    theta = _number({f"{glob_key}.rope_theta": glob.pop("rope_theta", None)}, f"{glob_key}.rope_theta", path,
                    1_000_000.0)
    local_theta = _number({f"{loc_key}.rope_theta": loc.pop("rope_theta", None)}, f"{loc_key}.rope_theta", path,
                          10_000.0)
    scaling = _rope_scaling(glob, glob_key, path) if glob else None
    if scaling is not None and scaling["rope_type"] == "longrope":
        raise ModelLoadError(f"{path}: {glob_key}.rope_type='longrope' is not supported for Gemma 3; flashgen runs "
                             "default, linear and llama3 rotary embeddings on its global layers")
    if loc.get("rope_type", loc.get("type", "default")) != "default":
        raise ModelLoadError(f"{path}: {loc_key}.rope_type={loc.get('rope_type', loc.get('type'))!r} is not "
                             "supported; flashgen runs default rotary embeddings on Gemma 3's local layers")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    return ModelSpec(
        architecture=arch, family="gemma3", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
        rms_norm_eps=_number(cfg, "rms_norm_eps", path, 1e-6, positive=False), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=_positive_int(cfg, "max_position_embeddings", path, 131072),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True, sliding_window=None,
        torch_dtype=dtype if dtype in DTYPES else "float32", quant=parse_quantization(cfg, path),
        hidden_act="gelu_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=hidden ** 0.5,
        query_pre_attn_scalar=_number(cfg, "query_pre_attn_scalar", path, 256.0),
        final_logit_softcapping=float(cap) if cap is not None else 0.0,
        local_layers=local, local_window=window, local_rope_theta=local_theta,
    )
