"""FP8 weights on the GPU (sm_89+): the CUDA backend's linear_fp8 (activations quantized per token by the
reference's own code, then cuBLASLt's FP8 GEMM through torch._scaled_mm, or at up to 8 rows the FP8 skinny kernel
where its plan chose it) against the torch reference, the FP8 skinny kernel itself (every variant), and the
engine with FP8 weights on the CUDA kernels against the torch reference ops, both on the GPU.

The ops are checked as the other kernels are: against a float64 oracle of the same quantized operands,
err(CUDA) <= 2 * err(torch reference in the same dtype) + one unit of the dtype's precision (the cuBLAS path
adds the bias after the GEMM's rounding, a second rounding; the skinny kernel sums in another order).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 weights need compute capability 8.9 or later", allow_module_level=True)

from flashgen.ops import cuda_linear, cuda_ops, torch_ops  # noqa: E402

DEV = torch.device("cuda")
FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16]
# (M, N, K): decode rows (1, 2, 8), an odd prefill (97), a long one (1025); N and K multiples of 16 (the FP8
# GEMM) and not (the reference's fallback on the GPU)
SHAPES = [(1, 256, 128), (2, 4096, 4096), (8, 1536, 512), (97, 768, 2048), (1025, 512, 1024), (1, 24, 40),
          (8, 256, 72), (97, 200, 128), (1025, 72, 64)]


def _operands(M, N, K, dtype, seed, bias: bool):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn((M, K), generator=g, device=DEV) * torch.logspace(-2, 1, M, device=DEV)[:, None]
    x[0, : K // 3] = 0  # a row with zeros
    wq, ws = torch_ops.quantize_fp8_rows(torch.randn((N, K), generator=g, device=DEV) * 0.05)
    b = (torch.randn(N, generator=g, device=DEV) * 0.5).to(dtype) if bias else None
    return x.to(dtype), wq, ws, b


def _oracle(x, wq, ws, b):
    xq, xs = torch_ops.quantize_fp8_rows(x)
    y = (xq.double() * xs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).t()
    return y + b.double() if b is not None else y


def _count_scaled_mm(monkeypatch) -> list:
    """torch._scaled_mm (cuBLASLt's FP8 GEMM) wrapped to append to the returned list on every call."""
    calls: list = []
    scaled_mm = torch._scaled_mm

    def counting(*a, **kw):
        calls.append(1)
        return scaled_mm(*a, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_fp8_matches_the_reference(M, N, K, dtype, bias, monkeypatch):
    calls = _count_scaled_mm(monkeypatch)
    x, wq, ws, b = _operands(M, N, K, dtype, M * 7 + N + K, bias)
    got = cuda_ops.linear_fp8(x, wq, ws, b)
    ref = torch_ops.linear_fp8(x, wq, ws, b)
    assert got.dtype == dtype and got.shape == (M, N)
    aligned = N % 16 == 0 and K % 16 == 0
    if not aligned:
        assert not calls, "the FP8 GEMM runs only where K and N are multiples of 16"
        assert torch.equal(got, ref)
        return
    assert calls or M <= cuda_linear.SKINNY_MAX_ROWS, "the FP8 GEMM runs where K and N are multiples of 16 " \
                                                      "(at up to 8 rows the FP8 skinny kernel may instead)"
    oracle = _oracle(x, wq, ws, b)
    err = (got.double() - oracle).abs().max().item()
    err_ref = (ref.double() - oracle).abs().max().item()
    eps = torch.finfo(dtype).eps * oracle.abs().max().item()
    assert err <= 2 * err_ref + eps, f"CUDA {err:.3e} vs torch {err_ref:.3e} (+{eps:.1e}), row-wise " \
                                     f"scales: {cuda_linear._ROWWISE}"
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("M,N,K", [(1025, 4096, 4096), (512, 1024, 14336)])
def test_fp8_fast_accumulation_stays_within_a_percent(M, N, K, monkeypatch):
    """FLASHGEN_FP8_FAST_ACCUM=1 (the default: the tensor cores' own accumulation along K): the FP8 GEMM's RMS error
    against the float64 oracle stays within 1% of the output's RMS at Llama-3.1-8B's K (4,096 and 14,336); with 0,
    float32 accumulation, within bf16's rounding (0.5%)."""
    x, wq, ws, _ = _operands(M, N, K, torch.bfloat16, M + N + K, False)
    xq, xs = cuda_linear.quantize_fp8_rows(x)
    oracle = _oracle(x, wq, ws, None)
    rms = oracle.pow(2).mean().sqrt()
    errs = {}
    try:
        for mode in ("0", "1"):
            monkeypatch.setenv("FLASHGEN_FP8_FAST_ACCUM", mode)
            cuda_linear.fp8_fast_accum.cache_clear()
            y = cuda_linear._fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
            assert torch.isfinite(y).all()
            errs[mode] = ((y.double() - oracle).pow(2).mean().sqrt() / rms).item()
    finally:
        cuda_linear.fp8_fast_accum.cache_clear()
    assert errs["0"] <= 0.005 and errs["1"] <= 0.01, f"relative RMS error: float32 accumulation {errs['0']:.2e}, " \
                                                    f"fast accumulation {errs['1']:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,K", [(1, 16), (7, 1040), (97, 4096), (300, 14336), (2, 8)])
def test_quantize_fp8_rows_kernel_gives_the_reference_bytes(dtype, R, K):
    """The one-pass kernel writes exactly torch_ops.quantize_fp8_rows' e4m3 bytes and scales: rows spanning five
    orders of magnitude, a row of zeros (the amax floor), values at the saturation edge, and a strided view."""
    g = torch.Generator(device=DEV).manual_seed(R * 7919 + K)
    x = (torch.randn((R, K + 24), generator=g, device=DEV) * torch.logspace(-3, 2, R, device=DEV)[:, None]).to(dtype)
    x[0, 5 % K] = 3e4 if dtype == torch.bfloat16 else 6e4  # one huge element: the rest of the row gets tiny
    if R > 2:
        x[1] = 0
    for view in (x[:, :K].contiguous(), x[:, 8:K + 8]):  # contiguous, and rows 16-byte aligned with a stride
        q, s = cuda_linear.quantize_fp8_rows(view)
        rq, rs = torch_ops.quantize_fp8_rows(view)
        assert torch.equal(s, rs), (s - rs).abs().max()
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_quantize_fp8_rows_kernel_carries_nan_and_inf_as_torch_does():
    x = torch.randn((3, 64), device=DEV).to(torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 9] = float("inf")
    q, s = cuda_linear.quantize_fp8_rows(x)
    rq, rs = torch_ops.quantize_fp8_rows(x)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s[2], rs[2]) and s[1].isinf()
    assert torch.equal(q.float().isnan(), rq.float().isnan())
    assert torch.equal(q[2].view(torch.uint8), rq[2].view(torch.uint8))


