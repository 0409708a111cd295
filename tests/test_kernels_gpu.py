"""CUDA kernels (flashgen.ops.cuda_ops) against the torch reference, on the GPU.

Every check draws random inputs (never zeros) from a fixed seed, SEED unless FLASHGEN_TEST_SEED names another
(the seed is in the failure message), poisons outputs and unused cache slots with NaN first, and compares the
kernel with a float64 oracle: err(kernel) <= 2 * err(torch in the same dtype) + eps, errors being max abs
differences from the oracle (flash-attn's rule). For attention the same-dtype torch run rounds the softmax
probabilities to the storage dtype before P @ V, as every flash kernel and flash-attn's own reference do.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from flashgen.engine.sampler import SamplingBatch, gumbel_noise, sample
from flashgen.ops import torch_ops

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible", allow_module_level=True)
try:
    import cupy  # noqa: F401
except ImportError:
    pytest.skip("cupy is not installed (pip install 'flashgen[cuda13]')", allow_module_level=True)

from flashgen.ops import cuda_attention, cuda_ops, jit  # noqa: E402

DEV = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16]
SEED = 0  # every draw's seed unless $FLASHGEN_TEST_SEED gives another


def _seed() -> int:
    env = os.environ.get("FLASHGEN_TEST_SEED")
    return int(env) if env else SEED


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """The draws that take no generator (torch's global CPU and CUDA generators) start from the seed too."""
    torch.manual_seed(_seed())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, device=DEV) * scale).to(dtype)


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _assert_close(name, out, same_dtype, ref, seed, rel_eps=1e-4):
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (unwritten element?), seed {seed}"
    e_k, e_t = _err(out, ref), _err(same_dtype, ref)
    eps = rel_eps * (ref.abs().max().item() if ref.numel() else 0.0) + 1e-6
    assert e_k <= 2 * e_t + eps, f"{name}: max err {e_k:.3g} > 2 x torch {e_t:.3g} + {eps:.2g}, seed {seed}"


# ---------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(1, 1024), (97, 4096), (4097, 1024), (2, 5120)])
def test_rms_norm(dtype, fused, shape):
    seed = _seed()
    g = _gen(seed)
    x = _randn(shape, g, dtype)
    w = _randn(shape[-1:], g, dtype, 0.5) + 1
    res = _randn(shape, g, dtype) if fused else None
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(x, float("nan")) if fused else None
    got = cuda_ops.rms_norm(x, w, 1e-6, res, out=out, residual_out=res_out)
    base = torch_ops.rms_norm(x, w, 1e-6, res)
    ref = torch_ops.rms_norm(x.double(), w.double(), 1e-6, None if res is None else res.double())
    if fused:
        assert got[0] is out and got[1] is res_out
        _assert_close("rms_norm", got[0], base[0], ref[0], seed)
        _assert_close("residual", got[1], base[1], ref[1], seed)
    else:
        assert got is out
        _assert_close("rms_norm", got, base, ref, seed)


