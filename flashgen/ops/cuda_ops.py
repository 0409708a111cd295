"""CUDA backend: thin wrappers over kernels/*.cu (compiled at run time by CuPy, see jit.py).

Same functions, signatures and return conventions as torch_ops (the reference); each may also take `out=`
(and decode_attention `return_lse=`, `num_splits=`). Every wrapper checks device, dtype, shape and
contiguity, and refuses anything else with a ValueError that names the argument and its value. Launches go
to torch's current stream with raw pointers, so the ops can be captured in CUDA graphs (compile first:
the first call of each variant compiles and loads its module).

Importing this module needs neither CuPy nor a GPU; calling an op does.

Shapes (DESIGN.md):
  k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim), block_size a power of two >= 16
  block_tables     : (batch, max_blocks_per_seq) int32, last dim contiguous
  slot_mapping     : (num_tokens,) int32 or int64, block * block_size + offset; -1 = do not write
  cos_sin          : (max_positions, head_dim) float32: cos in [:, :head_dim/2], sin in [:, head_dim/2:]
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from flashgen.ops import jit, tma
from flashgen.ops.timing import bench

DTYPES = (torch.bfloat16, torch.float16)
ATTN_HEAD_DIMS = (64, 128)
RMS_MAX_HIDDEN = 8 * 4 * 1024  # kernels/norms.cu: RMS_VPT vectors of 8 per thread, 1024 threads
# prefill tiles per head_dim: (16-row m-tiles per warp, keys per tile); kernels/prefill_attention.cu
PREFILL_TILES = {64: (2, 64), 128: (2, 64)}
PREFILL_TILE_CHOICES = ((1, 64), (1, 32), (2, 32), (2, 64))
# prefill kernels: "wgmma" (kernels/prefill_attention_sm90.cu, Hopper only) and "mma" (prefill_attention.cu,
# any sm_80+ GPU); FLASHGEN_PREFILL=auto|wgmma|mma, auto = wgmma where the GPU has it
PREFILL_IMPLS = ("wgmma", "mma")
WGMMA_ARCH = "sm_90"  # the architecture with wgmma (built for its arch-specific target, sm_90a)
PREFILL_SM90_SMEM = {d: 128 * d * 2 * 6 + 1024 for d in ATTN_HEAD_DIMS}  # 2 Q + 2 K + 2 V slots + alignment
DECODE_MAX_SPLITS = 256
DECODE_PLANS = ("auto", "split", "balanced")  # kernels/decode_attention.cu: plan 0, 1, 2


# ---------------------------------------------------------------- argument checks
def _fail(name: str, what: str, value) -> None:
    raise ValueError(f"{name} {what}, got {value}")


def _choose(name: str, value: str, choices: tuple[str, ...]) -> str:
    """value when it is one of choices; else a ValueError naming where it came from (an argument or an
    environment variable), the value and the choices."""
    if value not in choices:
        _fail(name, f"must be one of {', '.join(choices)}", repr(value))
    return value


def _check_tensor(name: str, t, dtypes=None, ndim: int | None = None, device: torch.device | None = None,
                  contiguous: bool = True, align: int = 16) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, "must be a torch.Tensor", type(t).__name__)
    if not t.is_cuda:
        _fail(name, "must be a CUDA tensor", f"device {t.device}")
    if device is not None and t.device != device:
        _fail(name, f"must be on {device} like the other arguments", f"device {t.device}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(name, f"must have dtype {' or '.join(str(d) for d in dtypes)}", t.dtype)
    if ndim is not None and t.dim() != ndim:
        _fail(name, f"must have {ndim} dimensions", f"shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        _fail(name, "must be contiguous", f"strides {t.stride()} for shape {tuple(t.shape)}")
    if t.numel() and t.data_ptr() % align:  # the kernels use 16-byte vector accesses
        _fail(name, f"must start at a {align}-byte aligned address", f"address {t.data_ptr():#x}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(name, f"must have shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _check_out(out, like_shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out"):
    if out is None:
        return None
    _check_tensor(name, out, (dtype,), device=device)
    _check_shape(name, out, like_shape)
    return out


def _check_cache(k_cache, v_cache, dtype, device) -> tuple[int, int, int]:
    _check_tensor("k_cache", k_cache, (dtype,), 4, device)
    _check_tensor("v_cache", v_cache, (dtype,), 4, device)
    if k_cache.shape != v_cache.shape:
        _fail("v_cache", f"must have k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    _, bs, hkv, d = k_cache.shape
    if bs < 16 or bs & (bs - 1):
        _fail("k_cache", "block size (dim 1) must be a power of two >= 16", bs)
    return bs, hkv, d


def _check_block_tables(block_tables, batch: int, device) -> None:
    _check_tensor("block_tables", block_tables, (torch.int32,), 2, device, contiguous=False, align=4)
    if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        _fail("block_tables", f"must be ({batch}, max_blocks) with contiguous rows",
              f"shape {tuple(block_tables.shape)} strides {block_tables.stride()}")


def _dev(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------- linear
SKINNY_MAX_ROWS = 8  # kernels/skinny_gemm.cu: the rows are the n = 8 of an m16n8k16 product
# (warps per CTA, k steps in flight per lane) of the skinny kernel that linear_plan measures against cuBLAS
SKINNY_VARIANTS = ((4, 8), (8, 8), (2, 8), (4, 4))
_LINEAR_PLAN: dict[tuple, tuple | None] = {}  # (device, dtype, rows, N, K, bias) -> a skinny variant, None = cuBLAS
LINEAR_TIMES: dict[tuple, dict] = {}  # the measurements behind each plan: {"cublas" or variant: s per call}


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, warps: int = 4, unroll: int = 8) -> torch.Tensor:
    """x (M, K) . weight (N, K)^T [+ bias (N,)] -> (M, N) for 1 <= M <= 8, fp32 accumulation, rounded once:
    a streaming pass over the weight on the tensor cores (decode at small batch)."""
    _check_tensor("x", x, DTYPES, 2)
    dev = x.device
    M, K = x.shape
    if not 1 <= M <= SKINNY_MAX_ROWS:
        _fail("x", f"must have 1 to {SKINNY_MAX_ROWS} rows", f"shape {tuple(x.shape)}")
    if K % 8 or K == 0:
        _fail("x", "must have a last dim that is a positive multiple of 8", f"shape {tuple(x.shape)}")
    _check_tensor("weight", weight, (x.dtype,), 2, dev)
    N = weight.shape[0]
    if weight.shape[1] != K or N == 0:
        _fail("weight", f"must be (N > 0, {K}) like x's last dim", f"shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, (x.dtype,), 1, dev, align=2)
        _check_shape("bias", bias, (N,))
    if (warps, unroll) not in SKINNY_VARIANTS:
        _fail("(warps, unroll)", f"must be one of {SKINNY_VARIANTS}", (warps, unroll))
    out = _check_out(out, (M, N), x.dtype, dev)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=dev)
    k_per_warp = -(-K // (32 * warps)) * 32
    kern = jit.get_kernel("skinny_gemm.cu", "skinny_gemm_kernel", x.dtype, 0, _dev(x), 0, (("SG_U", unroll),))
    jit.launch(kern, (-(-N // 16),), (32 * warps,), (
        jit.ptr(x), jit.i64(K), jit.ptr(weight), jit.ptr(bias), jit.ptr(out), jit.i64(N),
        jit.i32(M), jit.i32(N), jit.i32(K), jit.i32(k_per_warp)), dev)
    return out


def linear_plan(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int] | None:
    """Which kernel runs `rows` x weight^T: None = cuBLAS, else the skinny kernel's (warps, unroll). Measured once
    per shape (cuBLAS and each skinny variant, replayed from a CUDA graph over weight copies rotated past L2,
    as the layers of a real step are), then remembered. During CUDA-graph capture an unmeasured shape gets
    cuBLAS. The environment variable FLASHGEN_LINEAR=cublas|skinny overrides the measurement."""
    forced = _choose("FLASHGEN_LINEAR", os.environ.get("FLASHGEN_LINEAR", "auto"), ("auto", "cublas", "skinny"))
    if forced != "auto":
        return None if forced == "cublas" else SKINNY_VARIANTS[0]
    rows = 1 << (rows - 1).bit_length()  # measured at 1, 2, 4, 8 rows (the decode graphs' small buckets)
    key = (weight.device, weight.dtype, rows, *weight.shape, bias is not None)
    if key in _LINEAR_PLAN:
        return _LINEAR_PLAN[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    N, K = weight.shape
    wbytes = weight.numel() * weight.element_size()
    copies = max(1, -(-(96 << 20) // wbytes))  # ~96 MB of weights: twice the H100's L2
    g = torch.Generator(device=weight.device).manual_seed(0)
    ws = [weight] if copies == 1 else [
        (torch.randn(weight.shape, generator=g, device=weight.device) * 0.02).to(weight.dtype) for _ in range(copies)]
    x = torch.randn((rows, K), generator=g, device=weight.device).to(weight.dtype)
    out = torch.empty((rows, N), dtype=weight.dtype, device=weight.device)
    calls = max(copies, 4)
    times = {"cublas": bench(lambda i: torch.nn.functional.linear(x, ws[i % copies], bias), reps=7, inner=calls,
                             warmup=1)}
    for v in SKINNY_VARIANTS:
        times[v] = bench(lambda i, v=v: skinny_gemm(x, ws[i % copies], bias, out=out, warps=v[0], unroll=v[1]),
                         reps=7, inner=calls, warmup=1)
    best = min(times, key=times.get)
    plan = None if best == "cublas" else best
    _LINEAR_PLAN[key], LINEAR_TIMES[key] = plan, times
    return plan


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the skinny kernel for up to 8 rows where it measured faster than cuBLAS."""
    K = x.shape[-1] if x.dim() else 0
    rows = x.numel() // K if K else 0
    if (1 <= rows <= SKINNY_MAX_ROWS and x.is_cuda and x.dtype in DTYPES and weight.dtype == x.dtype
            and K % 8 == 0 and x.is_contiguous() and weight.is_contiguous() and weight.dim() == 2
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and (bias is None or bias.is_contiguous())):
        plan = linear_plan(rows, weight, bias)
        if plan is not None:
            y = skinny_gemm(x.reshape(rows, K), weight, bias, warps=plan[0], unroll=plan[1])
            return y.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


