"""The FP8 KV cache's kernels against the torch reference, on the GPU (sm_89+): the fused RoPE + append writing
float8 e4m3 (kernels/fp8.cuh), decode attention reading it, prefill through the dequantized scratch
(kernels/kv_fp8.cu), and the engine end to end.

Attention is checked as tests/test_kernels_gpu.py checks the bf16/fp16 kernels: against a float64 oracle of the
same (dequantized) cache, err(kernel) <= 2 * err(torch in the same dtype) + eps. The scales are awkward values,
not 1, so a scale applied twice, or not at all, fails.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from flashgen.ops import cuda_ops, torch_ops
from test_kernels_gpu import DEV, DTYPES, _assert_close, _cos_sin, _gen, _paged_cache, _randn, _refs, _seed

pytestmark = pytest.mark.gpu

if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("the FP8 KV cache needs compute capability 8.9 or later", allow_module_level=True)

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.0371, 0.0113  # stored = x / scale: values up to ~16 (K) and ~5 (V) before saturating


def _quantized_cache(lens, hkv, d, bs, dtype, g):
    """A random paged cache quantized to FP8 with K_SCALE / V_SCALE (some values saturate), its dequantized
    float32 twin (the oracle's input), and the block tables."""
    kc, vc, bt = _paged_cache(lens, hkv, d, bs, dtype, g)
    k8 = torch_ops.to_cache(kc.nan_to_num(0.0) * 3, FP8, K_SCALE)  # x3: a few values past 448 * scale
    v8 = torch_ops.to_cache(vc.nan_to_num(0.0), FP8, V_SCALE)
    return k8, v8, k8.float() * K_SCALE, v8.float() * V_SCALE, bt


ROPE_CASES = [(dt, d, T, heads, bs) for (dt, d), (T, heads, bs) in zip(
    itertools.product(DTYPES, [64, 128, 256]),
    itertools.cycle([(1, (8, 8), 16), (97, (12, 4), 64), (1025, (32, 4), 256), (2, (16, 2), 16)]))]


@pytest.mark.parametrize("dtype,d,T,heads,bs", ROPE_CASES)
def test_rope_kv_append_fp8(dtype, d, T, heads, bs):
    """V bytes equal the reference's exactly (the same value, one rounding); K's equal except where the rotation
    rounds differently (the kernel rotates in float32 and rounds once, the reference in bf16 op by op, as HF: the
    bf16 kernel test allows the same), then one FP8 step apart; q as in the bf16 kernel; untouched slots stay
    untouched."""
    seed = _seed()
    g = _gen(seed)
    hq, hkv = heads
    num_blocks = (T + bs - 1) // bs + 3
    qkv = _randn((T, (hq + 2 * hkv) * d), g, dtype, 8.0)
    positions = torch.randint(0, 4096, (T,), generator=g, device=DEV)
    cos_sin = _cos_sin(4096, d)
    slots = torch.randperm(num_blocks * bs, generator=g, device=DEV)[:T]
    slots[1::7] = -1  # token 0 is written: T = 1 still checks something
    shape = (num_blocks, bs, hkv, d)
    poison = torch.full(shape, 0x7F, dtype=torch.uint8, device=DEV)  # 0x7f: e4m3 NaN, never written
    kc, vc = poison.clone().view(FP8), poison.clone().view(FP8)
    q = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, kc, vc, k_scale=K_SCALE, v_scale=V_SCALE)
    kr, vr = torch.zeros(shape, dtype=FP8, device=DEV), torch.zeros(shape, dtype=FP8, device=DEV)
    torch_ops.rope_kv_append(qkv, positions, cos_sin, slots, kr, vr, k_scale=K_SCALE, v_scale=V_SCALE)
    qb = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, torch.zeros(shape, dtype=dtype, device=DEV),
                                 torch.zeros(shape, dtype=dtype, device=DEV))
    assert torch.equal(q, qb), f"q differs from the bf16/fp16 cache's kernel (tested in test_kernels_gpu), {seed}"
    written = slots[slots >= 0]
    flat = lambda c: c.view(-1, hkv, d)  # noqa: E731
    assert torch.equal(flat(vc)[written].view(torch.uint8), flat(vr)[written].view(torch.uint8)), f"v, seed {seed}"
    kk, kref = flat(kc)[written].float(), flat(kr)[written].float()
    off = (kk - kref).abs() > 0
    assert off.float().mean().item() < 0.1, f"k: {off.float().mean().item():.2%} of values differ, seed {seed}"
    # against a float64 rotation: the kernel's K (stored value x scale) is no further from it than twice the
    # reference's, whose bf16 op-by-op rotation loses more where the two terms of a pair nearly cancel
    k64, v64 = torch.zeros(shape, dtype=torch.float64, device=DEV), torch.zeros(shape, dtype=torch.float64, device=DEV)
    torch_ops.rope_kv_append(qkv.double(), positions, cos_sin.double(), slots, k64, v64)
    exact = flat(k64)[written]
    e_kernel = (kk.double() * K_SCALE - exact.clamp(-448 * K_SCALE, 448 * K_SCALE)).abs().max().item()
    e_ref = (kref.double() * K_SCALE - exact.clamp(-448 * K_SCALE, 448 * K_SCALE)).abs().max().item()
    assert e_kernel <= 2 * e_ref + 1e-6, f"k: max err {e_kernel:.3g} > 2 x reference {e_ref:.3g}, seed {seed}"
    assert (kk.abs() <= 448).all() and (kk.abs() == 448).any(), f"k: saturation not exercised, seed {seed}"
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEV)
    untouched[written.long()] = False
    assert (flat(kc).view(torch.uint8)[untouched] == 0x7F).all(), f"a slot outside slot_mapping written, {seed}"
    assert (flat(vc).view(torch.uint8)[untouched] == 0x7F).all(), f"a slot outside slot_mapping written, {seed}"