def test_rms_norm_in_place_residual():
    seed = _seed()
    g = _gen(seed)
    x, res = _randn((33, 2048), g, torch.bfloat16), _randn((33, 2048), g, torch.bfloat16)
    w = _randn((2048,), g, torch.bfloat16)
    base = torch_ops.rms_norm(x, w, 1e-5, res)
    out, new_res = cuda_ops.rms_norm(x, w, 1e-5, res, residual_out=res)
    assert new_res is res
    torch.testing.assert_close(new_res, base[1], rtol=0, atol=0)
    torch.testing.assert_close(out, base[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("act", ["silu_mul", "gelu_tanh_mul"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,inter", [(1, 3072), (97, 1032), (4097, 3072)])
def test_act_mul(act, dtype, T, inter):
    seed = _seed()
    g = _gen(seed)
    x = _randn((T, 2 * inter), g, dtype, 2.0)
    out = torch.full((T, inter), float("nan"), dtype=dtype, device=DEV)
    got = getattr(cuda_ops, act)(x, out=out)
    assert got is out
    ref = getattr(torch_ops, act)
    _assert_close(act, got, ref(x), ref(x.double()), seed)


# ---------------------------------------------------------------- rope + kv append
def _cos_sin(max_pos: int, d: int, theta: float = 1e6) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=DEV) / d)
    f = torch.arange(max_pos, dtype=torch.float64, device=DEV)[:, None] * inv[None]
    return torch.cat((f.cos(), f.sin()), -1).float()  # (max_pos, d)


ROPE_CASES = [
    # dtype, head_dim, qk_norm, interleaved, T, (hq, hkv), block_size, index dtype
    (dt, d, nrm, il, T, heads, bs, idx)
    for (i, (dt, d, nrm, il)) in enumerate(itertools.product(DTYPES, [64, 128], [False, True], [False, True]))
    for T, heads, bs, idx in [
        [(1, (8, 8), 16, torch.int32), (97, (12, 4), 64, torch.int64), (1025, (32, 4), 256, torch.int32),
         (2, (16, 2), 16, torch.int64)][i % 4]
    ]
] + [  # head_dim 256 (Gemma 3 1B-12B: q/k norm, NeoX rotation): a subset
    pytest.param(torch.bfloat16, 256, True, False, 1, (8, 8), 16, torch.int32, id="hd256"),
    pytest.param(torch.float16, 256, True, False, 97, (4, 1), 64, torch.int64, id="hd256"),
    pytest.param(torch.bfloat16, 256, False, True, 1025, (16, 8), 256, torch.int32, id="hd256"),
    pytest.param(torch.float16, 256, False, False, 2, (16, 2), 16, torch.int64, id="hd256"),
]


@pytest.mark.parametrize("dtype,d,qk_norm,interleaved,T,heads,bs,idx_dtype", ROPE_CASES)
def test_rope_kv_append(dtype, d, qk_norm, interleaved, T, heads, bs, idx_dtype):
    seed = _seed()
    g = _gen(seed)
    hq, hkv = heads
    num_blocks = (T + bs - 1) // bs + 3
    qkv = _randn((T, (hq + 2 * hkv) * d), g, dtype)
    max_pos = 8192
    positions = torch.randint(0, max_pos, (T,), generator=g, device=DEV).to(idx_dtype)
    cos_sin = _cos_sin(max_pos, d)
    slots = torch.randperm(num_blocks * bs, generator=g, device=DEV)[:T]
    slots[::7] = -1  # some tokens are not written (e.g. padding)
    slots = slots.to(idx_dtype)
    q_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    k_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    shape = (num_blocks, bs, hkv, d)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    out = torch.full((T, hq, d), float("nan"), dtype=dtype, device=DEV)
    q = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, kc, vc, q_norm, k_norm, 1e-6, interleaved, out=out)
    assert q is out

    kb, vb = torch.zeros(shape, dtype=dtype, device=DEV), torch.zeros(shape, dtype=dtype, device=DEV)
    qb = torch_ops.rope_kv_append(qkv, positions, cos_sin, slots, kb, vb, q_norm, k_norm, 1e-6, interleaved)
    k64, v64 = torch.zeros(shape, dtype=torch.float64, device=DEV), torch.zeros(shape, dtype=torch.float64, device=DEV)
    q64 = torch_ops.rope_kv_append(
        qkv.double(), positions, cos_sin.double(), slots, k64, v64,
        None if q_norm is None else q_norm.double(), None if k_norm is None else k_norm.double(), 1e-6, interleaved)
    _assert_close("q", q, qb, q64, seed)
    written = slots[slots >= 0].long()
    flat = lambda c: c.view(-1, hkv, d)  # noqa: E731
    _assert_close("k_cache", flat(kc)[written], flat(kb)[written], flat(k64)[written], seed)
    assert torch.equal(flat(vc)[written], flat(vb)[written]), f"v_cache: not a copy of v, seed {seed}"
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEV)
    untouched[written] = False
    assert torch.isnan(flat(kc)[untouched]).all() and torch.isnan(flat(vc)[untouched]).all(), (
        f"a cache slot outside slot_mapping was written, seed {seed}")


