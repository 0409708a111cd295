"""OpsBackend: the ops the model calls, as both backends (torch_ops, the reference; cuda_ops, the kernels)
implement them. A backend is a module; this Protocol is its contract, checked against both modules by
tests/test_ops_backend.py. The CUDA backend may add keyword-only parameters (out=, and knobs such as
decode_attention's return_lse= and num_splits=) whose defaults keep the call below.

gumbel_argmax is CUDA only (its reference is flashgen.engine.sampler's), so it is not part of the contract.

Shapes (docs/design.md; flash-attn conventions):
  k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim)
  block_tables     : (batch, max_blocks_per_seq) int32, the block ids of each sequence in order
  slot_mapping     : (num_tokens,) int32 or int64, block_id * block_size + offset; -1 = do not write
  cos_sin          : (max_positions, rotary_dim) float32: cos in [:, :rotary_dim/2], sin in [:, rotary_dim/2:];
                     rotary_dim = head_dim, or less for partial rotary (the rest of each head is not rotated)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass
class Fp8Rows:
    """Activation rows quantized for an FP8-weight linear layer, as linear_fp8 quantizes its input: q (R, K)
    float8_e4m3fn and scale (R,) float32 (row r ~ q[r] * scale[r]; scale = max(amax |row|, 1e-12) / 448), made
    by the op that computes the rows (rms_norm_fp8, act_mul_fp8) in the same pass; dtype: the activations' dtype,
    which the linear layer's output takes (docs/design.md, "FP8 weights")."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


@dataclass
class SharedPrefix:
    """Shared-prefix (cascade) decode: the sequences of a decode batch that share leading KV blocks (the n
    samples of one prompt; prompts behind one cached system prompt) in groups of up to G, so that attention reads
    the shared blocks once per group (docs/design.md, "Shared-prefix decode"). All int32 on the batch's device:
      q_rows      (NG, G)  the batch rows of each group's members; -1 pads a group (and a whole unused group)
      lens        (NG,)    tokens of each group's shared prefix, whole blocks; 0 for an unused group
      tables      (NG, W)  the shared blocks, in order
      skip        (B,)     leading blocks of each sequence that its group covers (0: in no group)
      suffix_lens (B,)     context_lens - skip * block_size
    decode_attention with it equals decode_attention without it (the same softmax, split in two and merged by
    log-sum-exp); the CUDA backend reads each shared block once per group and 8 query heads."""
    q_rows: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor
    skip: torch.Tensor
    suffix_lens: torch.Tensor


@runtime_checkable
class OpsBackend(Protocol):
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) . weight (N, K)^T [+ bias (N,)] -> (..., N)."""
        ...

    def linear_fp8(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """FP8 weights: x (..., K) . (weight (N, K) float8_e4m3fn * weight_scale (N,) float32)^T [+ bias (N,)]
        -> (..., N) in x's dtype. Each row of x is quantized to e4m3 first with its own scale
        (max(amax |row|, 1e-12) / 448, rounded to nearest, saturated); the FP8 product is scaled by both scales
        (docs/design.md, "FP8 weights")."""
        ...

    def linear_fp8_rows(self, rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear_fp8 of rows already quantized (rows.q (R, K), rows.scale (R,)) -> (R, N) in rows.dtype: the
        same result as linear_fp8 of the rows they were quantized from."""
        ...

    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                     ) -> Fp8Rows | tuple[Fp8Rows, torch.Tensor]:
        """rms_norm of x (R, hidden) with its output quantized as linear_fp8 quantizes its input (the same bytes),
        for an FP8-weight layer next: Fp8Rows, or (Fp8Rows, x + residual) with `residual`."""
        ...

    def act_mul_fp8(self, x: torch.Tensor, act: str) -> Fp8Rows:
        """silu_mul (act "silu") or gelu_tanh_mul ("gelu_tanh") of x (R, 2 * inter), its output quantized as
        linear_fp8 quantizes its input (the same bytes), for an FP8-weight layer next."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over the last dim: x (..., hidden), weight (hidden,) -> (..., hidden). With `residual` (x's
        shape): returns (norm(x + residual), x + residual)."""
        ...

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2 * inter) -> (..., inter): silu(gate) * up, gate first as in the fused gate_up weight."""
        ...

    def gelu_tanh_mul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2 * inter) -> (..., inter): gelu(gate, approximate="tanh") * up (Gemma's MLP), gate first as in
        silu_mul."""
        ...

    def rope_kv_append(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                       norm_eps: float = 1e-6, interleaved: bool = False, k_scale: float | torch.Tensor = 1.0,
                       v_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """qkv (T, (Hq + 2 Hkv) * D), positions (T,) -> q (T, Hq, D) rotated; the rotated k and the v of token
        t are written to cache slot slot_mapping[t] (-1: not written). Qwen3's per-head RMSNorm (q_norm,
        k_norm: (D,), both or neither) runs before the rotation; `interleaved` rotates pairs (2i, 2i+1)
        (GPT-J) instead of halves (NeoX). An FP8 cache (float8_e4m3fn) stores k / k_scale and v / v_scale,
        rounded to nearest and saturated; the attention ops multiply them back. The int8k cache (int8 k_cache,
        float8_e4m3fn v_cache) takes k_scale / v_scale as float32 tensors (num_blocks, block_size, Hkv) and writes
        each token's scales into them (torch_ops' module docstring)."""
        ...

    def moe(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
            renormalize: bool) -> torch.Tensor:
        """Mixture-of-experts MLP: x (T, H), router (E, H), gate_up (E, 2 * I, H) (gate rows, then up rows),
        down (E, H, I) -> (T, H). Softmax over the router logits in float32, the top_k experts per token (their
        probabilities renormalised to sum 1 when `renormalize`), the sum of their SwiGLU outputs times their
        probabilities (flashgen/ops/torch_moe.py)."""
        ...

    def prefill_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                          max_seqlen_q: int, softmax_scale: float, k_scale: float | torch.Tensor = 1.0,
                          v_scale: float | torch.Tensor = 1.0,
                          window: int = 0) -> torch.Tensor:
        """Varlen causal attention over the paged cache: q (total_q, Hq, D), cu_seqlens_q (batch + 1,) int32,
        context_lens (batch,) int32. Sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and attends to
        its first context_lens[b] cached tokens (its new tokens included, already appended), the mask aligned
        bottom-right; max_seqlen_q >= every q length. `window` > 0 (sliding-window attention): the query at
        position p sees keys in (p - window, p] only; 0: all of them. Returns (total_q, Hq, D)."""
        ...

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         context_lens: torch.Tensor, block_tables: torch.Tensor, softmax_scale: float,
                         k_scale: float | torch.Tensor = 1.0, v_scale: float | torch.Tensor = 1.0,
                         window: int = 0, shared: SharedPrefix | None = None,
                         longest: int | None = None) -> torch.Tensor:
        """One new token per sequence: q (B, Hq, D) attends to the first context_lens[b] (context_lens (B,)
        int32) cached tokens of sequence b, the new token's own k/v included; `window` > 0: the last `window`
        of them only. `shared`: the same attention computed in two parts, the groups' shared prefixes and then
        each sequence's own blocks, merged (SharedPrefix; not with a window). Returns (B, Hq, D). `longest`: the
        caller's bound on the tokens one sequence attends to past its group's shared blocks (None: unknown); a
        backend may pick its kernel plan by it, never changing what is computed."""
        ...
