"""Mixture-of-experts MLP (`ops.moe`): router, top-k and the experts' SwiGLU MLPs, in plain PyTorch.

This is the reference and the torch backend's implementation: the per-expert loop. Tokens are sorted by expert,
each expert runs its two GEMMs on its own tokens only (torch's GEMM: cuBLAS on the GPU, MKL on the CPU), and the
weighted outputs go back to their tokens by one index_add. The work is the model's (top_k experts per token), not
num_experts times it; what it costs is one GEMM launch per active expert and one host sync (the per-expert token
counts size the GEMMs), which keeps a step that runs it out of CUDA graphs. The CUDA backend runs the same
routing, gather and scatter around grouped GEMMs instead (flashgen/ops/cuda_moe.py), and this loop where those
do not apply.

Arithmetic follows HF transformers' Qwen3-MoE and Mixtral blocks: router logits in the model's dtype, softmax in
float32, top-k (torch.topk, the same tie-breaking), the chosen probabilities renormalised to sum to 1 where the
model does it (Mixtral always, Qwen3-MoE with norm_topk_prob), each expert's output times its weight, summed
per token in the model's dtype in expert order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_shapes(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 top_k: int) -> None:
    """Raise ValueError unless the shapes are those moe() takes."""
    H = x.shape[1]
    E = router.shape[0]
    if gate_up.dim() != 3 or gate_up.shape[0] != E or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}; it must be ({E}, 2 * intermediate, {H})")
    if down.shape != (E, H, gate_up.shape[1] // 2):
        raise ValueError(f"down has shape {tuple(down.shape)}; it must be ({E}, {H}, {gate_up.shape[1] // 2})")
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H), router (E, H) -> (weights (T, top_k) float32, experts (T, top_k) int64)."""
    probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def sort_by_expert(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route x (T, H) and sort its T * top_k (token, expert) pairs by expert, tokens ascending within one
    expert: (experts (T * top_k,) int64 ascending, tokens (T * top_k,) int64, weights (T * top_k,) float32),
    pair i being token tokens[i] through expert experts[i] with weight weights[i]. Device work only: no host
    sync, and every shape follows from T and top_k (so the CUDA backend's grouped path can be graph-captured)."""
    weights, experts = route(x, router, top_k, renormalize)
    # (T * top_k,): token t's choices at t*k .. t*k+k-1; a stable sort keeps tokens ascending within an expert
    sorted_experts, order = torch.sort(experts.flatten(), stable=True)
    return sorted_experts, order // top_k, weights.flatten().index_select(0, order)


def combine(x: torch.Tensor, tokens: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' outputs ys (T * top_k, H), in sort_by_expert's order, times their weights (in float32,
    rounded once to the model's dtype), summed per token -> (T, H)."""
    ys = (ys.float() * weights[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, ys)


def moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
        renormalize: bool) -> torch.Tensor:
    """x (T, H) -> (T, H): sum over the token's top_k experts e of weight_e * down[e] @ silu_mul(gate_up[e] @ x).

    router (E, H); gate_up (E, 2 * I, H), each expert's gate rows then up rows (as the dense fused weight);
    down (E, H, I). With tensor parallelism I is a rank's slice of every expert, and the caller all-reduces.
    """
    check_shapes(x, router, gate_up, down, top_k)
    E = router.shape[0]
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    experts, tokens, weights = sort_by_expert(x, router, top_k, renormalize)
    counts = torch.bincount(experts, minlength=E).tolist()    # the host sync: sizes of the per-expert GEMMs
    xs = x.index_select(0, tokens)                             # (T * top_k, H), expert by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
            ys[start:start + n] = F.linear(F.silu(gate) * up, down[e])
            start += n
    return combine(x, tokens, ys, weights)