# ---------------------------------------------------------------- paged attention helpers
def _paged_cache(lens, hkv, d, bs, dtype, gen, extra_blocks=5):
    """NaN-poisoned paged K/V with random values in each sequence's slots; block tables scattered over
    the cache and padded with -1. Returns (k_cache, v_cache, block_tables)."""
    nblk = [(n + bs - 1) // bs for n in lens]
    total = sum(nblk) + extra_blocks
    width = max(nblk) + 2
    perm = torch.randperm(total, generator=gen, device=DEV).to(torch.int32)
    bt = torch.full((len(lens), width), -1, dtype=torch.int32, device=DEV)
    slots, pos = [], 0
    for b, (n, k) in enumerate(zip(lens, nblk, strict=True)):
        bt[b, :k] = perm[pos:pos + k]
        pos += k
        t = torch.arange(n, device=DEV)
        slots.append(bt[b, t // bs].long() * bs + t % bs)
    slots = torch.cat(slots)
    shape = (total, bs, hkv, d)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    kc.view(-1, hkv, d)[slots] = _randn((len(slots), hkv, d), gen, dtype)
    vc.view(-1, hkv, d)[slots] = _randn((len(slots), hkv, d), gen, dtype)
    return kc, vc, bt


def _attend(q, k, v, scale, q_pos0, p_dtype=None, window=0):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D), in the dtype to compute in; query i at position pos = q_pos0 + i sees
    keys <= pos (window > 0: and > pos - window). p_dtype: round the probabilities to it before P @ V (flash
    precision)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Lk, D)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.einsum("qhd,hkd->hqk", q, k) * scale
    qi = torch.arange(q.shape[0], device=DEV)[:, None] + q_pos0
    kj = torch.arange(k.shape[1], device=DEV)[None, :]
    hidden = (kj > qi) | (kj <= qi - window) if window else kj > qi
    s = s.masked_fill(hidden, float("-inf"))
    p = s.softmax(-1)
    if p_dtype is not None:
        p = p.to(p_dtype).to(s.dtype)
    lse = torch.logsumexp(s, -1).transpose(0, 1)  # (Lq, Hq)
    return torch.einsum("hqk,hkd->qhd", p, v), lse


def _refs(q, kc, vc, bt, lens, qlens, scale, window=0, kv_dtype=None):
    """Per sequence: (float64 oracle, same-dtype torch run, float64 LSE), concatenated over sequences; `window`:
    sliding-window attention (0: none); kv_dtype: K/V rounded to it first (the FP8 prefill reads them so)."""
    kz, vz = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    if kv_dtype is not None:
        kz, vz = kz.to(kv_dtype), vz.to(kv_dtype)
    o64, obase, lse64, start = [], [], [], 0
    for b, (n, m) in enumerate(zip(lens, qlens, strict=True)):
        k = torch_ops.gather_kv(kz, bt[b], n)
        v = torch_ops.gather_kv(vz, bt[b], n)
        qs = q[start:start + m]
        start += m
        r, lse = _attend(qs.double(), k.double(), v.double(), scale, n - m, window=window)
        rb, _ = _attend(qs.float(), k.float(), v.float(), scale, n - m, p_dtype=q.dtype, window=window)
        o64.append(r)
        obase.append(rb.to(q.dtype))
        lse64.append(lse)
    return torch.cat(o64), torch.cat(obase), torch.cat(lse64)


DECODE_LENS = [
    [1], [2, 97], [1025, 1, 40], [4097], [17] * 256, [4097, 3, 1025, 2], [300, 511, 64, 65, 129, 128, 1, 16],
    [8193], [3000, 700, 65, 64, 63, 1],  # longest first, as the engine orders a decode batch
]
DECODE_CASES = [
    (dt, d, group, [16, 64, 256][i % 3], DECODE_LENS[i % len(DECODE_LENS)])
    for i, (dt, d, group) in enumerate(itertools.product(DTYPES, [64, 128], [1, 3, 4, 8]))
] + [  # head_dim 256 (two warps per step, kernels/decode_attention.cu): a subset, GQA 1 to 16, every block size
    pytest.param(torch.bfloat16, 256, 1, 16, [1], id="hd256"),
    pytest.param(torch.float16, 256, 4, 64, [1025, 1, 40], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 256, [300, 511, 64, 65, 129, 128, 1, 16], id="hd256"),
    pytest.param(torch.float16, 256, 2, 16, [4097, 3, 1025, 2], id="hd256"),
    pytest.param(torch.bfloat16, 256, 4, 64, [17] * 256, id="hd256"),
    pytest.param(torch.bfloat16, 256, 16, 16, [3000, 700, 65, 64, 63, 1], id="hd256"),
]


def _check_decode(lens, hkv, hq, d, bs, dtype, scale, **kw):
    """Decode over a random paged cache, NaN-poisoned output, against the fp64 reference (output and LSE)."""
    seed = _seed()
    g = _gen(seed)
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((len(lens), hq, d), g, dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, kc, vc, ctx, bt, scale, out=out, return_lse=True, **kw)
    assert got is out
    ref, base, lse64 = _refs(q, kc, vc, bt, lens, [1] * len(lens), scale)
    _assert_close("decode", got, base, ref, seed)
    assert (lse.double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"lse, seed {seed}"


@pytest.mark.parametrize("dtype,d,group,bs,lens", DECODE_CASES)
def test_decode_attention(dtype, d, group, bs, lens):
    hkv = 2 if len(lens) < 64 else 1
    _check_decode(lens, hkv, hkv * group, d, bs, dtype, d**-0.5)


@pytest.mark.parametrize("dtype,d,group,bs,lens", [c for c in DECODE_CASES if not hasattr(c, "id")])
def test_decode_attention_warp_plan(dtype, d, group, bs, lens):
    """The warp plan (one warp per sequence and kv head, head_dim 64 and 128) on the decode cases, then with a
    group of 16 (two pairs of 8 query heads per kv head)."""
    hkv = 2 if len(lens) < 64 else 1
    _check_decode(lens, hkv, hkv * group, d, bs, dtype, d**-0.5, plan="warp")
    _check_decode(lens, 2, 32, d, bs, dtype, 0.1, plan="warp")


RAGGED = [1, 63, 64, 65, 700, 3000]


@pytest.mark.parametrize("plan", ["split", "balanced"])
@pytest.mark.parametrize("num_splits,lens", [
    (1, RAGGED), (2, RAGGED), (5, RAGGED),
    (64, RAGGED),  # more CTAs than 16-step slices / non-empty pieces: the last ones idle
    (3, [9000, 16, 17, 2, 4097, 1, 1, 1, 300]),  # one long sequence among short ones
    (1, [700] * 6), (3, [3000] * 3),
    (5, [1025] * 2),  # pieces of 4-step multiples, the last one short
    (64, [17] * 4),  # short: one non-empty piece per pair
])
def test_decode_attention_splits(num_splits, lens, plan):
    """Split counts, batches and both plans of the kernel (auto is covered by the other decode tests); GQA
    group 16 (two pairs of 8 query heads per kv head). Twice: the pairs' merge counters must be back at zero
    for the next launch."""
    for _ in range(2):
        _check_decode(lens, 2, 32, 128, 16, torch.bfloat16, 0.1, num_splits=num_splits, plan=plan)
        state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
        assert state.count_nonzero() == 0


@pytest.mark.parametrize("plan", ["split", "balanced"])
@pytest.mark.parametrize("num_splits,lens", [(2, RAGGED), (64, [17] * 4), (3, [1025] * 2),
                                             (3, [9000, 16, 17, 2, 4097, 1, 1, 1, 300])])
def test_decode_attention_splits_hd256(num_splits, lens, plan):
    """Head_dim 256 under both plans, split pieces and balanced slices (the merge of the 2 warp pairs and of
    the CTAs' partials); GQA group 16; twice, as above."""
    for _ in range(2):
        _check_decode(lens, 2, 32, 256, 16, torch.bfloat16, 0.1, num_splits=num_splits, plan=plan)
        state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
        assert state.count_nonzero() == 0


@pytest.mark.parametrize("plan", [None, "warp"])
@pytest.mark.parametrize("d", [128, pytest.param(256, id="hd256")])
@pytest.mark.parametrize("lens,num_splits", [([0, 300, 0, 5], 3), ([0, 1000, 0, 1000], 4)])
def test_decode_attention_empty_context(lens, num_splits, d, plan):
    """A sequence with no cached token gets zeros and LSE -inf; the others are unaffected (the warp plan too,
    which head_dim 256 takes as auto)."""
    seed = _seed()
    g = _gen(seed)
    kc, vc, bt = _paged_cache(lens, 2, d, 16, torch.bfloat16, g)
    q = _randn((4, 8, d), g, torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, lse = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, out=torch.full_like(q, float("nan")),
                                         return_lse=True, num_splits=num_splits, plan=plan)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]])), f"seed {seed}"
    assert torch.isneginf(lse[[0, 2]]).all(), f"seed {seed}"
    ref, base, lse64 = _refs(q[[1, 3]], kc, vc, bt[[1, 3]], lens[1::2], [1, 1], 0.1)
    _assert_close("decode", out[[1, 3]], base, ref, seed)
    assert (lse[[1, 3]].double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"seed {seed}"


PREFILL_QLENS = [  # (q_len, context_len) per sequence; context_len > q_len: prefix hit / chunked prefill
    [(1, 1)], [(2, 2), (97, 97)], [(1025, 1025)], [(97, 1025), (1, 4097), (64, 130)],
    [(4097, 4097)], [(n, n + 3 * n % 50) for n in range(1, 65)], [(200, 4000), (2, 2), (129, 129)],
    [(16, 16)] * 3 + [(63, 65)],
]
PREFILL_CASES = [
    (dt, d, group, [16, 64, 256][i % 3], PREFILL_QLENS[i % len(PREFILL_QLENS)])
    for i, (dt, d, group) in enumerate(itertools.product(DTYPES, [64, 128], [1, 3, 4, 8]))
]
PREFILL_CASES_256 = [  # head_dim 256: the mma kernel (tile (1, 32)) whatever the impl asked; a subset
    pytest.param(torch.bfloat16, 256, 1, 16, PREFILL_QLENS[0], id="hd256"),
    pytest.param(torch.float16, 256, 4, 64, PREFILL_QLENS[1], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 256, PREFILL_QLENS[2], id="hd256"),
    pytest.param(torch.float16, 256, 2, 16, PREFILL_QLENS[3], id="hd256"),
    pytest.param(torch.bfloat16, 256, 4, 64, PREFILL_QLENS[6], id="hd256"),
    pytest.param(torch.float16, 256, 1, 16, PREFILL_QLENS[7], id="hd256"),
]


def _prefill_inputs(seqs, hkv, hq, d, bs, dtype, g):
    """Random q and NaN-poisoned paged K/V for (q_len, context_len) per sequence, with the varlen arguments:
    (q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, q_lens, context_lens as a list)."""
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((sum(qlens), hq, d), g, dtype)
    cu = torch.tensor([0] + list(itertools.accumulate(qlens)), dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, cu, ctx, bt, qlens, lens


def _need_impl(impl: str) -> None:
    if impl == "wgmma" and jit.device_arch(DEV) != cuda_ops.WGMMA_ARCH:
        pytest.skip(f"the wgmma prefill kernel needs a Hopper GPU, this is {jit.device_arch(DEV)}")


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,group,bs,seqs", PREFILL_CASES)
def test_prefill_attention(dtype, d, group, bs, seqs, impl):
    _need_impl(impl)
    seed = _seed()
    g = _gen(seed)
    hkv = 1 if max(n for _, n in seqs) > 2048 else 2
    hq = hkv * group
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, hkv, hq, d, bs, dtype, g)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), scale, out=out, impl=impl)
    assert got is out
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, scale)
    _assert_close(f"prefill {impl}", got, base, ref, seed)


