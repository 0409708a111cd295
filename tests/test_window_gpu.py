"""Sliding-window attention (Gemma 3's local layers) in the CUDA kernels, on the GPU: decode (both plans, split
counts), prefill (the mma.sync and the Hopper wgmma kernels), the FP8 cache's paths, and a tiny Gemma 3 on the CUDA
backend against the torch backend.

The query at position p sees keys in (p - window, p] (torch_ops' semantics). As tests/test_kernels_gpu.py checks
the kernels without a window: against a float64 oracle, err(kernel) <= 2 * err(torch in the same dtype) + eps.
The cache slots no kernel may read are NaN: unused slots as there, and also the tokens below the first 16-token
step (decode) or 128-token tile (prefill: the coarsest key tile) of every window, so a kernel that visits a tile
below every row's window, rather than skipping it, fails with NaN (0 x NaN in P.V).
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from flashgen.ops import torch_ops
from test_kernels_gpu import (
    DEV,
    DTYPES,
    _assert_close,
    _gen,
    _need_impl,
    _paged_cache,
    _randn,
    _refs,
    _seed,
    cuda_attention,
    cuda_ops,
)
from test_model_families_gpu import cuda_against_torch

pytestmark = pytest.mark.gpu

WINDOWS = [1, 16, 17, 100, 512]


def _poison_below(caches, bt, lens, qlens, window, granule):
    """NaN into the tokens of each sequence below its lowest query's window start rounded down to `granule`:
    no kernel reads them."""
    bs = caches[0].shape[1]
    for b, (n, m) in enumerate(zip(lens, qlens, strict=True)):
        cut = max(0, n - m - window + 1) // granule * granule
        if cut:
            t = torch.arange(cut, device=DEV)
            slots = bt[b, t // bs].long() * bs + t % bs
            for c in caches:
                c.view(-1, *c.shape[2:])[slots] = float("nan")


# ---------------------------------------------------------------- decode
DECODE_LENS = [
    [1], [97], [1025, 1, 40], [4097], [4097, 3, 1025, 2, 97],  # ragged
    [300, 511, 64, 65, 129, 128, 1, 16, 17, 513],
    [4097, 1025, 512, 97, 16, 1],  # longest first, as the engine orders a decode batch
]
DECODE_CASES = [
    (dt, d, group, bs, window, lens)
    for i, (window, lens) in enumerate(itertools.product(WINDOWS, DECODE_LENS))
    for dt, d, group, bs in [list(itertools.product(DTYPES, [64, 128], [1, 4, 8], [16, 64]))[(7 * i) % 24]]
] + [  # head_dim 256: a subset, every window
    pytest.param(torch.bfloat16, 256, 4, 16, 1, DECODE_LENS[4], id="hd256"),
    pytest.param(torch.float16, 256, 2, 64, 17, DECODE_LENS[2], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 16, 100, DECODE_LENS[5], id="hd256"),
    pytest.param(torch.float16, 256, 1, 64, 512, DECODE_LENS[6], id="hd256"),
    pytest.param(torch.bfloat16, 256, 4, 16, 16, DECODE_LENS[1], id="hd256"),
]


def _check_decode_window(lens, hkv, hq, d, bs, dtype, scale, window, **kw):
    seed = _seed()
    g = _gen(seed)
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((len(lens), hq, d), g, dtype)
    ref, base, lse64 = _refs(q, kc, vc, bt, lens, [1] * len(lens), scale, window)
    _poison_below((kc, vc), bt, lens, [1] * len(lens), window, 16)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, kc, vc, ctx, bt, scale, window=window, out=out, return_lse=True, **kw)
    assert got is out
    _assert_close(f"decode window {window}", got, base, ref, seed)
    assert (lse.double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"lse, seed {seed}"


@pytest.mark.parametrize("dtype,d,group,bs,window,lens", DECODE_CASES)
def test_decode_attention_window(dtype, d, group, bs, window, lens):
    hkv = 2
    _check_decode_window(lens, hkv, hkv * group, d, bs, dtype, d**-0.5, window)


@pytest.mark.parametrize("plan", ["split", "balanced"])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("window,lens", [
    (100, [1, 63, 64, 65, 700, 3000]), (17, [4097, 1025, 97, 1]), (512, [9000, 16, 17, 2, 4097, 1, 1, 1, 300]),
    (1, [700] * 6), (16, [17] * 4), (512, [0, 1025, 0, 97]),
])
def test_decode_attention_window_splits(window, lens, num_splits, plan):
    """Split counts and both plans with a window; GQA group 16 (two pairs of 8 query heads per kv head); an
    empty context among them. Twice: the pairs' merge counters must be back at zero for the next launch."""
    for _ in range(2):
        if 0 in lens:
            _check_empty(lens, window, num_splits, plan)
        else:
            _check_decode_window(lens, 2, 32, 128, 16, torch.bfloat16, 0.1, window, num_splits=num_splits,
                                 plan=plan)
        state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
        assert state.count_nonzero() == 0


