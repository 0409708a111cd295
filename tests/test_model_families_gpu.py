"""Partial rotary in the CUDA RoPE kernel, ops.moe and the new families' engine runs on the GPU, against the torch
reference (the rules of tests/test_kernels_gpu.py: NaN-poisoned outputs, err(kernel) <= 2 * err(torch in the same
dtype) + eps against a float64 oracle)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from flashgen.ops import torch_ops
from test_kernels_gpu import DEV, _randn, cuda_ops
from test_kernels_gpu import _assert_close as _check

pytestmark = pytest.mark.gpu

SEED = 0


def _assert_close(name, out, same_dtype, ref, rel_eps=1e-4):
    _check(name, out, same_dtype, ref, SEED, rel_eps)


def _cos_sin(max_pos: int, r: int, theta: float = 1e4) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64, device=DEV) / r)
    f = torch.arange(max_pos, dtype=torch.float64, device=DEV)[:, None] * inv[None]
    return torch.cat((f.cos(), f.sin()), -1).float()  # (max_pos, r)


# dtype, head_dim, rotary dims, qk_norm, interleaved, FP8 cache
PARTIAL_CASES = [
    (dt, d, r, nrm, il, fp8)
    for dt, (d, r), nrm, il in itertools.product(
        [torch.bfloat16, torch.float16], [(64, 16), (64, 48), (128, 96), (128, 32), (128, 128)], [False, True],
        [False, True])
    for fp8 in [False]
] + [(torch.bfloat16, 128, 96, False, False, True)]


@pytest.mark.parametrize("dtype,d,r,qk_norm,interleaved,fp8", PARTIAL_CASES)
def test_rope_kv_append_partial_rotary(dtype, d, r, qk_norm, interleaved, fp8):
    g = torch.Generator(device=DEV).manual_seed(SEED)
    T, hq, hkv, bs = 97, 12, 4, 16
    num_blocks = (T + bs - 1) // bs + 3
    qkv = _randn((T, (hq + 2 * hkv) * d), g, dtype)
    max_pos = 4096
    positions = torch.randint(0, max_pos, (T,), generator=g, device=DEV)
    cos_sin = _cos_sin(max_pos, r)
    slots = torch.randperm(num_blocks * bs, generator=g, device=DEV)[:T]
    slots[::7] = -1
    q_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    k_norm = _randn((d,), g, dtype, 0.3) + 1 if qk_norm else None
    shape = (num_blocks, bs, hkv, d)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEV).to(cache_dtype)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEV).to(cache_dtype)
    ks, vs = (0.05, 0.04) if fp8 else (1.0, 1.0)
    q = cuda_ops.rope_kv_append(qkv, positions, cos_sin, slots, kc, vc, q_norm, k_norm, 1e-6, interleaved,
                                k_scale=ks, v_scale=vs)
    kb, vb = torch.zeros(shape, dtype=cache_dtype, device=DEV), torch.zeros(shape, dtype=cache_dtype, device=DEV)
    qb = torch_ops.rope_kv_append(qkv, positions, cos_sin, slots, kb, vb, q_norm, k_norm, 1e-6, interleaved,
                                  k_scale=ks, v_scale=vs)
    k64 = torch.zeros(shape, dtype=torch.float64, device=DEV)
    v64 = torch.zeros(shape, dtype=torch.float64, device=DEV)
    q64 = torch_ops.rope_kv_append(
        qkv.double(), positions, cos_sin.double(), slots, k64, v64,
        None if q_norm is None else q_norm.double(), None if k_norm is None else k_norm.double(), 1e-6, interleaved)
    _assert_close("q", q, qb, q64)
    assert torch.equal(q[..., r:], qb[..., r:]) or qk_norm, "q: dims past rotary_dim are not passed through"
    written = slots[slots >= 0].long()
    flat = lambda c: c.view(-1, hkv, d)  # noqa: E731
    if fp8:  # the same rounding as the reference, then the same conversion: equal up to one e4m3 step
        got, want = flat(kc)[written].float() * ks, flat(kb)[written].float() * ks
        assert (got - want).abs().max().item() <= 0.07 * want.abs().max().item()
    else:
        _assert_close("k_cache", flat(kc)[written], flat(kb)[written], flat(k64)[written])
        assert torch.equal(flat(vc)[written], flat(vb)[written]), "v_cache: not a copy of v"


def test_rope_kv_append_refuses_a_rotary_dim_the_kernel_cannot_split():
    qkv = torch.zeros(3, 6 * 128, device=DEV, dtype=torch.bfloat16)
    kc = torch.zeros(2, 16, 2, 128, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cos_sin"):
        cuda_ops.rope_kv_append(qkv, torch.zeros(3, dtype=torch.int64, device=DEV), _cos_sin(16, 40),
                                torch.zeros(3, dtype=torch.int64, device=DEV), kc, kc.clone())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_on_the_gpu_matches_float64(dtype):
    g = torch.Generator(device=DEV).manual_seed(SEED)
    T, H, E, inter, k = 300, 256, 8, 128, 2
    x = _randn((T, H), g, dtype)
    router = _randn((E, H), g, dtype, 0.1)
    gate_up = _randn((E, 2 * inter, H), g, dtype, 0.06)
    down = _randn((E, H, inter), g, dtype, 0.06)
    out = cuda_ops.moe(x, router, gate_up, down, k, True)
    ref = torch_ops.moe(x.double(), router.double(), gate_up.double(), down.double(), k, True)
    # routing of near-tied tokens may differ between dtypes: compare the tokens whose top-k agree
    _, e_lo = torch.topk(torch.softmax(x.float() @ router.float().T, -1), k)
    _, e_hi = torch.topk(torch.softmax(x.double() @ router.double().T, -1), k)
    same = (e_lo.sort(-1).values == e_hi.sort(-1).values).all(-1)
    assert same.float().mean() > 0.9
    _assert_close("moe", out[same], torch_ops.moe(x, router, gate_up, down, k, True)[same], ref[same])


def cuda_against_torch(path: str, prompts: list[list[int]]):
    """The engine on the CUDA backend (bf16), on the torch reference (float32) and on the torch backend in bf16
    (the yardstick): each prompt's logits from the CUDA run within twice the torch bf16 run's error against float32
    (+ 1e-2). Returns the three engines (CUDA, float32 reference, torch bf16)."""
    from flashgen import LLM

    fast = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1)
    ref = LLM(model=path, dtype="float32", block_size=16, kv_cache_gb=1, backend="torch")
    same = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1, backend="torch")
    for ids in prompts:
        a, b, c = fast.prompt_logits(ids).float(), ref.prompt_logits(ids).float(), same.prompt_logits(ids).float()
        err, yardstick = ((a - b).norm() / b.norm()).item(), ((c - b).norm() / b.norm()).item()
        assert err < 2 * yardstick + 1e-2, f"prompt of {len(ids)} tokens: CUDA {err:.3g}, torch bf16 {yardstick:.3g}"
    return fast, ref, same


@pytest.mark.parametrize("arch,kw", [
    ("phi3", dict(hidden_size=256, num_heads=2, num_kv_heads=1, head_dim=128, partial_rotary_factor=0.75)),
    ("qwen3_moe", dict(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True)),
    ("mixtral", dict(hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=64, num_local_experts=4,
                     num_experts_per_tok=2, intermediate_size=256)),
])
def test_engine_cuda_backend_matches_torch_backend(tmp_path, arch, kw):
    """The CUDA backend (bf16) against the torch reference on the same GPU (float32): prompt logits within twice
    the torch reference's own bf16 error (MoE routing flips experts where bf16 rounding reorders near-tied router
    scores: both bf16 runs pay for that), and greedy runs of 32 tokens over pages of 16 complete."""
    from checkpoints import make_checkpoint
    from flashgen import SamplingParams

    path = str(make_checkpoint(tmp_path, arch, **kw))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 40, 130)]
    fast, _, _ = cuda_against_torch(path, prompts)
    outs = fast.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [32] * 3
