"""Tensor parallelism (Megatron layout) over torch.distributed.

Each rank holds a slice of the heads and of the MLP: qkv and gate_up are split by output rows
(column-parallel), o and down by input columns (row-parallel, one all-reduce each), lm_head by vocabulary rows
(logits all-gathered). A MoE layer's experts are split like the MLP, each expert by its intermediate
dimension; the router is replicated. When there are fewer kv heads than ranks, each kv head is replicated on the
ranks whose q heads use it. Attention kernels run unchanged on a rank's local heads.

FP8 weights carry a scale per output row: the column-parallel layers (qkv, gate_up) split it with their rows,
the row-parallel ones (o, down) keep all of it, since every rank computes every output row of a partial sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashgen.models.moe import shard_experts
from flashgen.models.spec import ModelSpec


@dataclass(frozen=True)
class TPInfo:
    rank: int
    world: int

    def check(self, spec: ModelSpec) -> None:
        n = self.world
        problems = []
        if spec.num_heads % n:
            problems.append(f"num_attention_heads={spec.num_heads}")
        if spec.num_kv_heads % n and n % spec.num_kv_heads:
            problems.append(f"num_key_value_heads={spec.num_kv_heads}")
        if spec.intermediate_size % n:
            problems.append(f"intermediate_size={spec.intermediate_size}")
        if spec.moe is not None and spec.moe.intermediate_size % n:  # each expert's width is split as the MLP's
            problems.append(f"the experts' intermediate size {spec.moe.intermediate_size}")
        if problems:
            raise ValueError(f"tensor_parallel_size={n} does not divide {', '.join(problems)}; "
                             "pick a size that divides the head counts and the MLP width")

    def q_heads(self, spec: ModelSpec) -> tuple[int, int]:
        per = spec.num_heads // self.world
        return self.rank * per, per

    def kv_heads(self, spec: ModelSpec) -> tuple[int, int]:
        if spec.num_kv_heads >= self.world:
            per = spec.num_kv_heads // self.world
            return self.rank * per, per
        return self.rank // (self.world // spec.num_kv_heads), 1  # replicated kv head


def shard_layer(L: dict, spec: ModelSpec, tp: TPInfo) -> dict:
    # NOTE: FP8 weights are sliced as bytes (float8 copies and cats are not implemented on every torch)
    fp8 = {k for k, v in L.items() if v is not None and v.dtype == torch.float8_e4m3fn}
    out = _shard_layer({k: (v.view(torch.uint8) if k in fp8 else v) for k, v in L.items()}, spec, tp)
    return {k: (v.view(torch.float8_e4m3fn) if k in fp8 else v) for k, v in out.items()}


def _shard_layer(L: dict, spec: ModelSpec, tp: TPInfo) -> dict:
    d = spec.head_dim
    q0, nq = tp.q_heads(spec)
    k0, nk = tp.kv_heads(spec)

    def qkv_rows(t: torch.Tensor) -> torch.Tensor:
        q, k, v = t.split([spec.q_size, spec.kv_size, spec.kv_size])
        return torch.cat([q[q0 * d:(q0 + nq) * d], k[k0 * d:(k0 + nk) * d], v[k0 * d:(k0 + nk) * d]]).contiguous()

    inter = spec.intermediate_size // tp.world
    i0 = tp.rank * inter
    out = dict(L)
    out["qkv"] = qkv_rows(L["qkv"])
    for rows in ("qkv_bias", "qkv_scale"):
        if L.get(rows) is not None:
            out[rows] = qkv_rows(L[rows])
    out["o"] = L["o"][:, q0 * d:(q0 + nq) * d].contiguous()
    if L.get("router") is not None:  # a MoE layer: every expert's intermediate dim is split (models/moe.py)
        out.update(shard_experts(L, spec, tp))
        return out
    gate, up = L["gate_up"].split(spec.intermediate_size)
    out["gate_up"] = torch.cat([gate[i0:i0 + inter], up[i0:i0 + inter]]).contiguous()
    if L.get("gate_up_scale") is not None:
        gate_s, up_s = L["gate_up_scale"].split(spec.intermediate_size)
        out["gate_up_scale"] = torch.cat([gate_s[i0:i0 + inter], up_s[i0:i0 + inter]]).contiguous()
    out["down"] = L["down"][:, i0:i0 + inter].contiguous()
    return out


def shard_vocab(lm_head: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """This rank's rows of lm_head, padded with zero rows so every rank holds the same count."""
    V = lm_head.shape[0]
    per = (V + tp.world - 1) // tp.world
    rows = lm_head[tp.rank * per:(tp.rank + 1) * per]
    if rows.shape[0] < per:
        rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], rows.shape[1])])
    return rows.contiguous()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def gather_logits(local: torch.Tensor, vocab: int, world: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab]