def _rows(R: int, K: int, dtype, seed: int) -> torch.Tensor:
    """Rows over five orders of magnitude, a row of zeros (R > 2) and one huge element."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn((R, K), generator=g, device=DEV) * torch.logspace(-3, 2, R, device=DEV)[:, None]
    x[0, 5 % K] = 3e4 if dtype == torch.bfloat16 else 6e4
    if R > 2:
        x[1] = 0
    return x.to(dtype)


def _same_rows(got, q, s):
    assert got.dtype in DTYPES and torch.equal(got.scale, s), (got.scale - s).abs().max()
    assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,hidden", [(1, 8), (1, 4096), (3, 1040), (97, 2048), (300, 5120), (2, 32768)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_gives_the_bytes_of_the_norm_then_the_quantization(dtype, R, hidden, with_residual):
    """One kernel makes exactly what rms_norm's kernel and then the quantization kernel make: the e4m3 bytes, the
    scales and the new residual (one row; 300 rows, past the SM count, take 4 vectors per thread; the largest
    hidden size takes 4 per thread at one row)."""
    x = _rows(R, hidden, dtype, R * 31 + hidden)
    w = (torch.randn(hidden, device=DEV) * 0.3 + 1).to(dtype)
    # the residual's huge element one column over from x's: in fp16 the two would sum past its largest finite value
    res = _rows(R, hidden, dtype, 7 + hidden).flip(0).roll(1, dims=1) if with_residual else None
    if with_residual:
        (got, got_res), (out, want_res) = (cuda_ops.rms_norm_fp8(x, w, 1e-6, res),
                                           cuda_ops.rms_norm(x, w, 1e-6, res))
        assert torch.equal(got_res, want_res)
    else:
        got, out = cuda_ops.rms_norm_fp8(x, w, 1e-6), cuda_ops.rms_norm(x, w, 1e-6)
    _same_rows(got, *cuda_linear.quantize_fp8_rows(out))
    assert got.dtype == dtype


def test_rms_norm_fp8_updates_the_residual_in_place_and_carries_nan():
    x, res = _rows(4, 1024, torch.bfloat16, 1), _rows(4, 1024, torch.bfloat16, 2)
    x[2, 7] = float("nan")
    out, want_res = cuda_ops.rms_norm(x, torch.ones(1024, device=DEV, dtype=torch.bfloat16), 1e-6, res)
    r = res.clone()
    got, got_res = cuda_ops.rms_norm_fp8(x, torch.ones(1024, device=DEV, dtype=torch.bfloat16), 1e-6, r,
                                         residual_out=r)
    assert got_res.data_ptr() == r.data_ptr() and torch.equal(r.nan_to_num(), want_res.nan_to_num())
    assert int(r.isnan().sum()) == 1
    q, s = cuda_linear.quantize_fp8_rows(out)
    assert torch.equal(got.scale.isnan(), s.isnan()) and got.scale[2].isnan() and not got.scale[3].isnan()
    assert torch.equal(got.q[3].view(torch.uint8), q[3].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("R,inter", [(1, 8), (1, 14336), (5, 3072), (300, 1536), (2, 32768), (3, 32776)])
def test_act_mul_fp8_gives_the_bytes_of_the_activation_then_the_quantization(dtype, act, R, inter):
    """silu / gelu_tanh times up with the output quantized in one kernel: exactly the bytes of the activation
    kernel and then the quantization kernel (inter 32,776 is past one CTA's row: the two kernels run)."""
    x = _rows(R, 2 * inter, dtype, R + inter) * 0.05
    got = cuda_ops.act_mul_fp8(x, act)
    plain = cuda_ops.silu_mul(x) if act == "silu" else cuda_ops.gelu_tanh_mul(x)
    _same_rows(got, *cuda_linear.quantize_fp8_rows(plain))
    with pytest.raises(ValueError, match="act must be one of silu, gelu_tanh"):
        cuda_ops.act_mul_fp8(x, "relu")


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_fp8_rows_equals_linear_fp8_of_the_rows_they_came_from(M, N, K, bias):
    """Rows quantized by the op before (rms_norm_fp8, act_mul_fp8) through linear_fp8_rows: the same kernels and so
    the same output as linear_fp8 of the unquantized rows, on the skinny kernel's rows, cuBLASLt's and the
    reference's shapes; and on the torch reference, the reference's linear_fp8."""
    from flashgen.ops.backend import Fp8Rows

    x, wq, ws, b = _operands(M, N, K, torch.bfloat16, M + N, bias)
    rows = Fp8Rows(*cuda_linear.quantize_fp8_rows(x), torch.bfloat16)
    assert torch.equal(cuda_ops.linear_fp8_rows(rows, wq, ws, b), cuda_ops.linear_fp8(x, wq, ws, b))
    assert torch.equal(torch_ops.linear_fp8_rows(rows, wq, ws, b), torch_ops.linear_fp8(x, wq, ws, b))


def test_linear_fp8_takes_leading_dims_and_is_capturable():
    x, wq, ws, b = _operands(16, 512, 256, torch.bfloat16, 3, True)
    eager = cuda_ops.linear_fp8(x, wq, ws, b)
    torch.testing.assert_close(cuda_ops.linear_fp8(x.view(2, 8, 256), wq, ws, b), eager.view(2, 8, 512),
                               rtol=0, atol=0)
    torch.testing.assert_close(_replayed(x, wq, ws, b), cuda_ops.linear_fp8(x * 2, wq, ws, b))  # bf16
    # tolerances: cuBLASLt may pick another algorithm inside a capture


def test_linear_fp8_refuses_bad_arguments():
    x, wq, ws, _ = _operands(4, 64, 32, torch.bfloat16, 0, False)
    with pytest.raises(ValueError, match="weight must have dtype torch.float8_e4m3fn"):
        cuda_ops.linear_fp8(x, wq.bfloat16(), ws)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(64,\)"):
        cuda_ops.linear_fp8(x, wq, ws[:32])
    with pytest.raises(ValueError, match="x must have dtype"):
        cuda_ops.linear_fp8(x.float(), wq, ws)


# ---------------------------------------------------------------- FP8 skinny GEMM (decode at small batch)
# (N, K): one CTA exactly (16) and a partial one (17), N not a multiple of 16 (1000); K of one 16-byte vector per
# lane (16: most warps' slices empty), an awkward multiple of 16 (1040: partial 64-k steps), the 8B shapes' 4096
# and 14336 (several chunks per warp)
SKINNY_SHAPES = [(16, 16), (17, 16), (17, 1040), (16, 14336), (1000, 1040), (1000, 14336), (4096, 16), (4096, 4096)]


def _skinny_operands(M, N, K, dtype, seed, bias: bool):
    """Fresh random operands, no zeros planted: x rows and weight rows of different magnitudes (so a scale read
    for the wrong row shows), weights quantized per row as at load."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn((M, K), generator=g, device=DEV) * torch.logspace(-1, 1, M, device=DEV)[:, None]
    w = torch.randn((N, K), generator=g, device=DEV) * torch.logspace(-3, -1, N, device=DEV)[:, None]
    wq, ws = torch_ops.quantize_fp8_rows(w)
    b = (torch.randn(N, generator=g, device=DEV) * 0.5).to(dtype) if bias else None
    return x.to(dtype), wq, ws, b


def _check_skinny(name, got, x, wq, ws, b):
    ref = torch_ops.linear_fp8(x, wq, ws, b)
    oracle = _oracle(x, wq, ws, b)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an unwritten element?)"
    err = (got.double() - oracle).abs().max().item()
    err_ref = (ref.double() - oracle).abs().max().item()
    eps = torch.finfo(x.dtype).eps * oracle.abs().max().item()
    assert err <= 2 * err_ref + eps, f"{name}: max err {err:.3e} vs torch {err_ref:.3e} (+{eps:.1e})"


@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("N,K", SKINNY_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_gemm_fp8_matches_the_reference(M, N, K, dtype, bias):
    """Every (warps, unroll) variant against torch_ops.linear_fp8's arithmetic on the same quantized operands."""
    x, wq, ws, b = _skinny_operands(M, N, K, dtype, 1000 * M + N + K + bias, bias)
    xq, xs = torch_ops.quantize_fp8_rows(x)
    for warps, unroll in cuda_linear.SKINNY_FP8_VARIANTS:
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        got = cuda_ops.skinny_gemm_fp8(xq, xs, wq, ws, b, dtype, out=out, warps=warps, unroll=unroll)
        assert got is out
        _check_skinny(f"skinny_gemm_fp8 {warps}x{unroll} M={M} N={N} K={K} {dtype} bias={bias}", got, x, wq, ws, b)
    # without out=: a fresh tensor of out_dtype
    _check_skinny("skinny_gemm_fp8 (new out)", cuda_ops.skinny_gemm_fp8(xq, xs, wq, ws, b, dtype), x, wq, ws, b)


def test_skinny_gemm_fp8_refuses_bad_arguments():
    x, wq, ws, b = _skinny_operands(4, 64, 64, torch.bfloat16, 5, True)
    xq, xs = torch_ops.quantize_fp8_rows(x)
    bf = torch.bfloat16
    f = cuda_ops.skinny_gemm_fp8
    x9q, x9s = torch_ops.quantize_fp8_rows(torch.randn(9, 64, device=DEV))
    with pytest.raises(ValueError, match=r"xq must have 1 to 8 rows, got shape \(9, 64\)"):
        f(x9q, x9s, wq, ws, b, bf)
    x24q, x24s = torch_ops.quantize_fp8_rows(torch.randn(4, 24, device=DEV))
    with pytest.raises(ValueError, match=r"xq must have a last dim that is a positive multiple of 16, got shape"):
        f(x24q, x24s, torch_ops.quantize_fp8_rows(torch.randn(64, 24, device=DEV))[0], ws, b, bf)
    with pytest.raises(ValueError, match="xq must have dtype torch.float8_e4m3fn"):
        f(x, xs, wq, ws, b, bf)
    with pytest.raises(ValueError, match=r"xs must have shape \(4,\)"):
        f(xq, xs[:3], wq, ws, b, bf)
    with pytest.raises(ValueError, match="xs must have dtype torch.float32"):
        f(xq, xs.double(), wq, ws, b, bf)
    with pytest.raises(ValueError, match="weight must have dtype torch.float8_e4m3fn"):
        f(xq, xs, wq.bfloat16(), ws, b, bf)
    with pytest.raises(ValueError, match=r"weight must be \(N > 0, 64\) like xq's last dim, got shape \(64, 32\)"):
        f(xq, xs, wq[:, :32].contiguous(), ws, b, bf)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        f(xq, xs, wq.t(), ws, b, bf)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(64,\)"):
        f(xq, xs, wq, ws[:32], b, bf)
    with pytest.raises(ValueError, match="out_dtype must be torch.bfloat16 or torch.float16, got torch.float32"):
        f(xq, xs, wq, ws, None, torch.float32)
    with pytest.raises(ValueError, match="bias must have dtype torch.float16"):
        f(xq, xs, wq, ws, b, torch.float16)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        f(xq, xs, wq, ws, b[:63], bf)
    with pytest.raises(ValueError, match=r"\(warps, unroll\) must be one of .*, got \(3, 8\)"):
        f(xq, xs, wq, ws, b, bf, warps=3, unroll=8)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 64\)"):
        f(xq, xs, wq, ws, b, bf, out=torch.empty(4, 63, dtype=bf, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_fp8_plan_and_skinny_path(dtype, monkeypatch):
    """linear_fp8 at 1 to 8 rows: the plan picks cuBLASLt or a skinny variant (measured, then remembered), and
    the result matches the reference whichever it picked, and with either forced by FLASHGEN_LINEAR; the
    skinny path runs no _scaled_mm."""
    monkeypatch.delenv("FLASHGEN_LINEAR", raising=False)
    N, K = 1536, 2048
    _, wq, ws, b = _skinny_operands(1, N, K, dtype, 11, True)
    for bias in (None, b):
        plan = cuda_linear.linear_fp8_plan(1, wq, ws, bias, dtype)
        assert plan is None or plan in cuda_linear.SKINNY_FP8_VARIANTS
        key = (wq.device, wq.dtype, 1, N, K, bias is not None, dtype)
        assert set(cuda_linear.LINEAR_TIMES[key]) == {"cublas", *cuda_linear.SKINNY_FP8_VARIANTS}
        assert cuda_linear.linear_fp8_plan(1, wq, ws, bias, dtype) == plan  # remembered
    calls = _count_scaled_mm(monkeypatch)
    for forced in ("auto", "skinny", "cublas"):
        monkeypatch.setenv("FLASHGEN_LINEAR", forced)
        for M in range(1, 9):
            x = _skinny_operands(M, N, K, dtype, 20 + M, False)[0]
            for bias in (None, b):
                calls.clear()
                got = cuda_ops.linear_fp8(x, wq, ws, bias)
                _check_skinny(f"linear_fp8 {forced} M={M} bias={bias is not None}", got, x, wq, ws, bias)
                if forced == "skinny":
                    assert not calls, "FLASHGEN_LINEAR=skinny: the FP8 skinny kernel, not _scaled_mm"
                elif forced == "cublas":
                    assert calls, "FLASHGEN_LINEAR=cublas: _scaled_mm"
        x3 = _skinny_operands(6, N, K, dtype, 40, False)[0].view(2, 3, K)  # leading dims
        torch.testing.assert_close(cuda_ops.linear_fp8(x3, wq, ws, b),
                                   cuda_ops.linear_fp8(x3.reshape(6, K), wq, ws, b).view(2, 3, N), rtol=0, atol=0)


def test_linear_fp8_skinny_is_capturable(monkeypatch):
    """The FP8 skinny path inside a CUDA graph (the decode graphs): replays see new inputs."""
    monkeypatch.setenv("FLASHGEN_LINEAR", "skinny")
    x, wq, ws, b = _skinny_operands(4, 512, 1024, torch.bfloat16, 7, True)
    torch.testing.assert_close(_replayed(x, wq, ws, b), cuda_ops.linear_fp8(x * 2, wq, ws, b), rtol=0, atol=0)


def _replayed(x, wq, ws, b) -> torch.Tensor:
    """linear_fp8 captured in a CUDA graph on a copy of x (after an eager call that compiles and plans outside
    the capture), replayed with 2 x in that copy: the replay's output."""
    static_x = x.clone()
    cuda_ops.linear_fp8(static_x, wq, ws, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ops.linear_fp8(static_x, wq, ws, b)
    static_x.copy_(x * 2)
    graph.replay()
    return out


def _run(model, backend: str, quantization: str, prompt: list[int]) -> tuple[bool, torch.Tensor]:
    """(whether the weights ran FP8, the prompt's float32 logits) of one engine on the GPU in bf16."""
    from flashgen import SamplingParams
    from flashgen.config import EngineConfig
    from flashgen.llm import LLM

    llm = LLM(config=EngineConfig(model=str(model), device="cuda", dtype="bfloat16", backend=backend,
                                  quantization=quantization, kv_cache_gb=0.01))
    try:
        m = llm.engine.runner.model
        fp8 = bool(m.weights_fp8)
        if fp8:
            assert all(L[k].dtype == FP8 for L in m.layers for k in ("qkv", "o", "gate_up", "down"))
            assert m.lm_head.dtype == torch.bfloat16 and "FP8 weights" in llm.describe()
            # decode too (CUDA graphs on the CUDA backend)
            out = llm.generate([prompt[:10]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 6
        return fp8, llm.engine.runner.prompt_logits(prompt)
    finally:
        llm.close()


def test_engine_fp8_weights_cuda_kernels_against_the_torch_reference(tmp_path):
    """A tiny random model with --quantization fp8, and an FP8 checkpoint (compressed-tensors, per tensor), run by
    the CUDA backend and by the torch reference ops, both on the GPU in bf16. The two FP8 runs are as far from the
    bf16 model as each other (a wrong scale would put one of them far off), and close to each other: not equal,
    since the other kernels round differently in bf16, and an activation near an e4m3 rounding boundary may then
    round the other way (one step of 2^-4)."""
    from checkpoints import make_checkpoint
    from flashgen.ops import cuda_backend_available
    from test_fp8_weights import _ct_config, write_fp8_checkpoint

    ok, why = cuda_backend_available()
    if not ok:
        pytest.skip(why)
    base = make_checkpoint(tmp_path / "m", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                           intermediate_size=512, vocab_size=512, max_position_embeddings=1024, dtype="bfloat16")
    fp8_dir = write_fp8_checkpoint(base, tmp_path / "fp8", _ct_config("tensor"), per_channel=False)
    prompt = list(range(3, 300))
    _, bf16 = _run(base, "torch", "auto", prompt)
    for model, quant in ((base, "fp8"), (fp8_dir, "auto")):
        (fp8_cuda, cuda8), (fp8_torch, torch8) = _run(model, "cuda", quant, prompt), _run(model, "torch", quant, prompt)
        assert fp8_cuda and fp8_torch and torch.isfinite(cuda8).all()
        err_cuda = ((cuda8 - bf16).norm() / bf16.norm()).item()
        err_torch = ((torch8 - bf16).norm() / bf16.norm()).item()
        assert err_cuda <= 1.5 * err_torch + 0.01, f"{model.name}: vs bf16, CUDA {err_cuda:.3f}, torch {err_torch:.3f}"
        rel = ((cuda8 - torch8).norm() / torch8.norm()).item()
        assert rel < 0.15, f"{model.name}: CUDA vs torch FP8 logits differ by {rel:.3f} of their norm"
        agree = (cuda8.argmax(-1) == torch8.argmax(-1)).float().mean().item()
        assert agree > 0.7, f"{model.name}: CUDA/torch FP8 top-1 agreement {agree:.2%}"
