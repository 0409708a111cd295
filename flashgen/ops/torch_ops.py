"""Reference ops in plain PyTorch: the CPU backend and the oracle of the CUDA kernels.

Shapes follow docs/design.md, "Ops: one contract, two backends" (flash-attn conventions):
  k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim)
  block_tables     : (batch, max_blocks_per_seq) int32, block ids of each sequence in order
  slot_mapping     : (num_tokens,) int, block_id * block_size + offset; -1 = do not write
  cos_sin          : (max_positions, head_dim) float32, [:, :head_dim/2] = cos, [:, head_dim/2:] = sin
Arithmetic mirrors HF transformers' modelling code (same op order, same dtypes) so float32 runs agree to
rounding; slow but obviously right.

FP8 KV cache (k_cache.dtype float8_e4m3fn): a cached value is round(x / scale) saturated to +-448, read back as
fp8 * scale, with one float32 scale per layer for K (`k_scale`) and one for V (`v_scale`); see
docs/design.md, "FP8 KV cache". With a bf16/fp16/fp32 cache the scales are ignored.

int8k KV cache (k_cache.dtype int8, v_cache.dtype float8_e4m3fn): K in int8 and V in e4m3, each with its own
float32 scale per cached token and kv head. `k_scale` and `v_scale` are then tensors (num_blocks, block_size,
num_kv_heads) that rope_kv_append writes beside the values (scale = max(amax |head|, 1e-12) / 127 for K, / 448
for V; stored = x / scale rounded to nearest, K's to even and clamped to +-127) and the attention ops read; see
docs/design.md, "int8k KV cache".

FP8 weights (linear_fp8): a float8_e4m3fn weight with a float32 scale per output channel, times activations
quantized per token at run time; see docs/design.md, "FP8 weights".
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from flashgen.ops.backend import Fp8Rows, SharedPrefix
from flashgen.ops.torch_moe import moe  # noqa: F401 - the MoE MLP, its own module (per-expert loop)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) . weight (N, K)^T [+ bias]: torch's GEMM (cuBLAS / MKL)."""
    return F.linear(x, weight, bias)


FP8_AMAX_FLOOR = 1e-12  # a row of zeros gets a tiny scale, not a division by zero


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> (xq (R, K) float8_e4m3fn, scale (R,) float32) with x ~ xq * scale: one symmetric scale per row,
    scale = max(amax |row|, FP8_AMAX_FLOOR) / 448, xq = x / scale rounded to nearest and saturated, in float32.
    Activations (per token) and weights quantized at load (per output channel) both use it."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR) / FP8_MAX
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) . (weight (N, K) float8_e4m3fn * weight_scale (N,) float32 per row)^T [+ bias (N,)] -> (..., N)
    in x's dtype. Each row of x is quantized to e4m3 with its own scale first (quantize_fp8_rows), as the FP8
    GEMM gets it; the product of the two FP8 operands is exact in float32, the scales multiply the result and
    the bias is added before the one rounding to x's dtype."""
    return linear_fp8_rows(fp8_rows(x.reshape(-1, x.shape[-1])), weight, weight_scale, bias).reshape(
        *x.shape[:-1], weight.shape[0])


def fp8_rows(x: torch.Tensor) -> Fp8Rows:
    """x (R, K) quantized per row (quantize_fp8_rows) as the FP8 GEMM takes it."""
    xq, xs = quantize_fp8_rows(x)
    return Fp8Rows(xq, xs, x.dtype)


