"""Checkpoint names and shapes of each family's projections, and which of them the loader fuses.

Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE store q, k and v (and gate and up) as separate tensors, which the
loader joins; Phi-3 / Phi-4 store them already fused (`qkv_proj`: q rows, then k, then v; `gate_up_proj`: gate
rows, then up), in the very layout flashgen runs, so they load as they are, checked against the shapes config.json
implies. MoE layers (flashgen/models/moe.py) have a router and experts instead of a dense MLP.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from flashgen.models.moe import moe_shapes

if TYPE_CHECKING:
    from flashgen.models.spec import ModelSpec


def is_moe_layer(spec: ModelSpec, layer: int) -> bool:
    return spec.moe is not None and spec.moe.is_moe_layer(layer)


def qkv_parts(spec: ModelSpec, layer: int) -> list[str]:
    """HF names (without `.weight`) whose rows, stacked, give the layer's fused qkv weight."""
    a = f"model.layers.{layer}.self_attn."
    return [a + "qkv_proj"] if spec.family == "phi3" else [a + "q_proj", a + "k_proj", a + "v_proj"]


def gate_up_parts(spec: ModelSpec, layer: int) -> list[str]:
    """HF names (without `.weight`) whose rows, stacked, give a dense layer's fused gate_up weight."""
    m = f"model.layers.{layer}.mlp."
    return [m + "gate_up_proj"] if spec.family == "phi3" else [m + "gate_proj", m + "up_proj"]


def projection_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of one layer's projections (attention, then the dense MLP or the experts)."""
    h = spec.hidden_size
    a = f"model.layers.{layer}.self_attn."
    if spec.family == "phi3":
        shapes: dict[str, tuple[int, ...]] = {a + "qkv_proj.weight": (spec.q_size + 2 * spec.kv_size, h)}
    else:
        shapes = {a + "q_proj.weight": (spec.q_size, h), a + "k_proj.weight": (spec.kv_size, h),
                  a + "v_proj.weight": (spec.kv_size, h)}
    shapes[a + "o_proj.weight"] = (h, spec.q_size)
    if is_moe_layer(spec, layer):
        shapes.update(moe_shapes(spec, layer))
        return shapes
    m, i = f"model.layers.{layer}.mlp.", spec.intermediate_size
    if spec.family == "phi3":
        shapes[m + "gate_up_proj.weight"] = (2 * i, h)
    else:
        shapes.update({m + "gate_proj.weight": (i, h), m + "up_proj.weight": (i, h)})
    shapes[m + "down_proj.weight"] = (h, i)
    return shapes
