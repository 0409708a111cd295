"""The int8k KV cache's kernels against the torch reference, on the GPU (sm_89+): int8 K and float8 e4m3 V, each with
a float32 scale per cached token and kv head (k_scale, v_scale: (num_blocks, block_size, Hkv) tensors; kernels/fp8.cuh).
The fused RoPE + append writing it (FG_KV_FP8=2), decode attention reading it, prefill through its dequantized
scratch (kernels/kv_fp8.cu), and the wrappers' argument checks.

The write is checked bit for bit: the stored bytes and both scale tensors equal the reference's where the two
compute the same K (the kernel rotates in float32 and rounds once, the reference in the activation dtype op by op,
as HF: the bf16 kernel test allows the difference), and in every case equal the format's quantization of the
kernel's own rotated K (_quantize). Attention is checked as tests/test_kv_fp8_gpu.py checks the FP8 cache: against
a float64 oracle of the same dequantized cache, err(kernel) <= 2 * err(torch in the same dtype) + eps, and against
torch_ops with the same scale tensors. K and V get a magnitude of their own per token and kv head (10^U(-3, 2)), so
a scale applied to the wrong token, or not at all, fails; the scales of unused slots are NaN, so a kernel reading
one fails too.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from flashgen.ops import cuda_ops, torch_ops
from test_kernels_gpu import DEV, DTYPES, _assert_close, _cos_sin, _gen, _paged_cache, _randn, _refs, _seed
from test_kv_fp8_gpu import GROUPED_SEQS, PREFILL_QLENS, check_groups_equal_one_launch
from test_kv_fp8_gpu import PREFILL_CASES as FP8_PREFILL_CASES
from test_window_gpu import FP8_CASES, _poison_below

pytestmark = pytest.mark.gpu

if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("the int8k KV cache's e4m3 V needs compute capability 8.9 or later", allow_module_level=True)

FP8 = torch.float8_e4m3fn
K_MAX, V_MAX = 127.0, 448.0  # K: round(k / s) with s = amax / 127; V: e4m3(v / s) with s = amax / 448
Q_SCALE = 0.03  # q's magnitude: with K up to ~1e2 per token, scores of a few units (a softmax over many tokens)


def _quantize(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (stored (..., D), scale (...) float32): the int8k cache's quantization of each head (row):
    s = max(amax |x|, 1e-12) / qmax, then x / s rounded half to even to int8 and clamped to +-127 (qmax 127, K) or
    rounded to e4m3 and saturated (qmax 448, V). In float32 on the CPU, where torch divides as IEEE does, as the
    kernels do (on CUDA, a tensor divided by a Python float is multiplied by the float's reciprocal instead)."""
    xf = x.detach().float().cpu()
    s = xf.abs().amax(-1).clamp(min=1e-12) / qmax
    y = xf / s[..., None]
    q = torch.round(y).clamp(-127, 127).to(torch.int8) if qmax == K_MAX else y.clamp(-V_MAX, V_MAX).to(FP8)
    return q.to(x.device), s.to(x.device)