@pytest.mark.parametrize("dtype,d,group,bs,seqs", PREFILL_CASES_256)
def test_prefill_attention_hd256(dtype, d, group, bs, seqs):
    """Head_dim 256 through the default choice (on Hopper: routed from wgmma to the mma kernel)."""
    seed = _seed()
    g = _gen(seed)
    hkv = 1 if max(n for _, n in seqs) > 2048 else 2
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, hkv, hkv * group, d, bs, dtype, g)
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), d**-0.5, out=out)
    assert got is out
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, d**-0.5)
    _assert_close("prefill hd256", got, base, ref, seed)


def test_prefill_hd256_refuses_wgmma_and_other_tiles():
    """Head_dim 256: an explicit impl='wgmma' and the tiles that do not fit it are refused, naming them."""
    seed = _seed()
    q, kc, vc, cu, ctx, bt, qlens, _ = _prefill_inputs([(5, 5)], 1, 2, 256, 16, torch.bfloat16, _gen(seed))
    with pytest.raises(ValueError, match="'wgmma' takes head_dim 64 or 128; head_dim 256"):
        cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, 5, 0.1, impl="wgmma")
    with pytest.raises(ValueError, match=r"tile must be one of \(\(1, 32\),\) at head_dim 256"):
        cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, 5, 0.1, tile=(2, 64))