def linear_fp8_rows(rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_fp8 of quantized rows (R, K) -> (R, N) in rows.dtype."""
    y = (rows.q.float() @ weight.float().t()) * rows.scale[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(rows.dtype)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> Fp8Rows | tuple[Fp8Rows, torch.Tensor]:
    """rms_norm of x (R, hidden), its output quantized per row for an FP8-weight layer (fp8_rows)."""
    y = rms_norm(x, weight, eps, residual)
    return (fp8_rows(y[0]), y[1]) if isinstance(y, tuple) else fp8_rows(y)


def act_mul_fp8(x: torch.Tensor, act: str) -> Fp8Rows:
    """silu_mul ("silu") or gelu_tanh_mul ("gelu_tanh") of x (R, 2 * inter), its output quantized per row for an
    FP8-weight layer (fp8_rows)."""
    if act not in ACT_MULS:
        raise ValueError(f"act_mul_fp8: act must be one of {', '.join(ACT_MULS)}, got {act!r}")
    return fp8_rows(ACT_MULS[act](x))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x` (tokens, hidden). With `residual`: returns (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """(tokens, 2 * inter) -> (tokens, inter): silu(gate) * up, gate first as in the fused gate_up weight."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """(tokens, 2 * inter) -> (tokens, inter): gelu_tanh(gate) * up (Gemma's MLP, HF's gelu_pytorch_tanh), gate
    first as in silu_mul."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


ACT_MULS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}  # act_mul_fp8's activations


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x: (T, H, D); cos/sin: (T, 1, D/2) already in x's dtype, as HF casts them
    if interleaved:  # GPT-J: pairs (2i, 2i+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x.chunk(2, dim=-1)  # NeoX / HF rotate_half
    return x * cos2 + torch.cat((-x2, x1), -1) * sin2