@pytest.mark.parametrize("plan", ["split", "balanced"])
@pytest.mark.parametrize("num_splits,window,lens", [
    (3, 100, [1, 63, 64, 65, 700, 3000]), (64, 512, [9000, 16, 17, 2, 4097, 1, 1, 1, 300]), (3, 512, [0, 1025, 0, 97]),
])
def test_decode_attention_window_splits_hd256(window, lens, num_splits, plan):
    """Head_dim 256 with a window under both plans, GQA group 16, an empty context among them."""
    for _ in range(2):
        if 0 in lens:
            _check_empty(lens, window, num_splits, plan, d=256)
        else:
            _check_decode_window(lens, 2, 32, 256, 16, torch.bfloat16, 0.1, window, num_splits=num_splits,
                                 plan=plan)


def _check_empty(lens, window, num_splits, plan, d=128):
    seed = _seed()
    g = _gen(seed)
    kc, vc, bt = _paged_cache(lens, 2, d, 16, torch.bfloat16, g)
    q = _randn((len(lens), 32, d), g, torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, lse = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, window=window, out=torch.full_like(q, float("nan")),
                                         return_lse=True, num_splits=num_splits, plan=plan)
    empty = [i for i, n in enumerate(lens) if n == 0]
    full = [i for i, n in enumerate(lens) if n]
    assert torch.equal(out[empty], torch.zeros_like(out[empty])) and torch.isneginf(lse[empty]).all(), f"seed {seed}"
    ref, base, _ = _refs(q[full], kc, vc, bt[full], [lens[i] for i in full], [1] * len(full), 0.1, window)
    _assert_close("decode window, empty contexts", out[full], base, ref, seed)


def _decode_batch(lens):
    """A bf16 paged cache (2 kv heads, head_dim 128, block 16), q with 8 query heads and context_lens for `lens`,
    and the seed they were drawn with."""
    seed = _seed()
    g = _gen(seed)
    kc, vc, bt = _paged_cache(lens, 2, 128, 16, torch.bfloat16, g)
    q = _randn((len(lens), 8, 128), g, torch.bfloat16)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), seed


def test_decode_window_zero_is_no_window():
    """window=0 is full attention, bit for bit the launch without the argument."""
    q, kc, vc, bt, ctx, seed = _decode_batch([4097, 3, 1025, 2])
    for plan in ("split", "balanced"):
        a = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, plan=plan, num_splits=3)
        b = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, window=0, plan=plan, num_splits=3)
        assert torch.equal(a, b)
    # a window at least the context is no window either
    a = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, plan="split", num_splits=3)
    b = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, window=4097, plan="split", num_splits=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- prefill
PREFILL_QLENS = [  # (q_len, context_len) per sequence; context_len > q_len: prefix hit / chunked prefill
    [(1, 1)], [(97, 97)], [(1025, 1025)], [(4097, 4097)],
    [(97, 1025), (1, 4097), (64, 130)], [(200, 4000), (2, 2), (129, 129)],
    [(n, n + 3 * n % 50) for n in range(1, 40)],
]
PREFILL_CASES = [
    (dt, d, group, bs, window, seqs)
    for i, (window, seqs) in enumerate(itertools.product(WINDOWS, PREFILL_QLENS))
    for dt, d, group, bs in [list(itertools.product(DTYPES, [64, 128], [1, 4, 8], [16, 64]))[(5 * i) % 24]]
]
PREFILL_CASES_256 = [  # head_dim 256 (the mma kernel, whatever the impl asked): a subset, every window
    pytest.param(torch.bfloat16, 256, 4, 16, 17, PREFILL_QLENS[2], id="hd256"),
    pytest.param(torch.float16, 256, 2, 64, 100, PREFILL_QLENS[4], id="hd256"),
    pytest.param(torch.bfloat16, 256, 1, 16, 512, PREFILL_QLENS[5], id="hd256"),
    pytest.param(torch.float16, 256, 8, 64, 1, PREFILL_QLENS[1], id="hd256"),
    pytest.param(torch.bfloat16, 256, 4, 16, 16, PREFILL_QLENS[6], id="hd256"),
]


