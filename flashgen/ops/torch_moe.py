"""Mixture-of-experts MLP (`ops.moe`): router, top-k and the experts' SwiGLU MLPs, in plain PyTorch.

This is the reference and, for now, the implementation of both backends (the CUDA backend re-exports it): the
per-expert-loop baseline. Tokens are sorted by expert, each expert runs its two GEMMs on its own tokens only
(torch's GEMM: cuBLAS on the GPU, MKL on the CPU), and the weighted outputs go back to their tokens by one
index_add. The work is the model's (top_k experts per token), not num_experts times it, so it is correct and
reasonably fast; what it costs is one GEMM launch per active expert and one host sync (the per-expert token
counts size the GEMMs), which also keeps a MoE decode step out of CUDA graphs. A grouped-GEMM kernel (all experts
in one launch, counts read on the device) can replace the loop behind the same signature.

Arithmetic follows HF transformers' Qwen3-MoE and Mixtral blocks: router logits in the model's dtype, softmax in
float32, top-k (torch.topk, the same tie-breaking), the chosen probabilities renormalised to sum to 1 where the
model does it (Mixtral always, Qwen3-MoE with norm_topk_prob), each expert's output times its weight, summed
per token in the model's dtype in expert order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H), router (E, H) -> (weights (T, top_k) float32, experts (T, top_k) int64)."""
    probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
        renormalize: bool) -> torch.Tensor:
    """x (T, H) -> (T, H): sum over the token's top_k experts e of weight_e * down[e] @ silu_mul(gate_up[e] @ x).

    router (E, H); gate_up (E, 2 * I, H), each expert's gate rows then up rows (as the dense fused weight);
    down (E, H, I). With tensor parallelism I is a rank's slice of every expert, and the caller all-reduces.
    """
    T, H = x.shape
    E = router.shape[0]
    if gate_up.dim() != 3 or gate_up.shape[0] != E or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}; it must be ({E}, 2 * intermediate, {H})")
    if down.shape != (E, H, gate_up.shape[1] // 2):
        raise ValueError(f"down has shape {tuple(down.shape)}; it must be ({E}, {H}, {gate_up.shape[1] // 2})")
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")
    out = torch.zeros_like(x)
    if T == 0:
        return out
    weights, experts = route(x, router, top_k, renormalize)
    flat = experts.flatten()                                   # (T * top_k,): token t's choices at t*k .. t*k+k-1
    order = torch.argsort(flat, stable=True)                   # grouped by expert, tokens ascending within one
    counts = torch.bincount(flat, minlength=E).tolist()        # the host sync: sizes of the per-expert GEMMs
    tokens = order // top_k
    xs = x.index_select(0, tokens)                             # (T * top_k, H), expert by expert
    ws = weights.flatten().index_select(0, order)
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
            ys[start:start + n] = F.linear(F.silu(gate) * up, down[e])
            start += n
    ys = (ys.float() * ws[:, None]).to(x.dtype)
    return out.index_add_(0, tokens, ys)