def rope_kv_append(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    interleaved: bool = False,
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """qkv (T, (Hq + 2 Hkv) * D) -> q (T, Hq, D), rotated; rotated k and v written to their cache slots.

    Qwen3's per-head RMSNorm (`q_norm`, `k_norm`: (D,)) runs before the rotation, as in HF. An FP8 cache stores
    k / k_scale and v / v_scale (see the module's docstring). `cos_sin` (max_positions, R) with R < D rotates the
    first R dims of each head only and passes the rest through (partial rotary, HF's `q[..., :rotary_dim]`).
    """
    _, _, hkv, d = k_cache.shape
    T = qkv.shape[0]
    hq = qkv.shape[1] // d - 2 * hkv
    q, k, v = qkv.view(T, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)  # (T, H*, D)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm must both be given or both be None")
    if q_norm is not None and k_norm is not None:
        q = rms_norm(q, q_norm, norm_eps)
        k = rms_norm(k, k_norm, norm_eps)
    r = cos_sin.shape[1]  # rotated dims per head: d, or fewer for partial rotary
    if r % 2 or not 0 < r <= d:
        raise ValueError(f"cos_sin has shape {tuple(cos_sin.shape)}; it must be (max_positions, rotary_dim) with an "
                         f"even rotary_dim of at most head_dim={d}")
    cs = cos_sin[positions.long()].to(qkv.dtype)  # (T, R)
    cos, sin = cs[:, None, : r // 2], cs[:, None, r // 2 :]
    if r == d:
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    else:
        q = torch.cat((_rotate(q[..., :r], cos, sin, interleaved), q[..., r:]), -1)
        k = torch.cat((_rotate(k[..., :r], cos, sin, interleaved), k[..., r:]), -1)
    slots = slot_mapping.long()
    keep = slots >= 0
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    if token_scaled(k_cache, v_cache, k_scale, v_scale):
        assert isinstance(k_scale, torch.Tensor) and isinstance(v_scale, torch.Tensor)  # token_scaled checked
        ks, vs = token_scales(k[keep], INT8_MAX), token_scales(v[keep], FP8_MAX)
        k_scale.view(-1, hkv)[slots[keep]] = ks
        v_scale.view(-1, hkv)[slots[keep]] = vs
        flat_k[slots[keep]] = to_cache(k[keep], k_cache.dtype, ks)
        flat_v[slots[keep]] = to_cache(v[keep], v_cache.dtype, vs)
        return q.contiguous()
    flat_k[slots[keep]] = to_cache(k[keep], k_cache.dtype, _float_scale("k_scale", k_scale))
    flat_v[slots[keep]] = to_cache(v[keep], v_cache.dtype, _float_scale("v_scale", v_scale))
    return q.contiguous()


FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
INT8_MAX = 127.0  # the int8k cache's K: symmetric, -127 .. 127
KV_AMAX_FLOOR = 1e-12  # a head of zeros gets a tiny scale, not a division by zero


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def token_scaled(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> bool:
    """Whether the cache is the int8k format (int8 K, e4m3 V, tensor scales per token and kv head); refuses the
    mixtures (an int8 K cache with float scales, tensor scales with another cache, mismatched shapes)."""
    tensors = isinstance(k_scale, torch.Tensor), isinstance(v_scale, torch.Tensor)
    if k_cache.dtype != torch.int8:
        if any(tensors):
            raise ValueError(f"k_scale / v_scale are tensors (a scale per token) but the cache is {k_cache.dtype}: "
                             "per-token scales go with the int8k cache (int8 K, float8_e4m3fn V) only")
        return False
    if v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"an int8 K cache goes with a float8_e4m3fn V cache (the int8k format), not {v_cache.dtype}")
    shape = tuple(k_cache.shape[:3])
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(sc, torch.Tensor) or sc.dtype != torch.float32 or tuple(sc.shape) != shape:
            got = f"{sc.dtype} {tuple(sc.shape)}" if isinstance(sc, torch.Tensor) else repr(sc)
            raise ValueError(f"{name}: the int8k cache needs a float32 tensor {shape} (a scale per cached token "
                             f"and kv head), got {got}")
    return True


def _float_scale(name: str, scale) -> float:
    if isinstance(scale, torch.Tensor):
        raise ValueError(f"{name} is a tensor (a scale per token): that is the int8k cache's, use a float here")
    return float(scale)


def token_scales(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """x (N, Hkv, D) -> (N, Hkv) float32: max(amax |head|, KV_AMAX_FLOOR) / qmax, the int8k cache's scales. The
    divisor is a tensor: torch on CUDA multiplies by the reciprocal of a Python number, one ulp off the kernels' IEEE
    division in a few percent of cases."""
    amax = x.float().abs().amax(-1).clamp(min=KV_AMAX_FLOOR)
    return amax / torch.full_like(amax, qmax)


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float | torch.Tensor) -> torch.Tensor:
    """Values as the cache stores them: x itself in the cache's dtype, or for FP8 x / scale rounded to nearest
    and saturated (the kernels' cvt.rn.satfinite), computed in float32; for int8 x / scale rounded to nearest
    even and clamped to +-127. A tensor `scale` has x's shape without its last dim (a scale per token and head)."""
    if not is_fp8(dtype) and dtype != torch.int8:
        return x.to(dtype)
    y = x.float() / (scale[..., None] if isinstance(scale, torch.Tensor) else scale)
    if dtype == torch.int8:
        return y.round().clamp(-INT8_MAX, INT8_MAX).to(dtype)
    return y.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float | torch.Tensor) -> torch.Tensor:
    """Cached values in `dtype`: FP8 / int8 ones times their scale (exact in float32, then one rounding); a tensor
    `scale` as in to_cache."""
    if not is_fp8(x.dtype) and x.dtype != torch.int8:
        return x.to(dtype)
    return (x.float() * (scale[..., None] if isinstance(scale, torch.Tensor) else scale)).to(dtype)


def _read(take, cache: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached values picked by `take` (an indexing of the cache's leading (block, offset) dims) in `dtype`; a
    per-token scale tensor is picked the same way, a per-layer float applies as it is."""
    return from_cache(take(cache), dtype, take(scale) if isinstance(scale, torch.Tensor) else scale)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens: (length, Hkv, D) of a cache, (length, Hkv) of the int8k
    cache's scales."""
    bs = cache.shape[1]
    nblk = (length + bs - 1) // bs
    return cache[block_table[:nblk].long()].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None,
            window: int = 0):
    # q (Lq, Hq, D), k/v (Lk, Hkv, D); GQA by repeating kv heads, as HF's repeat_kv; window > 0: the query at
    # position p sees keys in (p - window, p] only
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = None
    if causal_offset is not None:  # bottom-right aligned: query i sits at position causal_offset + i
        qi = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        kj = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = kj <= qi
        if window > 0:
            mask &= kj > qi - window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)  # (Lq, Hq, D)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
    window: int = 0,
) -> torch.Tensor:
    """Varlen causal attention. q (total_q, Hq, D); sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    and attends to its first context_lens[b] cached tokens (its new tokens included, already appended), the
    mask aligned bottom-right. `window` > 0 (sliding-window attention, Gemma 3's local layers): the query at
    position p sees keys in (p - window, p] only. Returns (total_q, Hq, D)."""
    token_scaled(k_cache, v_cache, k_scale, v_scale)  # refuses a mismatched cache and scales
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        s, e, n = cu[b], cu[b + 1], lens[b]
        if e == s:
            continue
        take = functools.partial(gather_kv, block_table=block_tables[b], length=n)
        k, v = _read(take, k_cache, k_scale, q.dtype), _read(take, v_cache, v_scale, q.dtype)
        out[s:e] = _attend(q[s:e], k, v, softmax_scale, n - (e - s), window)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    softmax_scale: float,
    k_scale: float | torch.Tensor = 1.0,
    v_scale: float | torch.Tensor = 1.0,
    window: int = 0,
    shared: SharedPrefix | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """One new token per sequence: q (B, Hq, D) attends to the first context_lens[b] cached tokens of
    sequence b (the new token's own k/v included); `window` > 0: the last `window` of them only (the new token
    at position p sees keys in (p - window, p]). `shared` (SharedPrefix): the program the CUDA backend runs,
    the groups' shared prefixes first (each group's members as one sequence's query heads; float32 output),
    then each sequence's own blocks, merged by log-sum-exp. Returns (B, Hq, D). `longest` (the caller's bound on
    one sequence's own tokens) only steers the CUDA backend's choice of kernel plan; this reference has none."""
    token_scaled(k_cache, v_cache, k_scale, v_scale)  # refuses a mismatched cache and scales
    if shared is None:
        return _decode(q, k_cache, v_cache, context_lens, block_tables, softmax_scale, k_scale, v_scale,
                       window)[0].to(q.dtype)
    if window:
        raise ValueError("decode_attention: a shared prefix and a sliding window do not go together")
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    r = hq // hkv
    ng, g = shared.q_rows.shape
    rows = shared.q_rows.long().flatten()
    # the groups as sequences: (NG, Hkv * G * r) query heads, kv-head major (SharedPrefix)
    qg = q[rows.clamp(min=0)].view(ng, g, hkv, r, d).transpose(1, 2).reshape(ng, hkv * g * r, d)
    o1, l1 = _decode(qg, k_cache, v_cache, shared.lens, shared.tables, softmax_scale, k_scale, v_scale)
    o1 = o1.view(ng, hkv, g, r, d).transpose(1, 2).reshape(ng * g, hq, d)
    l1 = l1.view(ng, hkv, g, r).transpose(1, 2).reshape(ng * g, hq)
    real = rows >= 0
    o_sh = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_sh = torch.full((B, hq), float("-inf"), device=q.device)
    o_sh[rows[real]] = o1[real]
    lse_sh[rows[real]] = l1[real]
    # each sequence past its group's blocks
    W = block_tables.shape[1]
    cols = (torch.arange(W, device=q.device)[None, :] + shared.skip.long()[:, None].to(q.device)).clamp(max=W - 1)
    own = block_tables.gather(1, cols.to(block_tables.device))
    o2, l2 = _decode(q, k_cache, v_cache, shared.suffix_lens, own, softmax_scale, k_scale, v_scale)
    m = torch.maximum(l2, lse_sh)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w1, w2 = (lse_sh - m).exp()[..., None], (l2 - m).exp()[..., None]
    out = (o_sh.float() * w1 + o2 * w2) / (w1 + w2).clamp(min=torch.finfo(torch.float32).tiny)
    return out.to(q.dtype)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
            block_tables: torch.Tensor, softmax_scale: float, k_scale: float | torch.Tensor = 1.0,
            v_scale: float | torch.Tensor = 1.0, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention's math: (out (B, Hq, D) float32, zeros for an empty context; natural-log LSE (B, Hq) of
    the scaled scores, -inf for an empty context)."""
    B, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = int(context_lens.max()) if B else 0
    nblk = (max_len + bs - 1) // bs
    tables = block_tables[:, :nblk].long().clamp(min=0)
    def take(c: torch.Tensor) -> torch.Tensor:
        return c[tables].flatten(1, 2)[:, :max_len]

    k, v = _read(take, k_cache, k_scale, q.dtype), _read(take, v_cache, v_scale, q.dtype)  # (B, L, Hkv, D)
    group = hq // hkv
    qg = q.view(B, hkv, group, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg.float(), k.float()) * softmax_scale
    pos = torch.arange(max_len, device=q.device)[None, :]
    lens = context_lens[:, None].to(q.device)
    valid = pos < lens
    if window > 0:
        valid &= pos >= lens - window
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # -inf for an empty context
    p = torch.where(lse[..., None] == float("-inf"), 0.0, scores.softmax(-1))  # an empty context: no weight
    out = torch.einsum("bhgl,blhd->bhgd", p, v.float())
    return out.reshape(B, hq, d), lse.reshape(B, hq)