@pytest.mark.parametrize("tile,d", [pytest.param(t, d, id=f"{t[0]}x{t[1]}-{'hd256' if d == 256 else d}")
                                    for d in cuda_ops.ATTN_HEAD_DIMS for t in cuda_ops.PREFILL_TILE_CHOICES_BY_DIM[d]])
def test_prefill_attention_tiles(tile, d):
    """Every tile shape the wrapper can pick, on prefix hits, a multi-block sequence and page crossings."""
    seed = _seed()
    g = _gen(seed)
    seqs = [(300, 300), (97, 1025), (1, 33), (130, 200)]
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, 2, 8, d, 16, torch.bfloat16, g)
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), d**-0.5, out=out, tile=tile)
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, d**-0.5)
    _assert_close(f"prefill {tile}", got, base, ref, seed)


def test_prefill_falls_back_to_mma_when_the_wgmma_build_fails(monkeypatch):
    """On Hopper, a failed sm_90a build (say, a CuPy whose compile path moved) warns once and serves prefill with
    the mma.sync kernel; an explicit impl="wgmma" still raises."""
    _need_impl("wgmma")
    monkeypatch.setattr(cuda_attention, "_WGMMA_FAILED", {})
    monkeypatch.delenv("FLASHGEN_PREFILL", raising=False)
    real = jit.get_kernel

    def get_kernel(source, *a, **kw):
        if source == "prefill_attention_sm90.cu":
            raise RuntimeError("this CuPy cannot be told to compile for sm_90a")
        return real(source, *a, **kw)

    monkeypatch.setattr(jit, "get_kernel", get_kernel)
    seed = _seed()
    g = _gen(seed)
    seqs = [(97, 97), (33, 200)]
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, 2, 8, 128, 16, torch.bfloat16, g)
    with pytest.raises(RuntimeError, match="sm_90a"):
        cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, 97, 0.088, impl="wgmma")
    with pytest.warns(RuntimeWarning, match="using the mma.sync kernel instead"):
        got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, 97, 0.088)
    assert cuda_ops.prefill_impl(DEV.index or 0) == "mma"
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, 0.088)
    _assert_close("prefill fallback", got, base, ref, seed)


def test_prefill_wgmma_schedule_skips_empty_sequences_and_replays_in_a_graph():
    """The persistent kernel's item counter: sequences without queries take no items, and the counter is back
    at zero after every launch, so CUDA-graph replays give the eager result bit for bit."""
    _need_impl("wgmma")
    seed = _seed()
    g = _gen(seed)
    seqs = [(0, 40), (97, 1025), (0, 16), (300, 300), (1, 1)]
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, 2, 8, 128, 16, torch.bfloat16, g)
    args = (q, kc, vc, cu, ctx, bt, max(qlens), 0.088)
    eager = cuda_ops.prefill_attention(*args, out=torch.full_like(q, float("nan")), impl="wgmma").clone()
    live = [i for i, m in enumerate(qlens) if m]
    ref, base, _ = _refs(q, kc, vc, bt[live], [lens[i] for i in live], [qlens[i] for i in live], 0.088)
    _assert_close("prefill wgmma, empty sequences", eager, base, ref, seed)
    graph_out = torch.full_like(q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.prefill_attention(*args, out=graph_out, impl="wgmma")
    for _ in range(3):
        graph_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager), f"seed {seed}"


def test_prefill_wgmma_survives_a_context_shorter_than_its_queries():
    """Outside the contract (context_len < q_len) the persistent kernel still finishes, and the batch's other
    sequences are still right: no item may stall its CTA's pipeline."""
    _need_impl("wgmma")
    seed = _seed()
    g = _gen(seed)
    seqs = [(300, 300), (200, 3), (97, 1025)]  # the second: 200 queries over a 3-token context
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_inputs(seqs, 2, 8, 128, 16, torch.bfloat16, g)
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), 0.088, impl="wgmma")
    torch.cuda.synchronize()
    rows = torch.cat([torch.arange(0, 300), torch.arange(500, 597)]).to(DEV)
    ref, base, _ = _refs(q[rows], kc, vc, bt[[0, 2]], [300, 1025], [300, 97], 0.088)
    _assert_close("prefill wgmma beside a short context", got[rows], base, ref, seed)


def test_tma_maps_are_built_once_per_cache_and_never_during_capture():
    """The wgmma prefill's TMA maps: one per (cache, box height), reused; a capture cannot build one."""
    from flashgen.ops import tma

    kc = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16, device=DEV)
    m = tma.paged_cache_map(kc, 16)
    assert m.device == kc.device and m.dtype == torch.uint8 and m.numel() == 128 and bool(m.any())
    assert tma.paged_cache_map(kc, 16) is m
    other = tma.paged_cache_map(kc[:4], 16)
    assert other is not m and not torch.equal(other, m)  # fewer rows: another map
    fresh = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16, device=DEV)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"), torch.cuda.graph(g):
        tma.paged_cache_map(fresh, 16)


