"""CUDA backend, per-token ops: RMSNorm and SiLU-and-multiply (kernels/norms.cu; for an FP8-weight layer next,
the same with the output quantized in the same pass, kernels/fp8_quant.cu), and the rotary embedding with the
KV-cache append (kernels/rope_kv_append.cu).

Importing this module needs neither CuPy nor a GPU; calling an op does.
"""
from __future__ import annotations

import torch

from flashgen.ops import jit
from flashgen.ops.backend import Fp8Rows
from flashgen.ops.cuda_checks import (
    KERNEL_DTYPES,
    check_cache,
    check_kv_scales,
    check_out,
    check_shape,
    check_tensor,
    device_index,
    fail,
    kv_kernel_variant,
    num_sms,
)
from flashgen.ops.cuda_linear import quantize_fp8_rows

RMS_MAX_HIDDEN = 8 * 4 * 1024  # kernels/norm_rows.cuh: RMS_VPT vectors of 8 per thread, 1024 threads


# ---------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """RMSNorm over the last dim of `x` (..., hidden). With `residual`: returns (norm(x + residual), x + residual);
    `residual_out` may be `residual` itself (in-place update, as vLLM's fused_add_rms_norm)."""
    hidden, rows = _check_rms(x, weight, residual)
    out = check_out(out, tuple(x.shape), x.dtype, x.device)
    if out is None:
        out = torch.empty_like(x)
    residual_out = _residual_out(x, residual, residual_out)
    if rows:
        k = jit.get_kernel("norms.cu", "rms_norm_kernel", x.dtype, 0, device_index(x))
        jit.launch(k, (rows,), (_row_threads(rows, hidden // 8, x),), (
            jit.ptr(x), jit.ptr(residual), jit.ptr(weight), jit.ptr(out),
            jit.ptr(residual_out if residual is not None else None), jit.i32(hidden), jit.f32(eps)), x.device)
    return out if residual is None else (out, residual_out)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                 residual_out: torch.Tensor | None = None):
    """rms_norm of x (R, hidden) with its output quantized per row for an FP8-weight layer next, in one kernel
    (kernels/fp8_quant.cu): Fp8Rows, or (Fp8Rows, x + residual). The bytes (and the new residual) equal those of
    this backend's rms_norm followed by linear_fp8's quantization (quantize_fp8_rows); the norm's output is never
    written in x's dtype."""
    hidden, rows = _check_rms(x, weight, residual)
    if x.dim() != 2:
        fail("x", "must be 2-D (rows, hidden)", f"shape {tuple(x.shape)}")
    residual_out = _residual_out(x, residual, residual_out)
    q = torch.empty((rows, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        k = jit.get_kernel("fp8_quant.cu", "rms_norm_fp8_kernel", x.dtype, 0, device_index(x))
        jit.launch(k, (rows,), (_row_threads(rows, hidden // 8, x),), (
            jit.ptr(x), jit.ptr(residual), jit.ptr(weight), jit.ptr(residual_out if residual is not None else None),
            jit.ptr(q), jit.ptr(scale), jit.i32(hidden), jit.f32(eps)), x.device)
    got = Fp8Rows(q, scale, x.dtype)
    return got if residual is None else (got, residual_out)


def _check_rms(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> tuple[int, int]:
    """rms_norm's arguments checked: (hidden, rows)."""
    check_tensor("x", x, KERNEL_DTYPES)
    dev = x.device
    hidden = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or hidden % 8 or not 0 < hidden <= RMS_MAX_HIDDEN:
        fail("x", f"must have a last dim that is a multiple of 8 in [8, {RMS_MAX_HIDDEN}]", f"shape {tuple(x.shape)}")
    check_tensor("weight", weight, (x.dtype,), 1, dev)
    check_shape("weight", weight, (hidden,))
    if residual is not None:
        check_tensor("residual", residual, (x.dtype,), device=dev)
        check_shape("residual", residual, tuple(x.shape))
    return hidden, x.numel() // hidden


def _residual_out(x: torch.Tensor, residual: torch.Tensor | None, residual_out: torch.Tensor | None):
    if residual is None:
        return None
    residual_out = check_out(residual_out, tuple(x.shape), x.dtype, x.device, "residual_out")
    return torch.empty_like(x) if residual_out is None else residual_out


def _row_threads(rows: int, nvec: int, x: torch.Tensor) -> int:
    """Threads of a kernel that holds a row of `nvec` vectors of 8 in one CTA (kernels/norm_rows.cuh): RMS_VPT (4)
    vectors per thread at most; a few rows (decode at small batch) get one per thread, so that a lone row is
    spread over the most threads."""
    per_thread = -(-nvec // (1 if rows < num_sms(device_index(x)) else 4))
    return min(1024, max(32, -(-per_thread // 32) * 32))


def gelu_tanh_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2 * inter) -> (..., inter): gelu(gate, approximate="tanh") * up, gate first (Gemma's MLP)."""
    return _act_mul("gelu_tanh_mul_kernel", x, out)


def silu_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2 * inter) -> (..., inter): silu(gate) * up, gate first."""
    return _act_mul("silu_mul_kernel", x, out)


def _act_mul(kernel: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """One of norms.cu's gate-activation-times-up kernels: float32 inside, rounded once."""
    check_tensor("x", x, KERNEL_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 16 or x.shape[-1] == 0:
        fail("x", "must have a last dim that is a positive multiple of 16 (2 * inter, inter % 8 == 0)",
             f"shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    shape = (*x.shape[:-1], inter)
    out = check_out(out, shape, x.dtype, x.device)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    rows = x.numel() // x.shape[-1]
    if rows:
        k = jit.get_kernel("norms.cu", kernel, x.dtype, 0, device_index(x))
        nvec = inter // 8
        threads = min(256, -(-nvec // 32) * 32)
        jit.launch(k, (rows, -(-nvec // threads)), (threads,), (jit.ptr(x), jit.ptr(out), jit.i32(inter)),
                   x.device)
    return out


# act -> (the activation's kernel in norms.cu, the same with its output quantized in fp8_quant.cu)
ACT_FP8_KERNELS = {"silu": ("silu_mul_kernel", "silu_mul_fp8_kernel"),
                   "gelu_tanh": ("gelu_tanh_mul_kernel", "gelu_tanh_mul_fp8_kernel")}


def act_mul_fp8(x: torch.Tensor, act: str) -> Fp8Rows:
    """silu_mul (act "silu") or gelu_tanh_mul ("gelu_tanh") of x (R, 2 * inter) with the output quantized per row
    for an FP8-weight layer next, in one kernel (kernels/fp8_quant.cu; one CTA holds a row, so inter is at most
    RMS_MAX_HIDDEN: past that the two ops run one after the other). The bytes equal those of this backend's
    silu_mul / gelu_tanh_mul followed by linear_fp8's quantization (quantize_fp8_rows)."""
    if act not in ACT_FP8_KERNELS:
        fail("act", f"must be one of {', '.join(ACT_FP8_KERNELS)}", repr(act))
    check_tensor("x", x, KERNEL_DTYPES)
    if x.dim() != 2 or x.shape[-1] % 16 or x.shape[-1] == 0:
        fail("x", "must be 2-D (rows, 2 * inter) with 2 * inter a positive multiple of 16", f"shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    if inter > RMS_MAX_HIDDEN:
        xq, xs = quantize_fp8_rows(_act_mul(ACT_FP8_KERNELS[act][0], x, None))
        return Fp8Rows(xq, xs, x.dtype)
    rows = x.shape[0]
    q = torch.empty((rows, inter), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        k = jit.get_kernel("fp8_quant.cu", ACT_FP8_KERNELS[act][1], x.dtype, 0, device_index(x))
        jit.launch(k, (rows,), (_row_threads(rows, inter // 8, x),),
                   (jit.ptr(x), jit.ptr(q), jit.ptr(scale), jit.i32(inter)), x.device)
    return Fp8Rows(q, scale, x.dtype)


# ---------------------------------------------------------------- rope + kv append
def rope_kv_append(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, slot_mapping: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6, interleaved: bool = False,
                   k_scale: float | torch.Tensor = 1.0, v_scale: float | torch.Tensor = 1.0, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (T, (Hq + 2 Hkv) * D) -> q (T, Hq, D) rotated; rotated k and v written to their cache slots
    (slot -1: not written). Qwen3's per-head RMSNorm (q_norm, k_norm: (D,)) runs before the rotation. An FP8
    cache (float8_e4m3fn) stores k / k_scale and v / v_scale, rounded to nearest and saturated. The int8k cache
    (int8 k_cache, float8_e4m3fn v_cache) takes k_scale and v_scale as float32 tensors (num_blocks, block_size,
    Hkv), written here at the same slots: per token and kv head, K stores round(k / s) clamped to +-127 with
    s = max(amax |k|, 1e-12) / 127, V stores e4m3(v / s) with s = max(amax |v|, 1e-12) / 448 (kernels/fp8.cuh).
    cos_sin (max_positions, R): the first R dims of each head rotate (partial rotary when R < D), R a multiple
    of 16."""
    check_tensor("qkv", qkv, KERNEL_DTYPES, 2)
    dev = qkv.device
    bs, hkv, d = check_cache(k_cache, v_cache, qkv.dtype, dev)
    if d % 16 or not 32 <= d <= 512:
        fail("k_cache", "head_dim (dim 3) must be a multiple of 16 in [32, 512]", d)
    int8k = check_kv_scales(k_cache, k_scale, v_scale)  # the int8k cache's scale tensors (else None)
    T, width = qkv.shape
    if width % d or width // d <= 2 * hkv:
        fail("qkv", f"must be (T, (Hq + 2 * {hkv}) * {d}) with Hq >= 1", f"shape {tuple(qkv.shape)}")
    hq = width // d - 2 * hkv
    check_tensor("positions", positions, (torch.int32, torch.int64), 1, dev, align=4)
    check_shape("positions", positions, (T,))
    check_tensor("slot_mapping", slot_mapping, (torch.int32, torch.int64), 1, dev, align=4)
    check_shape("slot_mapping", slot_mapping, (T,))
    check_tensor("cos_sin", cos_sin, (torch.float32,), 2, dev)
    rot_dim = cos_sin.shape[1]  # rotated dims per head: d, or fewer for partial rotary
    if rot_dim % 16 or not 16 <= rot_dim <= d:
        fail("cos_sin", f"must be (max_positions, rotary_dim) float32, rotary_dim a multiple of 16 in [16, {d}]",
             f"shape {tuple(cos_sin.shape)}")
    if (q_norm is None) != (k_norm is None):
        fail("q_norm/k_norm", "must both be given or both be None",
             f"q_norm {type(q_norm).__name__}, k_norm {type(k_norm).__name__}")
    if q_norm is not None and k_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            check_tensor(name, w, (qkv.dtype,), 1, dev)
            check_shape(name, w, (d,))
    out = check_out(out, (T, hq, d), qkv.dtype, dev)
    if out is None:
        out = torch.empty((T, hq, d), dtype=qkv.dtype, device=dev)
    if T:
        defines, ks, vs = kv_kernel_variant(k_cache, k_scale, v_scale, int8k)
        scales = (jit.f32(ks), jit.f32(vs))
        # FG_KV_FP8=2 writes the scale tensors, its last two arguments; the others' arguments end at rot_dim
        scale_ptrs = (jit.ptr(int8k[0]), jit.ptr(int8k[1])) if int8k is not None else ()
        k = jit.get_kernel("rope_kv_append.cu", "rope_kv_append_kernel", qkv.dtype, d, device_index(qkv),
                           defines=defines)
        jit.launch(k, (T,), (128,), (  # ROPE_THREADS in kernels/rope_kv_append.cu
            jit.ptr(qkv), jit.ptr(positions), jit.i32(positions.dtype == torch.int64), jit.ptr(cos_sin),
            jit.ptr(slot_mapping), jit.i32(slot_mapping.dtype == torch.int64), jit.ptr(k_cache),
            jit.ptr(v_cache), jit.ptr(out), jit.ptr(q_norm), jit.ptr(k_norm), jit.f32(norm_eps), jit.i32(hq),
            jit.i32(hkv), jit.i32(bool(interleaved)), *scales, jit.i32(rot_dim), *scale_ptrs), dev)
    return out