def _prefill_window_inputs(seqs, hkv, hq, d, bs, dtype, g):
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((sum(qlens), hq, d), g, dtype)
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, cu, ctx, bt, qlens, lens


def _check_prefill_window(dtype, d, group, bs, window, seqs, impl, label):
    """prefill_attention with a window (`impl`: the kernel, None: the one it picks) against the float64 oracle,
    the cache below every window poisoned with NaN."""
    seed = _seed()
    g = _gen(seed)
    hkv = 1 if max(n for _, n in seqs) > 2048 else 2
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_window_inputs(seqs, hkv, hkv * group, d, bs, dtype, g)
    scale = d**-0.5
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, scale, window)
    _poison_below((kc, vc), bt, lens, qlens, window, 128)
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), scale, window=window, out=out, impl=impl)
    assert got is out
    _assert_close(f"prefill {label} window {window}", got, base, ref, seed)


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,group,bs,window,seqs", PREFILL_CASES)
def test_prefill_attention_window(dtype, d, group, bs, window, seqs, impl):
    _need_impl(impl)
    _check_prefill_window(dtype, d, group, bs, window, seqs, impl, impl)


@pytest.mark.parametrize("dtype,d,group,bs,window,seqs", PREFILL_CASES_256)
def test_prefill_attention_window_hd256(dtype, d, group, bs, window, seqs):
    _check_prefill_window(dtype, d, group, bs, window, seqs, None, "hd256")


@pytest.mark.parametrize("tile", cuda_ops.PREFILL_TILE_CHOICES)
@pytest.mark.parametrize("window", [17, 100])
def test_prefill_attention_window_tiles(tile, window):
    """Every mma tile choice with a window (the first visited tile depends on the tile's keys)."""
    seed = _seed()
    g = _gen(seed)
    seqs = [(1025, 1025), (97, 1025), (64, 130)]
    q, kc, vc, cu, ctx, bt, qlens, lens = _prefill_window_inputs(seqs, 2, 8, 128, 16, torch.bfloat16, g)
    ref, base, _ = _refs(q, kc, vc, bt, lens, qlens, 0.088, window)
    _poison_below((kc, vc), bt, lens, qlens, window, 128)
    got = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), 0.088, window=window,
                                     out=torch.full_like(q, float("nan")), tile=tile)
    _assert_close(f"prefill tile {tile} window {window}", got, base, ref, seed)


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
def test_prefill_window_zero_is_no_window(impl):
    _need_impl(impl)
    seed = _seed()
    g = _gen(seed)
    seqs = [(1025, 1025), (97, 1025), (1, 4097)]
    q, kc, vc, cu, ctx, bt, qlens, _ = _prefill_window_inputs(seqs, 1, 4, 128, 64, torch.bfloat16, g)
    a = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), 0.088, impl=impl)
    b = cuda_ops.prefill_attention(q, kc, vc, cu, ctx, bt, max(qlens), 0.088, window=0, impl=impl)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- FP8 cache