def test_prefill_matches_torch_reference_backend():
    """The torch backend's own prefill (SDPA in the storage dtype) agrees with the kernel too."""
    seed = _seed()
    g = _gen(seed)
    seqs = [(33, 33), (100, 300)]
    kc, vc, bt = _paged_cache([n for _, n in seqs], 2, 128, 16, torch.bfloat16, g)
    q = _randn((133, 8, 128), g, torch.bfloat16)
    cu = torch.tensor([0, 33, 133], dtype=torch.int32, device=DEV)
    ctx = torch.tensor([33, 300], dtype=torch.int32, device=DEV)
    kz, vz = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    ref = torch_ops.prefill_attention(q, kz, vz, cu, ctx, bt, 100, 0.088)
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, 100, 0.088)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2, msg=f"seed {seed}")


# ---------------------------------------------------------------- skinny GEMM (decode at small batch)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(1, 8), (17, 1032), (4096, 4096), (1000, 14336)])
@pytest.mark.parametrize("variant", cuda_ops.SKINNY_VARIANTS)
def test_skinny_gemm(dtype, M, N, K, variant):
    seed = _seed()
    g = _gen(seed)
    x = _randn((M, K), g, dtype)
    w = _randn((N, K), g, dtype, K**-0.5)
    bias = _randn((N,), g, dtype) if N % 2 else None  # odd N: with a bias (Qwen2's qkv)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    got = cuda_ops.skinny_gemm(x, w, bias, out=out, warps=variant[0], unroll=variant[1])
    assert got is out
    ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    _assert_close("skinny_gemm", got, torch.nn.functional.linear(x, w, bias), ref, seed)


def test_linear_dispatch_matches_torch():
    """ops.linear: the skinny kernel or cuBLAS (a measured choice) for <= 8 rows, cuBLAS above; both right."""
    seed = _seed()
    g = _gen(seed)
    w = _randn((3000, 2048), g, torch.bfloat16, 2048**-0.5)
    for shape in [(1, 2048), (2, 3, 2048), (8, 2048), (9, 2048), (300, 2048)]:
        x = _randn(shape, g, torch.bfloat16)
        got = cuda_ops.linear(x, w)
        ref = torch.nn.functional.linear(x.double(), w.double())
        assert got.shape == (*shape[:-1], 3000)
        _assert_close(f"linear {shape}", got, torch.nn.functional.linear(x, w), ref, seed)
    assert cuda_ops.linear_plan(1, w, None) in (None, *cuda_ops.SKINNY_VARIANTS)