# ---------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """RMSNorm over the last dim of `x` (..., hidden). With `residual`: returns (norm(x + residual), x + residual);
    `residual_out` may be `residual` itself (in-place update, as vLLM's fused_add_rms_norm)."""
    _check_tensor("x", x, DTYPES)
    dev = x.device
    hidden = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or hidden % 8 or not 0 < hidden <= RMS_MAX_HIDDEN:
        _fail("x", f"must have a last dim that is a multiple of 8 in [8, {RMS_MAX_HIDDEN}]", f"shape {tuple(x.shape)}")
    _check_tensor("weight", weight, (x.dtype,), 1, dev)
    _check_shape("weight", weight, (hidden,))
    if residual is not None:
        _check_tensor("residual", residual, (x.dtype,), device=dev)
        _check_shape("residual", residual, tuple(x.shape))
    out = _check_out(out, tuple(x.shape), x.dtype, dev)
    if out is None:
        out = torch.empty_like(x)
    if residual is not None:
        residual_out = _check_out(residual_out, tuple(x.shape), x.dtype, dev, "residual_out")
        if residual_out is None:
            residual_out = torch.empty_like(x)
    rows = x.numel() // hidden
    if rows:
        # RMS_VPT (4) vectors of 8 per thread at most; a few rows (decode at small batch) get one per thread
        per_thread = -(-(hidden // 8) // (1 if rows < _num_sms(_dev(x)) else 4))
        threads = min(1024, max(32, -(-per_thread // 32) * 32))
        k = jit.get_kernel("norms.cu", "rms_norm_kernel", x.dtype, 0, _dev(x))
        jit.launch(k, (rows,), (threads,), (
            jit.ptr(x), jit.ptr(residual), jit.ptr(weight), jit.ptr(out),
            jit.ptr(residual_out if residual is not None else None), jit.i32(hidden), jit.f32(eps)), dev)
    return out if residual is None else (out, residual_out)


def silu_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2 * inter) -> (..., inter): silu(gate) * up, gate first."""
    _check_tensor("x", x, DTYPES)
    if x.dim() < 1 or x.shape[-1] % 16 or x.shape[-1] == 0:
        _fail("x", "must have a last dim that is a positive multiple of 16 (2 * inter, inter % 8 == 0)",
              f"shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    shape = (*x.shape[:-1], inter)
    out = _check_out(out, shape, x.dtype, x.device)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    rows = x.numel() // x.shape[-1]
    if rows:
        k = jit.get_kernel("norms.cu", "silu_mul_kernel", x.dtype, 0, _dev(x))
        nvec = inter // 8
        threads = min(256, -(-nvec // 32) * 32)
        jit.launch(k, (rows, -(-nvec // threads)), (threads,), (jit.ptr(x), jit.ptr(out), jit.i32(inter)),
                   x.device)
    return out


# ---------------------------------------------------------------- rope + kv append
def rope_kv_append(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, slot_mapping: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6, interleaved: bool = False, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (T, (Hq + 2 Hkv) * D) -> q (T, Hq, D) rotated; rotated k and v written to their cache slots
    (slot -1: not written). Qwen3's per-head RMSNorm (q_norm, k_norm: (D,)) runs before the rotation."""
    _check_tensor("qkv", qkv, DTYPES, 2)
    dev = qkv.device
    bs, hkv, d = _check_cache(k_cache, v_cache, qkv.dtype, dev)
    if d % 16 or not 32 <= d <= 512:
        _fail("k_cache", "head_dim (dim 3) must be a multiple of 16 in [32, 512]", d)
    T, width = qkv.shape
    if width % d or width // d <= 2 * hkv:
        _fail("qkv", f"must be (T, (Hq + 2 * {hkv}) * {d}) with Hq >= 1", f"shape {tuple(qkv.shape)}")
    hq = width // d - 2 * hkv
    _check_tensor("positions", positions, (torch.int32, torch.int64), 1, dev, align=4)
    _check_shape("positions", positions, (T,))
    _check_tensor("slot_mapping", slot_mapping, (torch.int32, torch.int64), 1, dev, align=4)
    _check_shape("slot_mapping", slot_mapping, (T,))
    _check_tensor("cos_sin", cos_sin, (torch.float32,), 2, dev)
    if cos_sin.shape[1] != d:
        _fail("cos_sin", f"must be (max_positions, {d}) float32", f"shape {tuple(cos_sin.shape)}")
    if (q_norm is None) != (k_norm is None):
        _fail("q_norm/k_norm", "must both be given or both be None",
              f"q_norm {type(q_norm).__name__}, k_norm {type(k_norm).__name__}")
    if q_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            _check_tensor(name, w, (qkv.dtype,), 1, dev)
            _check_shape(name, w, (d,))
    out = _check_out(out, (T, hq, d), qkv.dtype, dev)
    if out is None:
        out = torch.empty((T, hq, d), dtype=qkv.dtype, device=dev)
    if T:
        k = jit.get_kernel("rope_kv_append.cu", "rope_kv_append_kernel", qkv.dtype, d, _dev(qkv))
        jit.launch(k, (T,), (128,), (  # ROPE_THREADS in kernels/rope_kv_append.cu
            jit.ptr(qkv), jit.ptr(positions), jit.i32(positions.dtype == torch.int64), jit.ptr(cos_sin),
            jit.ptr(slot_mapping), jit.i32(slot_mapping.dtype == torch.int64), jit.ptr(k_cache),
            jit.ptr(v_cache), jit.ptr(out), jit.ptr(q_norm), jit.ptr(k_norm), jit.f32(norm_eps), jit.i32(hq),
            jit.i32(hkv), jit.i32(bool(interleaved))), dev)
    return out


# ---------------------------------------------------------------- attention
def _check_attn(q, k_cache, v_cache, dev):
    bs, hkv, d = _check_cache(k_cache, v_cache, q.dtype, dev)
    if d not in ATTN_HEAD_DIMS:
        _fail("k_cache", f"head_dim (dim 3) must be one of {ATTN_HEAD_DIMS}", d)
    if q.shape[2] != d:
        _fail("q", f"must have head_dim {d} like k_cache", f"shape {tuple(q.shape)}")
    hq = q.shape[1]
    if hq == 0 or hq % hkv:
        _fail("q", f"must have a number of heads that is a multiple of num_kv_heads {hkv}", f"shape {tuple(q.shape)}")
    return bs, hkv, d, hq


def prefill_smem_bytes(head_dim: int, tile: tuple[int, int]) -> int:
    mt, bn = tile
    q_tile = 64 * mt * head_dim * 2 if mt == 2 else 0  # MT == 1 stages Q in stage 1's buffers
    return q_tile + 4 * bn * head_dim * 2  # + 2 stages x (K + V)


def prefill_impl(device_index: int) -> str:
    """The prefill kernel used on a device: $FLASHGEN_PREFILL (auto, wgmma or mma); auto picks wgmma on
    Hopper (compute capability 9.0) and mma elsewhere."""
    choice = _choose("FLASHGEN_PREFILL", os.environ.get("FLASHGEN_PREFILL", "auto"), ("auto", *PREFILL_IMPLS))
    if choice == "auto":
        return "wgmma" if jit.device_arch(device_index) == WGMMA_ARCH and device_index not in _WGMMA_FAILED else "mma"
    return choice


_WGMMA_FAILED: dict[int, str] = {}  # device -> why the sm_90a build failed (auto then falls back to mma)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, max_seqlen_q: int,
                      softmax_scale: float, *, out: torch.Tensor | None = None,
                      tile: tuple[int, int] | None = None, impl: str | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged cache. q (total_q, Hq, D); sequence b owns q rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and attends to its first context_lens[b] cached tokens (its new tokens
    included), the mask aligned bottom-right; needs context_lens[b] >= q_len_b and max_seqlen_q >= every
    q_len_b. Returns (total_q, Hq, D). `impl` picks the kernel (PREFILL_IMPLS; default prefill_impl());
    `tile` the mma kernel's (m-tiles per warp, keys per tile) (PREFILL_TILE_CHOICES; for benchmarks)."""
    _check_tensor("q", q, DTYPES, 3)
    dev = q.device
    bs, hkv, d, hq = _check_attn(q, k_cache, v_cache, dev)
    _check_tensor("cu_seqlens_q", cu_seqlens_q, (torch.int32,), 1, dev, align=4)
    B = cu_seqlens_q.shape[0] - 1
    if B < 0:
        _fail("cu_seqlens_q", "must have batch + 1 entries", f"shape {tuple(cu_seqlens_q.shape)}")
    _check_tensor("context_lens", context_lens, (torch.int32,), 1, dev, align=4)
    _check_shape("context_lens", context_lens, (B,))
    _check_block_tables(block_tables, B, dev)
    max_seqlen_q = int(max_seqlen_q)
    if max_seqlen_q < 0:
        _fail("max_seqlen_q", "must be >= 0", max_seqlen_q)
    out = _check_out(out, tuple(q.shape), q.dtype, dev)
    if out is None:
        out = torch.empty_like(q)
    di = _dev(q)
    auto = impl is None and tile is None
    if impl is None:
        impl = "mma" if tile is not None else prefill_impl(di)
    if impl not in PREFILL_IMPLS:
        _fail("impl", f"must be one of {PREFILL_IMPLS}", impl)
    if impl == "wgmma":
        if tile is not None:
            _fail("tile", "applies to the mma kernel only (impl='mma')", tile)
        arch = jit.device_arch(di)
        if arch != WGMMA_ARCH:
            _fail("impl", f"'wgmma' needs a Hopper GPU ({WGMMA_ARCH}); {dev} is {arch}", impl)
    else:
        tile = PREFILL_TILES[d] if tile is None else tuple(tile)
        if tile not in PREFILL_TILE_CHOICES:
            _fail("tile", f"must be one of {PREFILL_TILE_CHOICES}", tile)
    if not (B and max_seqlen_q and q.shape[0]):
        return out
    if impl == "wgmma":
        smem, block_m = PREFILL_SM90_SMEM[d], 128
        try:
            k = jit.get_kernel("prefill_attention_sm90.cu", "prefill_attention_sm90_kernel", q.dtype, d, di, smem,
                               arch_specific=True)
            # K/V tiles come by TMA, one box per page (or per 128-token tile of a longer page)
            maps = (tma.paged_cache_map(k_cache, min(bs, 128)), tma.paged_cache_map(v_cache, min(bs, 128)))
        except Exception as e:  # noqa: BLE001 - any failure of the sm_90a build: the portable kernel still works
            if not auto:
                raise
            _WGMMA_FAILED[di] = f"{type(e).__name__}: {e}"
            warnings.warn(f"flashgen: the Hopper (wgmma) prefill kernel could not be built on {dev} "
                          f"({_WGMMA_FAILED[di][:300]}); using the mma.sync kernel instead", RuntimeWarning,
                          stacklevel=2)
            return prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                                     softmax_scale, out=out, impl="mma")
    else:
        smem, block_m = prefill_smem_bytes(d, tile), 64 * tile[0]
        k = jit.get_kernel("prefill_attention.cu", "prefill_attention_kernel", q.dtype, d, di, smem,
                           (("PF_MT", tile[0]), ("PF_BN", tile[1])))
    mblocks = -(-max_seqlen_q // block_m)
    args = (jit.ptr(q), jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(cu_seqlens_q), jit.ptr(context_lens),
            jit.ptr(block_tables), jit.i32(block_tables.stride(0)), jit.ptr(out), jit.i32(hq), jit.i32(hkv),
            jit.i32(bs.bit_length() - 1), jit.f32(softmax_scale * math.log2(math.e)))
    if impl == "wgmma":
        # persistent: one CTA per SM (a producer and 2 consumer warpgroups) takes (sequence, head, m-block)
        # items from a counter in turn
        sched = _split_counters(dev, 2, user="prefill")
        jit.launch(k, (min(_num_sms(di), mblocks * hq * B),), (384,), (
            *args, jit.i32(B), jit.ptr(maps[0]), jit.ptr(maps[1]), jit.ptr(sched)), dev, shared_mem=smem)
    else:
        # grid (m-blocks, Hq, B), 4 warps
        jit.launch(k, (mblocks, hq, B), (128,), (*args, jit.i32(mblocks)), dev, shared_mem=smem)
    return out


_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}


def _split_counters(dev: torch.device, n: int, user: str = "decode") -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last CTA merges the others' partials (decode: one per
    (sequence, kv head, group of 8 query heads); sampling: one per row) and for the persistent Hopper prefill's
    work queue (next item, CTAs done); the kernels leave them at zero again. Allocated once per device and user,
    outside any CUDA-graph capture (the eager warm-up call does it). One set per device: two launches of one
    user must not run at the same time on different streams."""
    buf = _COUNTERS.get((dev, user))
    if buf is None or buf.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{user} needs {n} split counters on {dev}; call it once with this batch outside "
                               "the CUDA-graph capture first")
        buf = _COUNTERS[(dev, user)] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=dev)
    return buf


def decode_num_splits(batch: int, hkv: int, group: int, max_context: int, num_sms: int) -> int:
    """Splits of the context so that batch x kv-head CTAs fill the GPU (2 CTAs per SM are resident): the
    fewest that give >= 90% of a whole number of waves, each split keeping >= 256 tokens."""
    ctas = batch * hkv * -(-group // 8)
    slots = 2 * num_sms
    max_splits = max(1, min(DECODE_MAX_SPLITS, max_context // 256))
    if ctas >= 4 * slots or max_splits == 1:
        return 1
    best, best_eff = 1, 0.0
    for s in range(1, max_splits + 1):
        total = ctas * s
        eff = total / (-(-total // slots) * slots)
        if total >= slots and eff >= 0.9:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def decode_plan(plan: str | None = None) -> str:
    """decode_attention's plan: the argument, else $FLASHGEN_DECODE_PLAN, else auto; checked."""
    if plan is not None:
        return _choose("plan", plan, DECODE_PLANS)
    return _choose("FLASHGEN_DECODE_PLAN", os.environ.get("FLASHGEN_DECODE_PLAN", "auto"), DECODE_PLANS)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, softmax_scale: float, *, out: torch.Tensor | None = None,
                     return_lse: bool = False, num_splits: int | None = None, plan: str | None = None):
    """One new token per sequence: q (B, Hq, D) attends to the first context_lens[b] cached tokens of sequence
    b (none: zeros, LSE -inf). Returns (B, Hq, D), or with return_lse ((B, Hq, D), (B, Hq) float32 natural-log
    LSE of the scaled scores).

    The grid is num_splits CTAs per (sequence, kv head, group of 8 query heads); num_splits overrides the
    heuristic, which depends on shapes only, never on the values of context_lens, so graph capture sees a
    fixed launch. The kernel plans from context_lens how the CTAs share the work: "split" cuts every sequence
    in num_splits pieces; "balanced" lays the steps of the whole batch end to end and cuts them into one
    equal slice per CTA, so a ragged batch no longer waits on its long sequences at the end; "auto" takes
    "split" when the grid is over two waves, when the mean length is within 5% of the longest, or when the
    batch comes longest first and no piece exceeds 1.25x one resident CTA's share (the engine sorts decode
    batches so), else "balanced". None reads $FLASHGEN_DECODE_PLAN (default auto). The result depends on the
    context lengths only, never on timing."""
    _check_tensor("q", q, DTYPES, 3)
    dev = q.device
    bs, hkv, d, hq = _check_attn(q, k_cache, v_cache, dev)
    B = q.shape[0]
    _check_tensor("context_lens", context_lens, (torch.int32,), 1, dev, align=4)
    _check_shape("context_lens", context_lens, (B,))
    _check_block_tables(block_tables, B, dev)
    out = _check_out(out, tuple(q.shape), q.dtype, dev)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((B, hq), dtype=torch.float32, device=dev) if return_lse else None
    if B:
        di = _dev(q)
        group = hq // hkv
        if num_splits is None:
            num_splits = decode_num_splits(B, hkv, group, block_tables.shape[1] * bs, _num_sms(di))
        num_splits = int(num_splits)
        if not 1 <= num_splits <= DECODE_MAX_SPLITS:
            _fail("num_splits", f"must be in [1, {DECODE_MAX_SPLITS}]", num_splits)
        plan = decode_plan(plan)
        pairs = B * hkv * -(-group // 8)  # (sequence, kv head, group of 8 query heads)
        if pairs * max(num_splits, -(-block_tables.shape[1] * bs // 16)) >= 1 << 30:  # 32-bit plan in the kernel
            _fail("block_tables", "covers too many 16-token steps for one launch (batch x kv heads x "
                  "ceil(query group / 8) x ceil(width x block_size / 16) must stay below 2^30); split the batch",
                  tuple(block_tables.shape))
        ncta = pairs * num_splits
        code, sms = DECODE_PLANS.index(plan), _num_sms(di)
        if code == 0 and ncta > 4 * sms:  # > 2 waves: the hardware's CTA scheduling evens out a ragged
            code = 1                                # batch; the split plan needs no scan of context_lens
        if code == 1 and num_splits == 1:  # every CTA covers a whole pair: no partials
            part_o = part_lse = None
        else:
            part_o = torch.empty((2 * ncta, 8, d), dtype=torch.float32, device=dev)
            part_lse = torch.empty((2 * ncta, 8), dtype=torch.float32, device=dev)
        counters = _split_counters(dev, pairs)
        k = jit.get_kernel("decode_attention.cu", "decode_attention_kernel", q.dtype, d, di)
        jit.launch(k, (num_splits, pairs // B, B), (128,), (
            jit.ptr(q), jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(context_lens), jit.ptr(block_tables),
            jit.i32(block_tables.stride(0)), jit.ptr(out), jit.ptr(lse), jit.ptr(part_o), jit.ptr(part_lse),
            jit.ptr(counters), jit.i32(B), jit.i32(hq), jit.i32(hkv), jit.i32(bs.bit_length() - 1),
            jit.f32(softmax_scale * math.log2(math.e)), jit.i32(num_splits), jit.i32(code), jit.i32(2 * sms)), dev)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- sampling
def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits (float32, bfloat16 or float16) -> (B,) int64 tokens: argmax(logits / T + Gumbel(seed, step,
    token)), plain argmax where T == 0. The noise is flashgen.engine.sampler.gumbel_noise's up to the rounding
    of fast logarithms; -inf logits never win."""
    _check_tensor("logits", logits, (torch.float32, *DTYPES), 2, align=logits.element_size())
    dev = logits.device
    B, V = logits.shape
    _check_tensor("temperature", temperature, (torch.float32,), 1, dev, align=4)
    _check_tensor("seeds", seeds, (torch.int64,), 1, dev, align=8)
    _check_tensor("steps", steps, (torch.int64,), 1, dev, align=8)
    for name, t in (("temperature", temperature), ("seeds", seeds), ("steps", steps)):
        if t.shape[0] != B:
            _fail(name, f"must have one entry per logits row ({B})", f"shape {tuple(t.shape)}")
    out = _check_out(out, (B,), torch.int64, dev)
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=dev)
    if B:
        f32 = logits.dtype == torch.float32
        vec = 4 if f32 else 8
        # CTAs per row: enough to fill the GPU twice over, each scanning >= 8192 logits
        S = 1 if V % vec else max(1, min(-(-2 * _num_sms(_dev(logits)) // B), V // 8192))
        chunk = -(-V // (S * vec)) * vec
        S = -(-V // chunk)
        part_v = torch.empty((B, S), dtype=torch.float32, device=dev) if S > 1 else None
        part_i = torch.empty((B, S), dtype=torch.int32, device=dev) if S > 1 else None
        counters = _split_counters(dev, B, "sampling") if S > 1 else None
        k = jit.get_kernel("sampling.cu", "gumbel_argmax_kernel", torch.bfloat16 if f32 else logits.dtype, 0,
                           _dev(logits), 0, (("SAMPLING_F32", int(f32)),))
        jit.launch(k, (B, S), (512,), (jit.ptr(logits), jit.i32(V), jit.i32(chunk), jit.ptr(temperature),
                                       jit.ptr(seeds), jit.ptr(steps), jit.ptr(out), jit.ptr(part_v),
                                       jit.ptr(part_i), jit.ptr(counters)), dev)
    return out