FP8_CASES = [(dt, d, bs, window) for (dt, d), (bs, window) in zip(
    itertools.product(DTYPES, [64, 128]), [(16, 17), (64, 100), (16, 512), (64, 1)], strict=True)] + [
    pytest.param(torch.bfloat16, 256, 16, 100, id="hd256"), pytest.param(torch.float16, 256, 64, 17, id="hd256")]


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,bs,window", FP8_CASES)
def test_window_fp8_cache(dtype, d, bs, window, impl):
    """Decode reading the FP8 cache and prefill through its dequantized scratch, with a window."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the FP8 KV cache needs compute capability 8.9 or later")
    if impl == "wgmma" and d not in cuda_ops.PREFILL_SM90_HEAD_DIMS:
        pytest.skip(f"head_dim {d} runs on the mma prefill kernel only (its impl='mma' case)")
    _need_impl(impl)
    seed = _seed()
    g = _gen(seed)
    k_scale, v_scale = 0.0371, 0.0113
    seqs = [(97, 1025), (1, 4097), (64, 130), (300, 300)]
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    kc, vc, bt = _paged_cache(lens, 2, d, bs, dtype, g)
    k8 = torch_ops.to_cache(kc.nan_to_num(0.0), torch.float8_e4m3fn, k_scale)
    v8 = torch_ops.to_cache(vc.nan_to_num(0.0), torch.float8_e4m3fn, v_scale)
    kd, vd = k8.float() * k_scale, v8.float() * v_scale
    q = _randn((sum(qlens), 8, d), g, dtype)
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    got = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), scale, k_scale, v_scale, window=window,
                                     out=torch.full_like(q, float("nan")), impl=impl)
    ref, base, _ = _refs(q, kd, vd, bt, lens, qlens, scale, window, kv_dtype=dtype)
    _assert_close(f"prefill fp8 {impl} window {window}", got, base, ref, seed)
    # decode: the last query row of each sequence as its new token
    last = torch.tensor(list(itertools.accumulate(qlens)), device=DEV) - 1
    qd = q[last].contiguous()
    for plan in ("split", "balanced"):
        out, lse = cuda_ops.decode_attention(qd, k8, v8, ctx, bt, scale, k_scale, v_scale, window=window,
                                             out=torch.full_like(qd, float("nan")), return_lse=True, plan=plan)
        ref, base, lse64 = _refs(qd, kd, vd, bt, lens, [1] * len(lens), scale, window)
        _assert_close(f"decode fp8 {plan} window {window}", out, base, ref, seed)
        assert (lse.double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"seed {seed}"
        torch_ref = torch_ops.decode_attention(qd, k8, v8, ctx, bt, scale, k_scale, v_scale, window=window)
        torch.testing.assert_close(out.float(), torch_ref.float(), rtol=3e-2, atol=3e-2, msg=f"seed {seed}")


# ---------------------------------------------------------------- graphs and the engine
def test_decode_window_in_cuda_graph():
    """A windowed decode captured once replays right for other context lengths (the plan reads context_lens)."""
    lens = [4097, 1025, 97, 1]
    q, kc, vc, bt, ctx, seed = _decode_batch(lens)
    out = torch.empty_like(q)
    cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, window=100, out=out)  # eager first: counters, kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.decode_attention(q, kc, vc, ctx, bt, 0.1, window=100, out=out)
    for new in ([4000, 1000, 90, 1], [3000, 1025, 97, 1], [513, 512, 17, 1]):  # each within its blocks
        ctx.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        ref, base, _ = _refs(q, kc, vc, bt, new, [1] * 4, 0.1, 100)
        _assert_close(f"decode window graph {new}", out, base, ref, seed)


@pytest.mark.parametrize("window,head_dim", [(16, 128), (32, 128), pytest.param(16, 256, id="16-hd256")])
def test_engine_gemma3_cuda_backend_matches_torch_backend(tmp_path, window, head_dim):
    """A tiny Gemma 3 (local layers with a window much shorter than the prompts, a global layer, soft-capping)
    on the CUDA backend (bf16) against the torch backend on the same GPU (float32): prompt logits within twice
    the torch backend's own bf16 error; greedy runs of 48 tokens over pages of 16 complete. Head_dim 128 (Gemma 3
    27B) and 256 (1B-12B)."""
    from checkpoints import make_checkpoint
    from flashgen import SamplingParams

    path = str(make_checkpoint(tmp_path, "gemma3", hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=1,
                               head_dim=head_dim, intermediate_size=256, sliding_window=window,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               rope_local_base_freq=100.0, query_pre_attn_scalar=head_dim,
                               final_logit_softcapping=30.0))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 100, 173, 300)]
    fast, ref, same = cuda_against_torch(path, prompts)
    assert fast.engine.runner.backend == "cuda"
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = fast.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [48] * len(prompts)
    # decode (past the window) against the reference: how often each bf16 run's greedy token is the float32
    # reference's argmax given the same tokens; the CUDA run within 10 points of the torch bf16 run's rate
    def agreement(outs) -> float:
        hits = total = 0
        for ids, o in zip(prompts, outs, strict=True):
            logits = ref.prompt_logits(ids + list(o.token_ids)).float()[len(ids) - 1:-1]
            hits += (logits.argmax(-1).cpu() == torch.tensor(o.token_ids)).sum().item()
            total += len(o.token_ids)
        return hits / total

    a, c = agreement(outs), agreement(same.generate(prompts, params))
    assert a >= c - 0.1, f"greedy tokens agreeing with the float32 reference: CUDA {a:.3f}, torch bf16 {c:.3f}"