DECODE_LENS = [[1], [2, 97], [1025, 1, 40], [4097, 3, 1025, 2], [300, 511, 64, 65, 129, 128, 1, 16],
               [17] * 200]
DECODE_CASES = [(dt, d, group, [16, 64, 256][i % 3], DECODE_LENS[i % len(DECODE_LENS)])
                for i, (dt, d, group) in enumerate(itertools.product(DTYPES, [64, 128], [1, 3, 4, 8]))] + [
    # head_dim 256: a subset
    pytest.param(torch.bfloat16, 256, 1, 16, DECODE_LENS[0], id="hd256"),
    pytest.param(torch.float16, 256, 4, 64, DECODE_LENS[2], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 256, DECODE_LENS[4], id="hd256"),
    pytest.param(torch.float16, 256, 2, 16, DECODE_LENS[5], id="hd256")]


@pytest.mark.parametrize("dtype,d,group,bs,lens", DECODE_CASES)
def test_decode_attention_fp8(dtype, d, group, bs, lens):
    seed = _seed()
    g = _gen(seed)
    hkv = 2 if len(lens) < 64 else 1
    k8, v8, kd, vd, bt = _quantized_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((len(lens), hkv * group, d), g, dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, k8, v8, ctx, bt, scale, K_SCALE, V_SCALE, out=out, return_lse=True)
    ref, base, lse64 = _refs(q, kd, vd, bt, lens, [1] * len(lens), scale)
    _assert_close("decode fp8", got, base, ref, seed)
    assert (lse.double() - lse64).abs().max().item() < 1e-3 * (1 + lse64.abs().max().item()), f"lse, seed {seed}"
    torch_ref = torch_ops.decode_attention(q, k8, v8, ctx, bt, scale, K_SCALE, V_SCALE)
    torch.testing.assert_close(got.float(), torch_ref.float(), rtol=3e-2, atol=3e-2, msg=f"seed {seed}")


PREFILL_QLENS = [[(1, 1)], [(2, 2), (97, 97)], [(97, 1025), (1, 4097), (64, 130)], [(1025, 1025)],
                 [(n, n + 3 * n % 50) for n in range(1, 40)], [(200, 4000), (2, 2), (129, 129)]]
PREFILL_CASES = [(dt, d, group, [16, 64, 256][i % 3], PREFILL_QLENS[i % len(PREFILL_QLENS)])
                 for i, (dt, d, group) in enumerate(itertools.product(DTYPES, [64, 128], [1, 3, 4, 8]))] + [
    # head_dim 256 (the mma kernel only: its wgmma cases skip): a subset
    pytest.param(torch.bfloat16, 256, 4, 16, PREFILL_QLENS[2], id="hd256"),
    pytest.param(torch.float16, 256, 1, 64, PREFILL_QLENS[5], id="hd256"),
    pytest.param(torch.bfloat16, 256, 8, 256, PREFILL_QLENS[1], id="hd256")]


@pytest.mark.parametrize("impl", cuda_ops.PREFILL_IMPLS)
@pytest.mark.parametrize("dtype,d,group,bs,seqs", PREFILL_CASES)
def test_prefill_attention_fp8(dtype, d, group, bs, seqs, impl):
    from flashgen.ops import jit

    if impl == "wgmma" and jit.device_arch(DEV) != cuda_ops.WGMMA_ARCH:
        pytest.skip("the wgmma prefill kernel needs a Hopper GPU")
    if impl == "wgmma" and d not in cuda_ops.PREFILL_SM90_HEAD_DIMS:
        pytest.skip(f"head_dim {d} runs on the mma prefill kernel only (its impl='mma' case)")
    seed = _seed()
    g = _gen(seed)
    hkv = 1 if max(n for _, n in seqs) > 2048 else 2
    qlens, lens = [m for m, _ in seqs], [n for _, n in seqs]
    k8, v8, kd, vd, bt = _quantized_cache(lens, hkv, d, bs, dtype, g)
    q = _randn((sum(qlens), hkv * group, d), g, dtype)
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    got = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), d**-0.5, K_SCALE, V_SCALE, out=out,
                                     impl=impl)
    # the kernel reads K and V rounded to the activation dtype (fp8 * scale, one rounding): so does the oracle
    ref, base, _ = _refs(q, kd.to(dtype), vd.to(dtype), bt, lens, qlens, d**-0.5)
    _assert_close(f"prefill fp8 {impl}", got, base, ref, seed)