def _magnitudes(shape, g) -> torch.Tensor:
    """10^U(-3, 2) per entry of `shape` (float32, on g's device)."""
    return 10 ** (torch.rand(shape, generator=g, device=g.device) * 5 - 3)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def _clean(*scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scale tensors with their NaN-poisoned unused slots at 0, for the reference (which reads every slot of the
    blocks it gathers, where the kernels read only the slots of the context)."""
    return tuple(s.nan_to_num(0.0) for s in scales)


def _int8k_cache(lens, hkv, d, bs, dtype, g):
    """A random paged int8k cache: K and V in `dtype` (as rope_kv_append gets them), each head of each used slot
    with a magnitude of its own, quantized by _quantize; the scales of unused slots NaN. Returns (k8, v8, k_scale,
    v_scale, the dequantized float32 K and V (the oracle's input; NaN in unused slots), block tables)."""
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    unused = torch.isnan(kc[..., 0])  # (num_blocks, block_size, hkv)
    k = (kc.nan_to_num(0.0).float() * _magnitudes(unused.shape, g)[..., None]).to(dtype)
    v = (vc.nan_to_num(0.0).float() * _magnitudes(unused.shape, g)[..., None]).to(dtype)
    (k8, ks), (v8, vs) = _quantize(k, K_MAX), _quantize(v, V_MAX)
    ks[unused], vs[unused] = float("nan"), float("nan")
    return k8, v8, ks, vs, k8.float() * ks[..., None], v8.float() * vs[..., None], bt


def _close_to_torch(name, got, torch_ref, seed):
    """The kernel against torch_ops with the same cache and scales (which reads K and V rounded to the activation
    dtype, so only roughly: the float64 oracle is the precise check)."""
    err = (got.float() - torch_ref.float()).abs().max().item()
    tol = 3e-2 * (1 + torch_ref.float().abs().max().item())
    assert err <= tol, f"{name}: max diff from torch_ops {err:.3g} > {tol:.3g}, seed {seed}"


def _assert_lse(lse, lse64, seed):
    assert (lse.double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"lse, seed {seed}"


# ---------------------------------------------------------------- rope + kv append
def _rope_inputs(dtype, d, T, heads, bs, rot, g, qk_norm=False, zero_positions=False):
    """qkv with a magnitude of its own per token and head and one all-zero K and V head (token 0's kv head 0,
    written: the scale's 1e-12 floor), positions, cos_sin (rot dims), slots (some -1), q/k norm weights, and
    the int8k cache poisoned (bytes 0x7f, scales NaN): (qkv, positions, cos_sin, slots, q_norm, k_norm, k8, v8,
    k_scale, v_scale)."""
    hq, hkv = heads
    num_blocks = (T + bs - 1) // bs + 3
    x = _randn((T, hq + 2 * hkv, d), g) * _magnitudes((T, hq + 2 * hkv, 1), g)
    x[0, hq] = 0.0  # k head 0 of token 0
    x[0, hq + hkv] = 0.0  # v head 0 of token 0
    qkv = x.to(dtype).view(T, -1)
    positions = torch.zeros(T, dtype=torch.int64, device=DEV) if zero_positions else torch.randint(
        0, 4096, (T,), generator=g, device=DEV)
    cos_sin = _cos_sin(4096, rot)
    slots = torch.randperm(num_blocks * bs, generator=g, device=DEV)[:T]
    slots[1::7] = -1  # token 0 is written: T = 1 still checks something
    q_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    k_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    shape = (num_blocks, bs, hkv, d)
    poison = torch.full(shape, 0x7F, dtype=torch.uint8, device=DEV)  # int8 127 / e4m3 NaN: never written
    k8, v8 = poison.clone().view(torch.int8), poison.clone().view(FP8)
    ks = torch.full(shape[:3], float("nan"), dtype=torch.float32, device=DEV)
    return qkv, positions, cos_sin, slots, q_norm, k_norm, k8, v8, ks, ks.clone()


def _reference_rope(qkv, positions, cos_sin, slots, q_norm, k_norm, interleaved, shape):
    """torch_ops.rope_kv_append into a zeroed int8k cache, run on the CPU (IEEE divisions, see _quantize): (k8, v8,
    k_scale, v_scale) on the GPU."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    k8, v8 = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=FP8)
    ks, vs = torch.zeros(shape[:3]), torch.zeros(shape[:3])
    torch_ops.rope_kv_append(cpu(qkv), cpu(positions), cpu(cos_sin), cpu(slots), k8, v8, cpu(q_norm), cpu(k_norm),
                             1e-6, interleaved, k_scale=ks, v_scale=vs)
    return k8.to(DEV), v8.to(DEV), ks.to(DEV), vs.to(DEV)


ROPE_SHAPES = [(1, (8, 8), 16), (97, (12, 4), 64), (1025, (32, 4), 256), (2, (16, 2), 16), (33, (4, 1), 16)]
ROPE_MODES = [(False, False, 1.0), (True, False, 1.0), (False, True, 1.0), (True, False, 0.5), (False, False, 0.25),
              (True, True, 1.0)]  # (qk norm, interleaved, rotated dims as a fraction of head_dim)
# (dtype, head_dim, T, (hq, hkv), block size, qk norm, interleaved, rotated fraction): each dtype and head_dim twice
ROPE_CASES = [(dt, d, *ROPE_SHAPES[i % len(ROPE_SHAPES)], *ROPE_MODES[i % len(ROPE_MODES)])
              for i, (dt, d) in enumerate(list(itertools.product(DTYPES, [64, 128, 256])) * 2)]


@pytest.mark.parametrize("dtype,d,T,heads,bs,qk_norm,interleaved,rot_frac", ROPE_CASES)
def test_rope_kv_append_int8k(dtype, d, T, heads, bs, qk_norm, interleaved, rot_frac):
    """K's bytes and scales are exactly the format's quantization of the kernel's own K (its bf16/fp16-cache
    run's, tested in test_kernels_gpu), and within twice the reference's error of a float64 rotation; V's bytes and
    scales equal the reference's exactly (V is not rotated); q is the bf16/fp16-cache kernel's; a head of zeros
    gets the floor scale and zeros; untouched slots stay untouched."""
    seed = _seed()
    g = _gen(seed)
    rot = max(16, int(d * rot_frac) // 16 * 16)
    qkv, positions, cos_sin, slots, qn, kn, k8, v8, ks, vs = _rope_inputs(dtype, d, T, heads, bs, rot, g, qk_norm)
    hq, hkv = heads
    shape = tuple(k8.shape)
    q = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, k8, v8, qn, kn, 1e-6, interleaved, k_scale=ks,
                                v_scale=vs)
    kb, vb = torch.zeros(shape, dtype=dtype, device=DEV), torch.zeros(shape, dtype=dtype, device=DEV)
    qb = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, kb, vb, qn, kn, 1e-6, interleaved)
    assert torch.equal(q, qb), f"q differs from the bf16/fp16 cache's kernel, seed {seed}"
    written = slots[slots >= 0].long()
    flat = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
    k_want, ks_want = _quantize(flat(kb)[written], K_MAX)
    assert torch.equal(flat(k8)[written], k_want), f"k: not the quantization of the kernel's k, seed {seed}"
    assert torch.equal(flat(ks)[written], ks_want), f"k_scale: not the kernel's k's amax / 127, seed {seed}"
    kr, vr, ksr, vsr = _reference_rope(qkv, positions, cos_sin, slots, qn, kn, interleaved, shape)
    assert torch.equal(_bytes(flat(v8)[written]), _bytes(flat(vr)[written])), f"v bytes, seed {seed}"
    assert torch.equal(flat(vs)[written], flat(vsr)[written]), f"v_scale, seed {seed}"
    # K against a float64 rotation, errors relative to each head's amax: the kernel's no more than twice the
    # reference's (whose op-by-op rotation in the activation dtype loses more)
    k64, v64 = torch.zeros(shape, dtype=torch.float64, device=DEV), torch.zeros(shape, dtype=torch.float64, device=DEV)
    torch_ops.rope_kv_append(qkv.double(), positions, cos_sin.double(), slots, k64, v64,
                             None if qn is None else qn.double(), None if kn is None else kn.double(), 1e-6,
                             interleaved)
    exact = flat(k64)[written]
    amax = exact.abs().amax(-1, keepdim=True).clamp(min=1e-30)

    def err(k, s):
        return ((flat(k)[written].double() * flat(s)[written].double()[..., None] - exact).abs() / amax).max().item()

    e_kernel, e_ref = err(k8, ks), err(kr, ksr)
    assert e_kernel <= 2 * e_ref + 1e-6, f"k: max err {e_kernel:.3g} > 2 x reference {e_ref:.3g}, seed {seed}"
    # the zero head (token 0, kv head 0; token 0 is written): zeros and the floor scale
    s0 = slots[0].long()
    floor = (torch.tensor(1e-12) / K_MAX).item(), (torch.tensor(1e-12) / V_MAX).item()
    assert flat(ks)[s0, 0].item() == floor[0] and flat(vs)[s0, 0].item() == floor[1], f"floor scales, seed {seed}"
    assert not _bytes(flat(k8)[s0, 0]).any() and not _bytes(flat(v8)[s0, 0]).any(), f"zero head, seed {seed}"
    untouched = torch.ones(shape[0] * bs, dtype=torch.bool, device=DEV)
    untouched[written] = False
    assert (_bytes(flat(k8))[untouched] == 0x7F).all(), f"a k slot outside slot_mapping written, seed {seed}"
    assert (_bytes(flat(v8))[untouched] == 0x7F).all(), f"a v slot outside slot_mapping written, seed {seed}"
    assert flat(ks)[untouched].isnan().all(), f"a k_scale slot outside slot_mapping written, seed {seed}"
    assert flat(vs)[untouched].isnan().all(), f"a v_scale slot outside slot_mapping written, seed {seed}"


@pytest.mark.parametrize("dtype,d,T,heads,bs,interleaved,rot_frac", [
    (dt, d, T, heads, bs, il, rf) for dt, d, T, heads, bs, _, il, rf in ROPE_CASES])
def test_rope_kv_append_int8k_equals_the_reference(dtype, d, T, heads, bs, interleaved, rot_frac):
    """At position 0 (cos 1, sin 0: the rotation is exact in the kernel and in the reference) and without q/k
    norm, the kernel and the reference compute the same K and V: every stored byte and both scale tensors are
    equal."""
    seed = _seed()
    g = _gen(seed)
    rot = max(16, int(d * rot_frac) // 16 * 16)
    qkv, positions, cos_sin, slots, _, _, k8, v8, ks, vs = _rope_inputs(dtype, d, T, heads, bs, rot, g,
                                                                      zero_positions=True)
    cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, k8, v8, None, None, 1e-6, interleaved, k_scale=ks,
                            v_scale=vs)
    kr, vr, ksr, vsr = _reference_rope(qkv, positions, cos_sin, slots, None, None, interleaved, tuple(k8.shape))
    written = slots[slots >= 0].long()
    flat = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
    for name, got, ref in (("k", k8, kr), ("v", v8, vr), ("k_scale", ks, ksr), ("v_scale", vs, vsr)):
        a, b = flat(got)[written], flat(ref)[written]
        a, b = (a, b) if a.dtype == torch.float32 else (_bytes(a), _bytes(b))
        assert torch.equal(a, b), f"{name}: {(a != b).float().mean().item():.2%} differ, seed {seed}"


# ---------------------------------------------------------------- decode
DECODE_LENS = [[1], [97], [1025, 1, 40], [16, 17, 255, 256], [300, 511, 64, 65, 129, 128, 1, 16], [17] * 200]
DECODE_CASES = [(dt, d, group, [16, 64, 256][i % 3], DECODE_LENS[i % len(DECODE_LENS)])
                for i, (dt, d, group) in enumerate(itertools.product(DTYPES, [64, 128], [1, 3, 4, 8]))] + [
    # head_dim 256 (two warps per step): a subset
    pytest.param(torch.bfloat16, 256, 1, 16, DECODE_LENS[0], id="hd256"),
    pytest.param(torch.float16, 256, 4, 64, DECODE_LENS[2], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 256, DECODE_LENS[3], id="hd256"),
    pytest.param(torch.float16, 256, 3, 16, DECODE_LENS[4], id="hd256"),
    pytest.param(torch.bfloat16, 256, 4, 16, DECODE_LENS[5], id="hd256"),
    pytest.param(torch.float16, 256, 8, 64, DECODE_LENS[1], id="hd256")]


def _check_decode(dtype, d, group, bs, lens, **kw):
    seed = _seed()
    g = _gen(seed)
    hkv = 2 if len(lens) < 64 else 1
    k8, v8, ks, vs, kd, vd, bt = _int8k_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((len(lens), hkv * group, d), g, dtype, Q_SCALE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, k8, v8, ctx, bt, scale, ks, vs, out=out, return_lse=True, **kw)
    assert got is out
    ref, base, lse64 = _refs(q, kd, vd, bt, lens, [1] * len(lens), scale)
    _assert_close("decode int8k", got, base, ref, seed)
    _assert_lse(lse, lse64, seed)
    torch_ref = torch_ops.decode_attention(q, k8, v8, ctx, bt, scale, *_clean(ks, vs))
    _close_to_torch("decode int8k", got, torch_ref, seed)


@pytest.mark.parametrize("dtype,d,group,bs,lens", DECODE_CASES)
def test_decode_attention_int8k(dtype, d, group, bs, lens):
    _check_decode(dtype, d, group, bs, lens)


RAGGED = [1, 63, 64, 65, 700, 3000]


@pytest.mark.parametrize("d", [128, pytest.param(256, id="hd256")])
@pytest.mark.parametrize("plan", ["split", "balanced"])
@pytest.mark.parametrize("num_splits,lens", [(1, RAGGED), (5, RAGGED), (64, [17] * 4), (3, [1025] * 2)])
def test_decode_attention_int8k_splits(num_splits, lens, plan, d):
    """Both plans, pieces and slices of a pair merged by the last CTA (their partials carry the 1 / 448 of V's
    scale once); GQA group 16 (two groups of 8 query heads per kv head); the merge counters back at zero."""
    from flashgen.ops import cuda_attention

    _check_decode(torch.bfloat16, d, 16, 16, lens, num_splits=num_splits, plan=plan)
    state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
    assert state.count_nonzero() == 0


# ---------------------------------------------------------------- prefill
# test_kv_fp8_gpu's prefill cases, and one more head_dim 256 case
PREFILL_CASES = FP8_PREFILL_CASES + [
    pytest.param(torch.float16, 256, 3, 16, PREFILL_QLENS[4], id="hd256")]


def _need_impl(impl: str, d: int) -> None:
    from flashgen.ops import jit

    if impl == "wgmma" and jit.device_arch(DEV) != cuda_ops.WGMMA_ARCH:
        pytest.skip("the wgmma prefill kernel needs a Hopper GPU")
    if impl == "wgmma" and d not in cuda_ops.PREFILL_SM90_HEAD_DIMS:
        pytest.skip(f"head_dim {d} runs on the mma prefill kernel only (its impl='mma' case)")


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,group,bs,seqs", PREFILL_CASES)
def test_prefill_attention_int8k(dtype, d, group, bs, seqs, impl):
    _need_impl(impl, d)
    seed = _seed()
    g = _gen(seed)
    hkv = 1 if max(n for _, n in seqs) > 2048 else 2
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    k8, v8, ks, vs, kd, vd, bt = _int8k_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((sum(qlens), hkv * group, d), g, dtype, Q_SCALE)
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), scale, ks, vs, out=out, impl=impl)
    assert got is out
    # the kernel reads K and V rounded to the activation dtype (stored * scale, one rounding): so does the oracle
    ref, base, _ = _refs(q, kd, vd, bt, lens, qlens, scale, kv_dtype=dtype)
    _assert_close(f"prefill int8k {impl}", got, base, ref, seed)
    torch_ref = torch_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), scale, *_clean(ks, vs))
    _close_to_torch(f"prefill int8k {impl}", got, torch_ref, seed)


def test_prefill_int8k_in_groups(monkeypatch):
    """More sequences than one scratch holds: they run in groups (the scales indexed by block id, as in one
    launch), with the same result as in one launch."""
    seed = _seed()
    g = _gen(seed)
    qlens, lens = [m for m, _ in GROUPED_SEQS], [n for _, n in GROUPED_SEQS]
    k8, v8, ks, vs, _, _, bt = _int8k_cache(lens, 2, 128, 16, torch.bfloat16, g)
    q = _randn((sum(qlens), 8, 128), g, torch.bfloat16, Q_SCALE)
    check_groups_equal_one_launch(monkeypatch, q, k8, v8, bt, ks, vs, seed)


# ---------------------------------------------------------------- sliding window
WINDOW_CASES = FP8_CASES  # test_window_gpu's FP8-cache window cases


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,bs,window", WINDOW_CASES)
def test_window_int8k(dtype, d, bs, window, impl):
    """Prefill through the dequantized scratch and decode reading the cache (both plans), with a window; the
    scales below every window (rounded down to the prefill's coarsest key tile, 128) are NaN."""
    _need_impl(impl, d)
    seed = _seed()
    g = _gen(seed)
    seqs = [(97, 1025), (1, 4097), (64, 130), (300, 300)]
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    k8, v8, ks, vs, kd, vd, bt = _int8k_cache(lens, 2, d, bs, dtype, g)
    clean = _clean(ks, vs)
    _poison_below((ks, vs), bt, lens, qlens, window, 128)
    q = _randn((sum(qlens), 8, d), g, dtype, Q_SCALE)
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    got = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), scale, ks, vs, window=window,
                                     out=torch.full_like(q, float("nan")), impl=impl)
    ref, base, _ = _refs(q, kd, vd, bt, lens, qlens, scale, window, kv_dtype=dtype)
    _assert_close(f"prefill int8k {impl} window {window}", got, base, ref, seed)
    torch_ref = torch_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), scale, *clean, window=window)
    _close_to_torch(f"prefill int8k {impl} window {window}", got, torch_ref, seed)
    # decode: the last query row of each sequence as its new token
    last = torch.tensor(list(itertools.accumulate(qlens)), device=DEV) - 1
    qd = q[last].contiguous()
    ref, base, lse64 = _refs(qd, kd, vd, bt, lens, [1] * len(lens), scale, window)
    torch_ref = torch_ops.decode_attention(qd, k8, v8, ctx, bt, scale, *clean, window=window)
    for plan in ("split", "balanced"):
        out, lse = cuda_ops.decode_attention(qd, k8, v8, ctx, bt, scale, ks, vs, window=window,
                                             out=torch.full_like(qd, float("nan")), return_lse=True, plan=plan)
        _assert_close(f"decode int8k {plan} window {window}", out, base, ref, seed)
        _assert_lse(lse, lse64, seed)
        _close_to_torch(f"decode int8k {plan} window {window}", out, torch_ref, seed)


# ---------------------------------------------------------------- shared-prefix decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hkv,group", [(64, 2, 1), (128, 1, 3), (128, 2, 4), pytest.param(256, 1, 8, id="hd256")])
def test_shared_prefix_decode_int8k(dtype, d, hkv, group):
    """The two launches of a SharedPrefix decode (the groups' shared blocks with the members as query heads, then
    each sequence's own blocks merged in) read the int8k cache's scales like the plain launch: against a float32
    oracle of the dequantized cache, err(grouped) <= 2 * err(plain) + eps, the LSE as the plain launch's, and
    torch_ops' own SharedPrefix program."""
    from flashgen.ops import cuda_attention
    from test_shared_prefix import shared_batch

    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    groups, singles = [(1, [1, 1]), (4, [30] * 11), (3, [64, 1, 65])], [40, 1]
    kc, vc, ctx, bt, sp = shared_batch(groups, singles, 16, hkv, d, torch.float32, g, DEV)
    shape = tuple(kc.shape[:3])
    mk, mv = (10 ** (torch.rand(shape, generator=g) * 5 - 3) for _ in range(2))
    (k8, ks), (v8, vs) = (_quantize((kc * mk.to(DEV)[..., None]).to(dtype), K_MAX),
                          _quantize((vc * mv.to(DEV)[..., None]).to(dtype), V_MAX))
    kd, vd = k8.float() * ks[..., None], v8.float() * vs[..., None]
    q = (torch.randn((ctx.shape[0], hkv * group, d), generator=g) * Q_SCALE).to(DEV, dtype)
    scale = d**-0.5
    ref = torch_ops.decode_attention(q.float(), kd, vd, ctx, bt, scale)
    plain, lse_plain = cuda_ops.decode_attention(q, k8, v8, ctx, bt, scale, ks, vs, return_lse=True)
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, k8, v8, ctx, bt, scale, ks, vs, shared=sp, out=out, return_lse=True)
    assert got is out
    state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
    assert state.count_nonzero() == 0, "merge counters left set"
    e_plain = (plain.float() - ref).abs().max().item()
    e_got = (got.float() - ref).abs().max().item()
    eps = 1e-4 * ref.abs().max().item() + 1e-6
    assert e_got <= 2 * e_plain + eps, f"seed {seed}: grouped {e_got:.3g}, plain {e_plain:.3g}"
    assert (lse - lse_plain).abs().max().item() < 1e-3 * (1 + lse_plain.abs().max().item()), f"lse, seed {seed}"
    torch_ref = torch_ops.decode_attention(q, k8, v8, ctx, bt, scale, ks, vs, shared=sp)
    _close_to_torch("shared-prefix decode int8k", got, torch_ref, seed)


