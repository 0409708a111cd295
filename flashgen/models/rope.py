"""Rotary-embedding settings beyond the default, llama3 and linear scalings: partial rotary and LongRoPE (Phi-3 /
Phi-4), read from config.json and turned into the one cos/sin table flashgen precomputes.

LongRoPE (HF transformers' `_compute_longrope_parameters`): inv_freq[i] = 1 / (ext[i] * theta^(2i / R)), where
ext is `short_factor` or `long_factor` (R / 2 numbers each, R the rotary dims), and cos and sin are both scaled by
an attention factor: `attention_factor` if given, else sqrt(1 + ln(factor) / ln(original_max_position_embeddings))
for factor > 1 (1.0 otherwise), factor being `factor` if given, else max_position_embeddings /
original_max_position_embeddings. HF picks the factor set per forward call from the sequence's length (long
past original_max_position_embeddings); flashgen precomputes one table for all positions, so it picks once, by
max_model_len: long factors when max_model_len > original_max_position_embeddings, short otherwise (as vLLM does).
The consequence: with a long max_model_len, prompts shorter than original_max_position_embeddings are rotated
with the long factors, where HF would use the short ones (the model was trained to accept both; set max_model_len
to original_max_position_embeddings or less to get the short ones). Switching mid-sequence, as HF does when a
generation grows past the limit, would leave the cached keys rotated with the other set.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from flashgen.models.errors import ModelLoadError

log = logging.getLogger(__name__)

FIX_CONFIG = "fix config.json or download the checkpoint again"
PHI3_ORIGINAL_MAX = 4096  # HF's Phi3Config default for original_max_position_embeddings


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def partial_rotary_factor(cfg: dict, params: dict, family: str, path: Path) -> float:
    """config.json's partial_rotary_factor (top level, or in rope_parameters), for the families whose HF model
    reads it (Phi-3 / Phi-4); 1.0 (every dim rotates) for the others, as HF computes them."""
    v = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if family != "phi3" or v is None:
        return 1.0
    if not _positive(v) or v > 1:
        raise ModelLoadError(f"{path}: partial_rotary_factor={v!r} must be a number in (0, 1]; {FIX_CONFIG}")
    return float(v)


def check_longrope(scaling: dict, key: str, cfg: dict, family: str, rotary_dim: int, max_position_embeddings: int,
                   path: Path) -> dict:
    """The longrope settings of `scaling` (config.json's `key`), checked and resolved: short_factor and
    long_factor (rotary_dim / 2 positive numbers each), original_max_position_embeddings (config.json's top-level
    field first, as HF's Phi-3 reads it) and the attention factor."""
    n = rotary_dim // 2
    out = dict(scaling, rope_type="longrope")
    for name in ("short_factor", "long_factor"):
        v = scaling.get(name)
        if not isinstance(v, list) or len(v) != n or not all(_positive(x) for x in v):
            got = f"a list of {len(v)}" if isinstance(v, list) else repr(v)
            raise ModelLoadError(f"{path}: {key}.{name} is {got}; rope type 'longrope' needs a list of {n} positive "
                                 f"numbers (rotary dims {rotary_dim} / 2); {FIX_CONFIG}")
        out[name] = [float(x) for x in v]
    original = cfg.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))
    if original is None:
        original = PHI3_ORIGINAL_MAX if family == "phi3" else max_position_embeddings
    if not _positive(original) or int(original) != original:
        raise ModelLoadError(f"{path}: original_max_position_embeddings={original!r} must be a positive integer for "
                             f"rope type 'longrope'; {FIX_CONFIG}")
    original = int(original)
    factor = scaling.get("factor")
    factor = max_position_embeddings / original if factor is None else factor
    if not _positive(factor):
        raise ModelLoadError(f"{path}: {key}.factor={factor!r} must be a positive number; {FIX_CONFIG}")
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    elif not _positive(attention):
        raise ModelLoadError(f"{path}: {key}.attention_factor={attention!r} must be a positive number; {FIX_CONFIG}")
    out.update(original_max_position_embeddings=original, attention_factor=float(attention))
    return out


def longrope_inv_freq(sc: dict, rotary_dim: int, theta: float, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (rotary_dim / 2,) float32, the factor cos and sin are multiplied by) for a table of
    `max_positions` positions: the long factors when max_positions > original_max_position_embeddings."""
    original = sc["original_max_position_embeddings"]
    use_long = max_positions > original
    log.info("longrope: max_model_len %d %s original_max_position_embeddings %d, so every position uses the %s "
             "factors", max_positions, ">" if use_long else "<=", original, "long" if use_long else "short")
    ext = torch.tensor(sc["long_factor" if use_long else "short_factor"], dtype=torch.float32)
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (ext * theta ** shape), sc["attention_factor"]