GROUPED_SEQS = [(n, n + 5) for n in (3, 70, 1, 130, 64, 9, 200)]  # (query rows, context): the groups cases


def check_groups_equal_one_launch(monkeypatch, q, k8, v8, bt, k_scale, v_scale, seed):
    """Prefill of GROUPED_SEQS (2 kv heads, head_dim 128, bf16 pages of 16) over an 8-bit cache in one launch,
    then with a scratch that holds two sequences (they run in groups): the two results are equal."""
    from flashgen.ops import cuda_attention

    qlens, lens = [m for m, _ in GROUPED_SEQS], [n for _, n in GROUPED_SEQS]
    cu = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    whole = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), 0.09, k_scale, v_scale)
    page = 16 * 2 * 128 * 2 * 2  # K + V bytes of one page in bf16
    monkeypatch.setattr(cuda_attention, "FP8_SCRATCH_BYTES", 2 * page * bt.shape[1])  # two sequences a group
    grouped = cuda_ops.prefill_attention(q, k8, v8, cu, ctx, bt, max(qlens), 0.09, k_scale, v_scale)
    assert torch.equal(whole, grouped), f"seed {seed}"


def test_prefill_fp8_in_groups(monkeypatch):
    """More sequences than one scratch holds: they run in groups, with the same result as in one launch."""
    seed = _seed()
    g = _gen(seed)
    qlens, lens = [m for m, _ in GROUPED_SEQS], [n for _, n in GROUPED_SEQS]
    k8, v8, _, _, bt = _quantized_cache(lens, 2, 128, 16, torch.bfloat16, g)
    q = _randn((sum(qlens), 8, 128), g, torch.bfloat16)
    check_groups_equal_one_launch(monkeypatch, q, k8, v8, bt, K_SCALE, V_SCALE, seed)


def test_engine_fp8_kv_cache_generates_like_the_torch_reference(tmp_path):
    """A tiny random model with --kv-cache-dtype fp8 on the CUDA kernels and on the torch reference (both on
    the GPU, bf16): the same calibrated scales, and the kernels agree with the reference about as often as they
    do with a bf16 cache (random weights have many near-ties: the bf16 pair is the yardstick); twice the blocks
    of a bf16 cache in the same memory."""
    from checkpoints import make_checkpoint
    from flashgen.config import EngineConfig
    from flashgen.llm import LLM

    model = tmp_path / "m"
    make_checkpoint(model, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, vocab_size=512, max_position_embeddings=1024)
    runs = {}
    for backend, kv in (("cuda", "fp8"), ("torch", "fp8"), ("cuda", "auto"), ("torch", "auto")):
        llm = LLM(config=EngineConfig(model=str(model), device="cuda", dtype="bfloat16", backend=backend,
                                      kv_cache_dtype=kv, kv_cache_gb=0.01, enforce_eager=True))
        r = llm.engine.runner
        if (backend, kv) == ("torch", "fp8"):  # calibrated by other kernels: nearly the same scales (checked
            measured = (r.model.k_scales, r.model.v_scales)  # below); the logits are compared on the same ones
            r.model.k_scales, r.model.v_scales = list(runs[("cuda", "fp8")][1]), list(runs[("cuda", "fp8")][2])
        logits = r.prompt_logits(list(range(3, 300)))
        if (backend, kv) == ("torch", "fp8"):
            r.model.k_scales, r.model.v_scales = measured
        runs[(backend, kv)] = (r.num_blocks, r.model.k_scales, r.model.v_scales, logits)
        del llm
    cuda8, torch8, cuda16 = runs[("cuda", "fp8")], runs[("torch", "fp8")], runs[("cuda", "auto")]
    assert cuda8[0] >= 2 * cuda16[0]
    assert cuda8[1] == pytest.approx(torch8[1], rel=0.02) and cuda8[2] == pytest.approx(torch8[2], rel=0.02)
    assert cuda8[1] != cuda16[1], "the FP8 run measured no scales"
    agree = (cuda8[3].argmax(-1) == torch8[3].argmax(-1)).float().mean().item()
    torch16 = runs[("torch", "auto")]
    agree16 = (cuda16[3].argmax(-1) == torch16[3].argmax(-1)).float().mean().item()
    assert agree >= agree16 - 0.05, f"top-1 agreement of the CUDA and torch runs: FP8 {agree:.2%}, bf16 {agree16:.2%}"