# ---------------------------------------------------------------- argument checks
def test_int8k_arguments_are_refused_clearly():
    """int8 K goes with e4m3 V and per-token scale tensors only; tensor scales go with the int8k cache only; a
    scale tensor of another dtype, shape or layout is refused, naming it."""
    nb, bs, hkv, d = 4, 16, 2, 64
    shape = (nb, bs, hkv, d)
    k8 = torch.zeros(shape, dtype=torch.int8, device=DEV)
    v8 = torch.zeros(shape, dtype=FP8, device=DEV)
    kb = torch.zeros(shape, dtype=torch.bfloat16, device=DEV)
    ks = torch.ones((nb, bs, hkv), device=DEV)
    vs = torch.ones((nb, bs, hkv), device=DEV)
    q = torch.zeros((1, 4, d), dtype=torch.bfloat16, device=DEV)
    ctx = torch.ones(1, dtype=torch.int32, device=DEV)
    bt = torch.zeros((1, 2), dtype=torch.int32, device=DEV)

    def decode(kc, vc, k_scale, v_scale):
        return cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, k_scale, v_scale)

    with pytest.raises(ValueError, match="v_cache must have dtype torch.float8_e4m3fn"):
        decode(k8, kb, ks, vs)  # int8 K with a bf16 V
    with pytest.raises(ValueError, match="v_cache must have dtype torch.float8_e4m3fn"):
        decode(k8, k8, ks, vs)  # int8 V
    with pytest.raises(ValueError, match="v_cache must have dtype torch.float8_e4m3fn, got torch.int8"):
        decode(v8, k8, 1.0, 1.0)  # e4m3 K with int8 V
    with pytest.raises(ValueError, match=r"k_scale must be a float32 tensor of shape \(4, 16, 2\)"):
        decode(k8, v8, 1.0, vs)
    with pytest.raises(ValueError, match=r"v_scale must be a float32 tensor of shape \(4, 16, 2\)"):
        decode(k8, v8, ks, 0.5)
    with pytest.raises(ValueError, match="k_scale is a tensor: per-token scales go with an int8 k_cache"):
        decode(kb, kb, ks, vs)
    with pytest.raises(ValueError, match="v_scale is a tensor: per-token scales go with an int8 k_cache"):
        decode(v8, v8, 1.0, vs)
    with pytest.raises(ValueError, match="k_scale must have dtype torch.float32"):
        decode(k8, v8, ks.half(), vs)
    with pytest.raises(ValueError, match=r"v_scale must have shape \(4, 16, 2\)"):
        decode(k8, v8, ks, vs[:2])
    with pytest.raises(ValueError, match="k_scale must be contiguous"):
        decode(k8, v8, ks.transpose(1, 2).contiguous().transpose(1, 2), vs)
    with pytest.raises(ValueError, match="v_scale must be a CUDA tensor"):
        decode(k8, v8, ks, vs.cpu())
    # the other ops take the same checks
    qkv = torch.zeros((3, 8 * d), dtype=torch.bfloat16, device=DEV)
    pos = torch.zeros(3, dtype=torch.int32, device=DEV)
    slots = torch.arange(3, dtype=torch.int32, device=DEV)
    cs = _cos_sin(16, d)
    with pytest.raises(ValueError, match=r"k_scale must be a float32 tensor of shape \(4, 16, 2\)"):
        cuda_ops.rope_kv_append(qkv, pos, cs, slots, k8, v8, k_scale=1.0, v_scale=1.0)
    with pytest.raises(ValueError, match="v_scale is a tensor: per-token scales go with an int8 k_cache"):
        cuda_ops.rope_kv_append(qkv, pos, cs, slots, kb, kb, v_scale=vs)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"k_scale must be a float32 tensor of shape \(4, 16, 2\)"):
        cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, 1, 0.1)
    with pytest.raises(ValueError, match="k_scale is a tensor: per-token scales go with an int8 k_cache"):
        cuda_ops.prefill_attention(q, v8, v8, cu, ctx, bt, 1, 0.1, ks, vs)
