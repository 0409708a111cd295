"""CUDA backend, linear layers: torch's GEMM (cuBLAS), or for up to 8 rows (decode at small batch) the skinny
kernel of kernels/skinny_gemm.cu where it measured faster on that shape (linear_plan); and FP8 weights
(linear_fp8): activations quantized per token by torch ops, then cuBLASLt's FP8 GEMM through torch._scaled_mm,
or for up to 8 rows the FP8 skinny kernel of kernels/skinny_gemm_fp8.cu where it measured faster (linear_fp8_plan).

Importing this module needs neither CuPy nor a GPU; calling an op does.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from flashgen.ops import jit, torch_ops
from flashgen.ops.backend import Fp8Rows
from flashgen.ops.cuda_checks import KERNEL_DTYPES, check_out, check_shape, check_tensor, choose, device_index, fail
from flashgen.ops.timing import bench, rotating

SKINNY_MAX_ROWS = 8  # kernels/skinny_gemm.cu: the rows are the n = 8 of an m16n8k16 product
# (warps per CTA, k steps in flight per lane) of the skinny kernel that linear_plan measures against cuBLAS
SKINNY_VARIANTS = ((4, 8), (8, 8), (2, 8), (4, 4))
# (warps, unroll) of the FP8 skinny kernel (kernels/skinny_gemm_fp8.cu) that linear_fp8_plan measures against
# cuBLASLt; a warp step covers 64 k there (32 in the bf16 kernel), so a slice of K is half as many steps
SKINNY_FP8_VARIANTS = ((4, 8), (8, 8), (2, 8), (4, 4), (8, 4))
FP8_SKINNY_MULTIPLE = 16  # kernels/skinny_gemm_fp8.cu: K a multiple of 16 (one lane's 16-byte vector of e4m3)
# (device, weight dtype, rows, N, K, bias[, output dtype for FP8 weights]) -> a skinny variant, None = cuBLAS
_LINEAR_PLAN: dict[tuple, tuple | None] = {}
LINEAR_TIMES: dict[tuple, dict] = {}  # the measurements behind each plan: {"cublas" or variant: s per call}


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, warps: int = 4, unroll: int = 8) -> torch.Tensor:
    """x (M, K) . weight (N, K)^T [+ bias (N,)] -> (M, N) for 1 <= M <= 8, fp32 accumulation, rounded once:
    a streaming pass over the weight on the tensor cores (decode at small batch). The kernel's first weight loads
    go out before it waits for the kernel queued before it (programmatic dependent launch, jit.PDL_KERNELS): the
    weight must be no output of work still queued, as a model's weights never are."""
    check_tensor("x", x, KERNEL_DTYPES, 2)
    dev = x.device
    M, K = x.shape
    if not 1 <= M <= SKINNY_MAX_ROWS:
        fail("x", f"must have 1 to {SKINNY_MAX_ROWS} rows", f"shape {tuple(x.shape)}")
    if K % 8 or K == 0:
        fail("x", "must have a last dim that is a positive multiple of 8", f"shape {tuple(x.shape)}")
    check_tensor("weight", weight, (x.dtype,), 2, dev)
    N = weight.shape[0]
    if weight.shape[1] != K or N == 0:
        fail("weight", f"must be (N > 0, {K}) like x's last dim", f"shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, (x.dtype,), 1, dev, align=2)
        check_shape("bias", bias, (N,))
    if (warps, unroll) not in SKINNY_VARIANTS:
        fail("(warps, unroll)", f"must be one of {SKINNY_VARIANTS}", (warps, unroll))
    out = check_out(out, (M, N), x.dtype, dev)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=dev)
    k_per_warp = -(-K // (32 * warps)) * 32
    kern = jit.get_kernel("skinny_gemm.cu", "skinny_gemm_kernel", x.dtype, 0, device_index(x), 0, (("SG_U", unroll),))
    jit.launch(kern, (-(-N // 16),), (32 * warps,), (
        jit.ptr(x), jit.i64(K), jit.ptr(weight), jit.ptr(bias), jit.ptr(out), jit.i64(N),
        jit.i32(M), jit.i32(N), jit.i32(K), jit.i32(k_per_warp)), dev)
    return out


def _plan(key: tuple, variants: tuple, weight_bytes: int,
          candidates: Callable[[int], dict[str | tuple[int, int], Callable[[int], object]]]) -> tuple[int, int] | None:
    """The plan shared by linear_plan and linear_fp8_plan: FLASHGEN_LINEAR=cublas|skinny forces cuBLAS (None) or
    variants[0]; else the plan remembered under key; else, during CUDA-graph capture, cuBLAS; else a measurement.
    candidates(copies) gives "cublas" and each variant as bench's fn(i), rotating over `copies` copies of the
    weight (~96 MB in all, twice the H100's L2, as the layers of a real step are); each is replayed from a CUDA
    graph and the fastest is remembered (LINEAR_TIMES keeps the times)."""
    forced = choose("FLASHGEN_LINEAR", os.environ.get("FLASHGEN_LINEAR", "auto"), ("auto", "cublas", "skinny"))
    if forced != "auto":
        return None if forced == "cublas" else variants[0]
    if key in _LINEAR_PLAN:
        return _LINEAR_PLAN[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    copies = max(1, -(-(96 << 20) // weight_bytes))
    calls = max(copies, 4)
    times = {name: bench(fn, reps=7, inner=calls, warmup=1) for name, fn in candidates(copies).items()}
    best = min(times, key=times.__getitem__)
    plan = None if isinstance(best, str) else best  # "cublas", or a skinny variant
    _LINEAR_PLAN[key], LINEAR_TIMES[key] = plan, times
    return plan


def linear_plan(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int] | None:
    """Which kernel runs `rows` x weight^T: None = cuBLAS, else the skinny kernel's (warps, unroll). Measured once
    per shape (cuBLAS and each skinny variant, replayed from a CUDA graph over weight copies rotated past L2,
    as the layers of a real step are), then remembered. During CUDA-graph capture an unmeasured shape gets
    cuBLAS. The environment variable FLASHGEN_LINEAR=cublas|skinny overrides the measurement."""
    rows = 1 << (rows - 1).bit_length()  # measured at 1, 2, 4, 8 rows (the decode graphs' small buckets)
    key = (weight.device, weight.dtype, rows, *weight.shape, bias is not None)

    def candidates(copies: int) -> dict[str | tuple[int, int], Callable[[int], object]]:
        N, K = weight.shape
        g = torch.Generator(device=weight.device).manual_seed(0)
        ws = [weight] if copies == 1 else [
            (torch.randn(weight.shape, generator=g, device=weight.device) * 0.02).to(weight.dtype)
            for _ in range(copies)]
        x = torch.randn((rows, K), generator=g, device=weight.device).to(weight.dtype)
        out = torch.empty((rows, N), dtype=weight.dtype, device=weight.device)
        sets = [(x, w, bias) for w in ws]  # call i reads weight copy i % copies
        return {"cublas": rotating(torch.nn.functional.linear, sets),
                **{v: rotating(skinny_gemm, sets, out=out, warps=v[0], unroll=v[1]) for v in SKINNY_VARIANTS}}

    return _plan(key, SKINNY_VARIANTS, weight.numel() * weight.element_size(), candidates)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the skinny kernel for up to 8 rows where it measured faster than cuBLAS."""
    K = x.shape[-1] if x.dim() else 0
    rows = x.numel() // K if K else 0
    if (1 <= rows <= SKINNY_MAX_ROWS and x.is_cuda and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype
            and K % 8 == 0 and x.is_contiguous() and weight.is_contiguous() and weight.dim() == 2
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and (bias is None or bias.is_contiguous())):
        plan = linear_plan(rows, weight, bias)
        if plan is not None:
            y = skinny_gemm(x.reshape(rows, K), weight, bias, warps=plan[0], unroll=plan[1])
            return y.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


FP8_GEMM_MULTIPLE = 16  # torch._scaled_mm: K and N must be multiples of 16 (cuBLASLt's FP8 layouts)
# (device, output dtype) -> whether torch._scaled_mm's row-wise scaling runs there (it depends on the torch and
# cuBLAS versions and the architecture); where it does not, a float32 product is scaled by torch ops instead
_ROWWISE: dict[tuple, bool] = {}
_ONES: dict[torch.device, torch.Tensor] = {}


@functools.cache
def fp8_fast_accum() -> bool:
    """$FLASHGEN_FP8_FAST_ACCUM: 1 (the default) lets the FP8 GEMM (torch._scaled_mm) accumulate in the tensor
    cores' own precision all along K (use_fast_accum); 0 promotes its partial sums to float32 as it goes. On an
    H100 the default made the 8B FP8 batch workloads 8-9% faster at the same accuracy on real weights (top-1
    agreement with float32 89.77% against 89.65%, KL 0.0240 against 0.0243; BENCHMARKS.md, fourteenth session).
    Read once per process."""
    return choose("FLASHGEN_FP8_FAST_ACCUM", os.environ.get("FLASHGEN_FP8_FAST_ACCUM", "1"), ("0", "1")) == "1"


def _fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(xq (M, K) e4m3 * xs (M,)) . (weight (N, K) e4m3 * weight_scale (N,))^T -> (M, N) in out_dtype, float32
    accumulation where fp8_fast_accum is off. mat2 is weight.t(): column-major, as cuBLASLt's FP8 GEMM wants it,
    without a copy."""
    key = (xq.device, out_dtype)
    fast = fp8_fast_accum()
    if _ROWWISE.get(key, True):
        try:
            y = torch._scaled_mm(xq, weight.t(), scale_a=xs[:, None], scale_b=weight_scale[None, :],
                                 out_dtype=out_dtype, use_fast_accum=fast)
            _ROWWISE[key] = True
            return y
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError):  # row-wise scales unsupported here: torch's checks, before any launch
            if torch.cuda.is_current_stream_capturing():
                raise
            _ROWWISE[key] = False
    one = _ONES.get(xq.device)
    if one is None:
        one = _ONES[xq.device] = torch.ones((), dtype=torch.float32, device=xq.device)
    y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)
    return (y * xs[:, None] * weight_scale[None, :]).to(out_dtype)


def _fp8_gemm_bias(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """linear_fp8's cuBLASLt path on quantized rows: the FP8 GEMM, then the bias (after the GEMM's rounding)."""
    y = _fp8_gemm(xq, xs, weight, weight_scale, out_dtype)
    return y if bias is None else y + bias


def skinny_gemm_fp8(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, *, out: torch.Tensor | None = None,
                    warps: int = 4, unroll: int = 8) -> torch.Tensor:
    """(xq (M, K) e4m3 * xs (M,)) . (weight (N, K) e4m3 * weight_scale (N,))^T [+ bias (N,)] -> (M, N) in
    out_dtype for 1 <= M <= 8: e4m3 products accumulated in float32 on the tensor cores, scaled (acc * xs * ws)
    and biased in float32, rounded once (torch_ops.linear_fp8's arithmetic up to the order of the sums); a
    streaming pass over the weight (decode at small batch with FP8 weights). K a multiple of 16, any N. As with
    skinny_gemm, the first weight loads go out before the kernel waits for the one queued before it."""
    check_tensor("xq", xq, (torch.float8_e4m3fn,), 2)
    dev = xq.device
    M, K = xq.shape
    if not 1 <= M <= SKINNY_MAX_ROWS:
        fail("xq", f"must have 1 to {SKINNY_MAX_ROWS} rows", f"shape {tuple(xq.shape)}")
    if K % FP8_SKINNY_MULTIPLE or K == 0:
        fail("xq", f"must have a last dim that is a positive multiple of {FP8_SKINNY_MULTIPLE}",
             f"shape {tuple(xq.shape)}")
    check_tensor("xs", xs, (torch.float32,), 1, dev, align=4)
    check_shape("xs", xs, (M,))
    check_tensor("weight", weight, (torch.float8_e4m3fn,), 2, dev)
    N = weight.shape[0]
    if weight.shape[1] != K or N == 0:
        fail("weight", f"must be (N > 0, {K}) like xq's last dim", f"shape {tuple(weight.shape)}")
    check_tensor("weight_scale", weight_scale, (torch.float32,), 1, dev, align=4)
    check_shape("weight_scale", weight_scale, (N,))
    if out_dtype not in KERNEL_DTYPES:
        fail("out_dtype", f"must be {' or '.join(str(d) for d in KERNEL_DTYPES)}", out_dtype)
    if bias is not None:
        check_tensor("bias", bias, (out_dtype,), 1, dev, align=2)
        check_shape("bias", bias, (N,))
    if (warps, unroll) not in SKINNY_FP8_VARIANTS:
        fail("(warps, unroll)", f"must be one of {SKINNY_FP8_VARIANTS}", (warps, unroll))
    out = check_out(out, (M, N), out_dtype, dev)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=dev)
    k_per_warp = -(-K // (64 * warps)) * 64  # whole 64-k warp steps
    kern = jit.get_kernel("skinny_gemm_fp8.cu", "skinny_gemm_fp8_kernel", out_dtype, 0, device_index(xq), 0,
                          (("SG_U", unroll),))
    jit.launch(kern, (-(-N // 16),), (32 * warps,), (
        jit.ptr(xq), jit.i64(K), jit.ptr(xs), jit.ptr(weight), jit.ptr(weight_scale), jit.ptr(bias), jit.ptr(out),
        jit.i64(N), jit.i32(M), jit.i32(N), jit.i32(K), jit.i32(k_per_warp)), dev)
    return out


def linear_fp8_plan(rows: int, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> tuple[int, int] | None:
    """Which kernel runs `rows` quantized rows x an FP8 weight^T: None = cuBLASLt (torch._scaled_mm), else the FP8
    skinny kernel's (warps, unroll); chosen as linear_plan chooses (measured once per shape over weight copies
    rotated past L2, cuBLAS for an unmeasured shape during CUDA-graph capture, FLASHGEN_LINEAR overrides). The
    activation quantization, the same on both paths, is not part of the measurement."""
    rows = 1 << (rows - 1).bit_length()
    key = (weight.device, weight.dtype, rows, *weight.shape, bias is not None, out_dtype)

    def candidates(copies: int) -> dict[str | tuple[int, int], Callable[[int], object]]:
        N, K = weight.shape
        g = torch.Generator(device=weight.device).manual_seed(0)
        ws = [(weight, weight_scale)] if copies == 1 else [
            torch_ops.quantize_fp8_rows(torch.randn(weight.shape, generator=g, device=weight.device) * 0.02)
            for _ in range(copies)]
        xq, xs = torch_ops.quantize_fp8_rows(torch.randn((rows, K), generator=g, device=weight.device))
        out = torch.empty((rows, N), dtype=out_dtype, device=weight.device)
        sets = [(xq, xs, w, s, bias, out_dtype) for w, s in ws]  # call i reads weight copy i % copies
        return {"cublas": rotating(_fp8_gemm_bias, sets),
                **{v: rotating(skinny_gemm_fp8, sets, out=out, warps=v[0], unroll=v[1]) for v in SKINNY_FP8_VARIANTS}}

    return _plan(key, SKINNY_FP8_VARIANTS, weight.numel() * weight.element_size(), candidates)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_ops.quantize_fp8_rows (x (R, K) -> xq (R, K) e4m3, scale (R,) float32; the same bytes) in one kernel
    pass (kernels/fp8_quant.cu) instead of eight torch ops and a float32 copy of x. A row stride is allowed; K a
    multiple of 8 and 16-byte aligned rows, else the torch ops run."""
    R, K = x.shape
    if (not R or K % 8 or x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16
            or x.dtype not in KERNEL_DTYPES):
        return torch_ops.quantize_fp8_rows(x)
    xq = torch.empty((R, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    kern = jit.get_kernel("fp8_quant.cu", "quantize_fp8_rows_kernel", x.dtype, 0, device_index(x))
    jit.launch(kern, (R,), (256,), (jit.ptr(x), jit.i64(x.stride(0)), jit.ptr(xq), jit.ptr(scale), jit.i32(K)),
               x.device)
    return xq, scale


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp16 . (weight (N, K) float8_e4m3fn * weight_scale (N,) float32)^T [+ bias] -> (..., N):
    each row of x quantized to e4m3 with its own scale (quantize_fp8_rows: one kernel, the reference's bytes),
    then cuBLASLt's FP8 GEMM with row-wise scales (scale_a (M, 1), scale_b (1, N)), output in x's dtype; the
    bias is added after the GEMM's rounding. For 1 to 8 rows the FP8 skinny kernel (skinny_gemm_fp8: bias added
    before the one rounding) runs instead where it measured faster on the shape (linear_fp8_plan). Shapes the
    FP8 GEMM cannot take (K or N not a multiple of 16, no rows) run the torch reference on the GPU: right, not
    fast. Capturable in a CUDA graph (no host sync)."""
    check_tensor("x", x, KERNEL_DTYPES, contiguous=False, align=1)
    K = x.shape[-1] if x.dim() else 0
    N = _check_fp8_weight(K, weight, weight_scale, bias, x.dtype, x.device)
    rows = x.numel() // K if K else 0
    if rows == 0 or K % FP8_GEMM_MULTIPLE or N % FP8_GEMM_MULTIPLE:
        return torch_ops.linear_fp8(x, weight, weight_scale, bias)
    xq, xs = quantize_fp8_rows(x.reshape(rows, K))
    return _linear_fp8_quantized(xq, xs, weight, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], N)


def linear_fp8_rows(rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_fp8 of rows already quantized (rms_norm_fp8, act_mul_fp8): rows.q (R, K) e4m3, rows.scale (R,)
    float32 -> (R, N) in rows.dtype, through the same kernels (the FP8 skinny GEMM or cuBLASLt's)."""
    check_tensor("rows.q", rows.q, (torch.float8_e4m3fn,), 2)
    dev = rows.q.device
    R, K = rows.q.shape
    check_tensor("rows.scale", rows.scale, (torch.float32,), 1, dev, align=4)
    check_shape("rows.scale", rows.scale, (R,))
    if rows.dtype not in KERNEL_DTYPES:
        fail("rows.dtype", f"must be one of {KERNEL_DTYPES}", rows.dtype)
    N = _check_fp8_weight(K, weight, weight_scale, bias, rows.dtype, dev)
    if R == 0 or K % FP8_GEMM_MULTIPLE or N % FP8_GEMM_MULTIPLE:
        return torch_ops.linear_fp8_rows(rows, weight, weight_scale, bias)
    return _linear_fp8_quantized(rows.q, rows.scale, weight, weight_scale, bias, rows.dtype)


def _check_fp8_weight(K: int, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      dtype: torch.dtype, dev: torch.device) -> int:
    """An FP8 weight (N, K) with its scales (and bias) checked: N."""
    check_tensor("weight", weight, (torch.float8_e4m3fn,), 2, dev)
    N = weight.shape[0]
    if weight.shape[1] != K:
        fail("weight", f"must be (N, {K}) like x's last dim", f"shape {tuple(weight.shape)}")
    check_tensor("weight_scale", weight_scale, (torch.float32,), 1, dev, align=4)
    check_shape("weight_scale", weight_scale, (N,))
    if bias is not None:
        check_tensor("bias", bias, (dtype,), 1, dev, align=2)
        check_shape("bias", bias, (N,))
    return N


def _linear_fp8_quantized(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(R, N) from quantized rows: the FP8 skinny kernel for up to 8 rows where it measured faster on the shape,
    else cuBLASLt's FP8 GEMM."""
    rows = xq.shape[0]
    plan = linear_fp8_plan(rows, weight, weight_scale, bias, dtype) if rows <= SKINNY_MAX_ROWS else None
    if plan is not None:
        return skinny_gemm_fp8(xq, xs, weight, weight_scale, bias, dtype, warps=plan[0], unroll=plan[1])
    return _fp8_gemm_bias(xq, xs, weight, weight_scale, bias, dtype)
