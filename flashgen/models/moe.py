"""Mixture-of-experts layers (Qwen3-MoE, Mixtral): their config.json settings, checkpoint names, the stacked
expert weights the model runs and their tensor-parallel slices.

A MoE layer replaces the dense MLP with a router (`gate`, (E, H)) and E experts, each a SwiGLU MLP of width I.
At load, each layer's experts are stacked into gate_up (E, 2 * I, H) (each expert's gate rows, then its up rows,
as the dense fused weight) and down (E, H, I), so ops.moe receives one tensor per kind, and the CUDA backend's
grouped GEMMs read them as they are (flashgen/ops/cuda_moe.py). Tensor parallelism splits every expert's
intermediate dimension across ranks, as the dense MLP is split (each rank computes a partial sum of every token's
output; one all-reduce after), and keeps the router whole on every rank, so all ranks route every token alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flashgen.models.errors import ModelLoadError

if TYPE_CHECKING:
    from flashgen.models.spec import ModelSpec
    from flashgen.models.tensor_parallel import TPInfo

FIX_CONFIG = "fix config.json or download the checkpoint again"
MOE_FAMILIES = ("qwen3_moe", "mixtral")
# config.json fields of MoE variants flashgen does not implement: a non-zero value is refused (its fix: a dense or
# supported checkpoint); shared experts are Qwen2-MoE's and DeepSeek's, not these two families'
UNSUPPORTED_MOE_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                          "n_group", "topk_group", "first_k_dense_replace")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int                      # experts per token
    intermediate_size: int          # each expert's MLP width
    renormalize: bool               # the top-k probabilities renormalised to sum 1 (Mixtral; Qwen3 norm_topk_prob)
    dense_layers: tuple[int, ...]   # layers that run a dense MLP instead (Qwen3-MoE mlp_only_layers / sparse step)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers


def _int_field(cfg: dict, key: str, path: Path, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise ModelLoadError(f"{path}: field {key!r} is missing, so the file is not a complete HF config.json for a "
                             f"mixture-of-experts model; {FIX_CONFIG}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ModelLoadError(f"{path}: {key}={v!r} must be a positive integer; {FIX_CONFIG}")
    return v


def parse_moe(cfg: dict, family: str, num_layers: int, intermediate_size: int, path: Path) -> MoESpec | None:
    """The MoE settings of a Qwen3-MoE or Mixtral config.json (None for other families), checked: every value
    flashgen cannot run is refused naming the field, its value and the fix."""
    if family not in MOE_FAMILIES:
        return None
    for key in UNSUPPORTED_MOE_FIELDS:
        if cfg.get(key):
            raise ModelLoadError(f"{path}: {key}={cfg[key]!r} is not supported: flashgen runs {family} experts "
                                 "without shared experts or grouped routing; use a checkpoint without them")
    if family == "mixtral":
        experts = _int_field(cfg, "num_local_experts", path)
        width = intermediate_size
        renormalize = True  # HF's MixtralTopKRouter always renormalises the top-k
        dense: tuple[int, ...] = ()
    else:
        experts = _int_field(cfg, "num_experts", path, cfg.get("num_local_experts"))
        width = _int_field(cfg, "moe_intermediate_size", path)
        renormalize = cfg.get("norm_topk_prob", False)
        if not isinstance(renormalize, bool):
            raise ModelLoadError(f"{path}: norm_topk_prob={renormalize!r} must be true or false; {FIX_CONFIG}")
        step = _int_field(cfg, "decoder_sparse_step", path, 1)
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                 and 0 <= i < num_layers for i in only):
            raise ModelLoadError(f"{path}: mlp_only_layers={only!r} must be a list of layer indices in "
                                 f"[0, {num_layers}); {FIX_CONFIG}")
        # HF's Qwen3MoeDecoderLayer: a layer is sparse unless listed, or (layer + 1) is not a multiple of the step
        dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
    top_k = _int_field(cfg, "num_experts_per_tok", path)
    if top_k > experts:
        raise ModelLoadError(f"{path}: num_experts_per_tok={top_k} is more than the {experts} experts; {FIX_CONFIG}")
    scoring = cfg.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ModelLoadError(f"{path}: scoring_func={scoring!r} is not supported: flashgen routes by softmax; use a "
                             "checkpoint whose router uses softmax")
    return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=width, renormalize=renormalize,
                   dense_layers=dense)


def _block(spec: ModelSpec) -> str:
    return "block_sparse_moe" if spec.family == "mixtral" else "mlp"


def router_name(spec: ModelSpec, layer: int) -> str:
    return f"model.layers.{layer}.{_block(spec)}.gate.weight"


def expert_names(spec: ModelSpec, layer: int, e: int) -> tuple[str, str, str]:
    """HF names (without `.weight`) of expert e's gate, up and down projections."""
    p = f"model.layers.{layer}.{_block(spec)}.experts.{e}."
    if spec.family == "mixtral":
        return p + "w1", p + "w3", p + "w2"
    return p + "gate_proj", p + "up_proj", p + "down_proj"


def moe_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of a MoE layer's router and experts."""
    assert spec.moe is not None
    h, i = spec.hidden_size, spec.moe.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {router_name(spec, layer): (spec.moe.num_experts, h)}
    for e in range(spec.moe.num_experts):
        gate, up, down = expert_names(spec, layer, e)
        shapes.update({gate + ".weight": (i, h), up + ".weight": (i, h), down + ".weight": (h, i)})
    return shapes


def stack_experts(w: dict[str, torch.Tensor], spec: ModelSpec, layer: int) -> dict[str, torch.Tensor | None]:
    """A MoE layer's weights as the model runs them, popped from `w`: router (E, H), experts_gate_up
    (E, 2 * I, H), experts_down (E, H, I)."""
    assert spec.moe is not None
    gate_up, down = [], []
    for e in range(spec.moe.num_experts):
        # NOTE: FP8 experts arrive dequantized (the loader keeps FP8 for the dense projections only)
        g, u, d = (w.pop(n + ".weight") for n in expert_names(spec, layer, e))
        gate_up.append(torch.cat([g, u]))
        down.append(d)
    return {"router": w.pop(router_name(spec, layer)), "experts_gate_up": torch.stack(gate_up),
            "experts_down": torch.stack(down)}


def shard_experts(L: dict, spec: ModelSpec, tp: TPInfo) -> dict:
    """This rank's slice of every expert's intermediate dimension: gate and up rows, down columns."""
    assert spec.moe is not None
    width = spec.moe.intermediate_size
    inter = width // tp.world
    i0 = tp.rank * inter
    gate, up = L["experts_gate_up"].split(width, dim=1)
    return {"experts_gate_up": torch.cat([gate[:, i0:i0 + inter], up[:, i0:i0 + inter]], dim=1).contiguous(),
            "experts_down": L["experts_down"][:, :, i0:i0 + inter].contiguous()}


def active_parameters(spec: ModelSpec, total: int) -> int:
    """Parameters a token runs through: all of them but the experts it is not routed to."""
    assert spec.moe is not None
    m = spec.moe
    per_expert = 3 * spec.hidden_size * m.intermediate_size
    moe_layers = sum(m.is_moe_layer(i) for i in range(spec.num_layers))
    return total - moe_layers * (m.num_experts - m.top_k) * per_expert