# ---------------------------------------------------------------- sampling: token bitmask (structured outputs)
SAMPLING_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pack_bitmask(allowed: torch.Tensor, words: int, gen) -> torch.Tensor:
    """(M, V) bool -> (M, words) int32, llguidance's layout (token t: bit t & 31 of word t >> 5), packed here
    rather than by the sampler; bits past V are random (to be ignored), columns past 32 * words dropped."""
    M, V = allowed.shape
    bits = torch.rand((M, 32 * words), generator=gen, device=DEV) < 0.5
    n = min(V, 32 * words)
    bits[:, :n] = allowed[:, :n]
    w = (bits.view(M, words, 32).long() << torch.arange(32, device=DEV)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _mask_case(B: int, V: int, dtype, gen, words: int | None = None):
    """Random logits (never zeros) and a bitmask: about two thirds of the rows constrained (one token allowed in
    some, none at all in one when B > 1), the rest unconstrained; greedy and sampled rows mixed."""
    logits = _randn((B, V), gen, dtype, 2.0)
    M = max(1, B - B // 3)
    density = torch.rand((M, 1), generator=gen, device=DEV) * 0.5 + 0.01
    allowed = torch.rand((M, V), generator=gen, device=DEV) < density
    single = torch.arange(0, M, 4, device=DEV)
    allowed[single] = False
    allowed[single, torch.randint(0, V, (len(single),), generator=gen, device=DEV)] = True
    if M > 1:
        allowed[M - 1] = False  # nothing allowed: -1
    W = -(-V // 32) if words is None else words
    bitmask = _pack_bitmask(allowed, W, gen)
    perm = torch.randperm(B, generator=gen, device=DEV)
    mask_rows = torch.full((B,), -1, dtype=torch.int32, device=DEV)
    mask_rows[perm[:M]] = torch.randperm(M, generator=gen, device=DEV).to(torch.int32)
    temps = torch.rand(B, generator=gen, device=DEV) + 0.2
    temps[::3] = 0.0
    b = SamplingBatch(temperature=temps, top_k=None, top_p=None, min_p=None,
                      seeds=torch.randint(0, 2**62, (B,), generator=gen, device=DEV),
                      steps=torch.randint(0, 5000, (B,), generator=gen, device=DEV), all_greedy=False,
                      bitmask=bitmask, mask_rows=mask_rows)
    ok = torch.ones((B, V), dtype=torch.bool, device=DEV)  # what each row may pick
    rows = mask_rows >= 0
    n = min(V, 32 * W)
    ok[rows] = False
    ok[rows, :n] = allowed[mask_rows[rows].long(), :n]
    return logits, b, ok


def _check_tokens(name, out, ref, logits, b, ok, seed):
    """out against the torch sampler's ref: the same -1 rows, allowed tokens only, greedy rows identical,
    sampled rows identical up to near ties (the kernel's fast logarithms differ from torch's by a few ulp)."""
    B = out.shape[0]
    assert torch.equal(out == -1, ref == -1), f"{name}: -1 rows differ, seed {seed}"
    picked = out.clamp(min=0)
    assert bool(ok[torch.arange(B, device=DEV), picked][out >= 0].all()), f"{name}: a forbidden token, seed {seed}"
    greedy = b.temperature == 0
    assert torch.equal(out[greedy], ref[greedy]), f"{name}: greedy rows differ, seed {seed}"
    diff = (out != ref).nonzero().flatten()
    if len(diff):
        t = b.temperature[diff, None]
        noise = gumbel_noise(b.seeds[diff], b.steps[diff], logits.shape[-1])
        score = logits[diff].double() / t + noise.double()
        s_out = score.gather(1, out[diff, None]).flatten()
        s_ref = score.gather(1, ref[diff, None]).flatten()
        gap = (s_out - s_ref).abs() / s_ref.abs().clamp(min=1)
        assert bool((gap < 1e-4).all()), f"{name}: rows {diff.tolist()} differ beyond a near tie {gap}, seed {seed}"
        assert len(diff) <= max(1, B // 100), f"{name}: {len(diff)} of {B} rows differ, seed {seed}"


@pytest.mark.parametrize("dtype", SAMPLING_DTYPES)
@pytest.mark.parametrize("V", [97, 1000, 32000, 151936])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_gumbel_argmax_bitmask(dtype, V, B):
    """Masked rows pick what the torch sampler picks over the allowed tokens (vector and scalar loads, one or
    several CTAs per row), a row with nothing allowed gets -1 on both; mask=None, a bitmask whose mask_rows
    are all -1, and one allowing every token to every row give the very same tokens."""
    seed = _seed()
    g = _gen(seed)
    logits, b, ok = _mask_case(B, V, dtype, g)
    out = torch.full((B,), -7, dtype=torch.int64, device=DEV)
    cuda_ops.gumbel_argmax(logits, b.temperature, b.seeds, b.steps, out=out, bitmask=b.bitmask,
                           mask_rows=b.mask_rows)
    ref = sample(logits.float(), b, fused=False)
    _check_tokens(f"gumbel_argmax {dtype} V={V} B={B}", out, ref, logits.float(), b, ok, seed)
    assert torch.equal(sample(logits, b, fused=True), out)  # sample's fused path passes the mask through

    plain = cuda_ops.gumbel_argmax(logits, b.temperature, b.seeds, b.steps)
    free = torch.full((B,), -1, dtype=torch.int32, device=DEV)
    assert torch.equal(cuda_ops.gumbel_argmax(logits, b.temperature, b.seeds, b.steps, bitmask=b.bitmask,
                                              mask_rows=free), plain), f"all -1 rows differ, seed {seed}"
    ones = torch.full((1, -(-V // 32)), -1, dtype=torch.int32, device=DEV)
    every = torch.zeros((B,), dtype=torch.int32, device=DEV)
    assert torch.equal(cuda_ops.gumbel_argmax(logits, b.temperature, b.seeds, b.steps, bitmask=ones,
                                              mask_rows=every), plain), f"all-allowed rows differ, seed {seed}"
    b.bitmask = b.mask_rows = None
    _check_tokens(f"gumbel_argmax {dtype} V={V} B={B} unmasked", plain, sample(logits.float(), b, fused=False),
                  logits.float(), b, torch.ones_like(ok), seed)


@pytest.mark.parametrize("V,words", [(151936, 4740), (1000, 40), (1000, 20), (97, 1)])
def test_gumbel_argmax_bitmask_narrower_or_wider_than_the_vocab(V, words):
    """A bitmask narrower than the logits (a padded vocabulary) forbids the columns past 32 W; a wider one's
    extra bits are ignored. Large logits in the padding would win if they were read as allowed."""
    seed = _seed()
    g = _gen(seed)
    logits, b, ok = _mask_case(64, V, torch.bfloat16, g, words=words)
    if 32 * words < V:
        logits[:, 32 * words:] += 50
    out = cuda_ops.gumbel_argmax(logits, b.temperature, b.seeds, b.steps, bitmask=b.bitmask, mask_rows=b.mask_rows)
    ref = sample(logits.float(), b, fused=False)
    _check_tokens(f"gumbel_argmax V={V} words={words}", out, ref, logits.float(), b, ok, seed)


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p", "penalties", "banned"])
def test_fused_sample_with_bitmask_and_filters(kind):
    """sample(fused=True) with a float32 copy: filters see the masked logits first (the torch mask), penalties
    and bans leave the mask to the kernel; both pick what the torch path picks."""
    seed = _seed()
    g = _gen(seed)
    B, V = 64, 32000
    logits, b, ok = _mask_case(B, V, torch.bfloat16, g)
    f32 = dict(dtype=torch.float32, device=DEV)
    if kind == "top_k":
        b.top_k = torch.randint(1, 50, (B,), generator=g, device=DEV)
    elif kind == "top_p":
        b.top_p = torch.rand(B, generator=g, device=DEV) * 0.9 + 0.05
    elif kind == "min_p":
        b.min_p = torch.rand(B, generator=g, device=DEV) * 0.5
    elif kind == "penalties":
        b.rep_penalty = torch.full((B,), 1.3, **f32)
        b.seen_prompt = torch.rand((B, V), generator=g, device=DEV) < 0.3
        b.presence, b.frequency = torch.full((B,), 0.5, **f32), torch.full((B,), 0.25, **f32)
        b.out_counts = torch.randint(0, 3, (B, V), generator=g, device=DEV).float()
    else:
        b.banned = torch.rand((B, V), generator=g, device=DEV) < 0.3
    out = sample(logits, b, fused=True)
    ref = sample(logits.float(), b, fused=False)
    assert torch.equal(out == -1, ref == -1), f"{kind}: -1 rows differ, seed {seed}"
    assert bool(ok[torch.arange(B, device=DEV), out.clamp(min=0)][out >= 0].all()), f"{kind}: forbidden token"
    greedy = b.temperature == 0
    assert torch.equal(out[greedy], ref[greedy]), f"{kind}: greedy rows differ, seed {seed}"
    assert (out == ref).float().mean().item() >= 0.95, f"{kind}: too many rows differ, seed {seed}"


def test_gumbel_argmax_bitmask_bad_arguments_are_refused():
    logits = torch.randn(4, 100, device=DEV)
    t, s = torch.ones(4, device=DEV), torch.zeros(4, dtype=torch.int64, device=DEV)
    bm = torch.full((2, 4), -1, dtype=torch.int32, device=DEV)
    rows = torch.tensor([0, 1, -1, 0], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="bitmask must have dtype"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm.long(), mask_rows=rows)
    with pytest.raises(ValueError, match="mask_rows must have dtype"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm, mask_rows=rows.long())
    with pytest.raises(ValueError, match="mask_rows must have one entry per logits row"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm, mask_rows=rows[:3])
    with pytest.raises(ValueError, match="mask_rows must be given with bitmask"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm)
    with pytest.raises(ValueError, match="bitmask must be contiguous"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm.t(), mask_rows=rows)
    with pytest.raises(ValueError, match="bitmask must be a CUDA tensor"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm.cpu(), mask_rows=rows)
    with pytest.raises(ValueError, match="at least one word"):
        cuda_ops.gumbel_argmax(logits, t, s, s, bitmask=bm[:, :0], mask_rows=rows)


# ---------------------------------------------------------------- CUDA graphs
def test_decode_and_rope_in_cuda_graph():
    seed = _seed()
    g = _gen(seed)
    B, hq, hkv, d, bs = 8, 16, 8, 128, 16
    lens = [50, 700, 1, 33, 200, 129, 64, 1000]
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, torch.bfloat16, g)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qkv = _randn((B, (hq + 2 * hkv) * d), g, torch.bfloat16)
    pos = (ctx - 1).to(torch.int32)
    slots = (bt[torch.arange(B, device=DEV), pos // bs].long() * bs + pos % bs).to(torch.int32)
    cos_sin = _cos_sin(4096, d)

    def step():
        q = cuda_ops.rope_kv_append(qkv, pos, cos_sin, slots, kc, vc)
        return cuda_ops.decode_attention(q, kc, vc, ctx, bt, d**-0.5, num_splits=3)

    step()  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    qkv.copy_(_randn(qkv.shape, g, torch.bfloat16))  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    assert torch.equal(static_out, expected), f"graph replay differs from eager, seed {seed}"


# ---------------------------------------------------------------- argument checks
def test_bad_arguments_are_refused():
    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.ones(64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must have dtype"):
        cuda_ops.rms_norm(x.float(), w.float(), 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        cuda_ops.rms_norm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        cuda_ops.silu_mul(x.t())
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.silu_mul(x.cpu())
    kc = torch.zeros(4, 16, 2, 128, device=DEV, dtype=torch.bfloat16)
    q = torch.zeros(3, 4, 128, device=DEV, dtype=torch.bfloat16)
    ctx = torch.ones(3, dtype=torch.int32, device=DEV)
    bt = torch.zeros(3, 2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="v_cache must have dtype"):
        cuda_ops.decode_attention(q, kc, kc.half(), ctx, bt, 0.1)
    with pytest.raises(ValueError, match="context_lens must have dtype"):
        cuda_ops.decode_attention(q, kc, kc, ctx.long(), bt, 0.1)
    with pytest.raises(ValueError, match="block_tables must be"):
        cuda_ops.decode_attention(q, kc, kc, ctx, bt[:2], 0.1)
    with pytest.raises(ValueError, match="block size"):
        cuda_ops.decode_attention(q, kc[:, :12].contiguous(), kc[:, :12].contiguous(), ctx, bt, 0.1)
    k96 = kc[..., :96].contiguous()
    with pytest.raises(ValueError, match="head_dim"):
        cuda_ops.decode_attention(q[..., :96].contiguous(), k96, k96, ctx, bt, 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cuda_ops.decode_attention(q[:, :3].contiguous(), kc, kc, ctx, bt, 0.1)
    with pytest.raises(ValueError, match="positions must have dtype"):
        cuda_ops.rope_kv_append(torch.zeros(3, 8 * 128, device=DEV, dtype=torch.bfloat16), ctx.float(),
                                torch.zeros(10, 128, device=DEV), ctx, kc, kc)
    with pytest.raises(ValueError, match="x must have 1 to 8 rows"):
        cuda_ops.skinny_gemm(torch.zeros(9, 64, device=DEV, dtype=torch.bfloat16), x)
    with pytest.raises(ValueError, match="weight must be"):
        cuda_ops.skinny_gemm(x, x[:, :32].contiguous())
    with pytest.raises(ValueError, match="bias must have shape"):
        cuda_ops.skinny_gemm(x, x, w)
    assert math.isfinite(cuda_ops.decode_attention(q.normal_(), kc.normal_(), kc, ctx, bt, 0.1).float().sum().item())
