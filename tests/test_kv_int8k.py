"""The int8k KV cache on the CPU (K in int8, V in e4m3, a float32 scale per token and kv head for each): the torch
reference's scheme (flashgen.ops.torch_ops), the engine (bytes per token, block copies for forks, prefix caching)
and the CLI. The kernels are tested against this reference in tests/test_kv_int8k_gpu.py."""
from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen.ops import torch_ops
from test_cli_support import check_engine_choice
from test_kv_fp8 import _llm, _paged, check_reads_as_dequantized

FP8 = torch.float8_e4m3fn


def _caches(nblk: int, bs: int, hkv: int, d: int):
    k = torch.zeros((nblk, bs, hkv, d), dtype=torch.int8)
    v = torch.zeros((nblk, bs, hkv, d), dtype=FP8)
    return k, v, torch.zeros((nblk, bs, hkv)), torch.zeros((nblk, bs, hkv))


def test_rope_kv_append_writes_int8_k_e4m3_v_and_their_token_scales():
    g = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 6, 4, 2, 32
    qkv = torch.randn((T, (hq + 2 * hkv) * d), generator=g) * torch.logspace(-3, 2, T)[:, None]
    qkv.view(T, -1, d)[2, hq + 1] = 0.0  # one K head of zeros: the scale floor, not a division by zero
    pos = torch.arange(T)
    cs = torch.cat([torch.ones(64, d // 2), torch.zeros(64, d // 2)], 1)  # rotation by 0: k is k
    slots = torch.tensor([3, -1, 0, 7, 6, 5])
    kc, vc, ks, vs = _caches(2, 4, hkv, d)
    torch_ops.rope_kv_append(qkv, pos, cs, slots, kc, vc, k_scale=ks, v_scale=vs)
    k = qkv.view(T, -1, d)[:, hq:hq + hkv]
    v = qkv.view(T, -1, d)[:, hq + hkv:]
    keep = slots >= 0
    s = slots[keep]
    k_amax, v_amax = k[keep].abs().amax(-1), v[keep].abs().amax(-1)
    assert torch.equal(ks.view(-1, hkv)[s], k_amax.clamp(min=1e-12) / 127)
    assert torch.equal(vs.view(-1, hkv)[s], v_amax.clamp(min=1e-12) / 448)
    k_int = kc.view(-1, hkv, d)[s]
    assert torch.equal(k_int, (k[keep] / ks.view(-1, hkv)[s][..., None]).round().to(torch.int8))
    assert (k_int.abs().amax(-1)[k_amax > 0] == 127).all(), "each head's largest |K| lands on 127"
    assert (k_int[1, 1] == 0).all()  # the zero head (token 2 -> slot 0) stays zero
    v8 = vc.view(-1, hkv, d)[s]
    assert torch.equal(v8.float(), (v[keep] / vs.view(-1, hkv)[s][..., None]).to(FP8).float())
    # read back: each token within half a step of its own scale, whatever its magnitude (1e-3 .. 1e2)
    back = torch_ops.from_cache(k_int, torch.float32, ks.view(-1, hkv)[s])
    assert ((back - k[keep]).abs() <= 0.5 * ks.view(-1, hkv)[s][..., None] * (1 + 1e-6)).all()
    untouched = torch.ones(kc.view(-1, hkv, d).shape[0], dtype=torch.bool)
    untouched[s] = False
    assert (ks.view(-1, hkv)[untouched] == 0).all(), "slots not in slot_mapping keep their scales"


@pytest.mark.parametrize("lens,hkv,group", [([1, 97], 2, 4), ([65, 16, 129], 1, 3), ([300], 4, 1)])
def test_attention_over_int8k_equals_attention_over_its_dequantized_values(lens, hkv, group):
    """Decode and prefill read the cache as float32 holding value * scale."""
    g = torch.Generator().manual_seed(sum(lens))
    d, bs = 64, 16
    k, v, bt = _paged(lens, hkv, d, bs, g)
    mag = torch.logspace(-2, 1, k.shape[0] * bs).view(-1, bs, 1, 1)  # per-token magnitudes: the scales matter
    k, v = k * mag, v * mag
    ks, vs = torch_ops.token_scales(k, 127.0), torch_ops.token_scales(v, 448.0)
    k8, v8 = torch_ops.to_cache(k, torch.int8, ks), torch_ops.to_cache(v, FP8, vs)
    kd, vd = k8.float() * ks[..., None], v8.float() * vs[..., None]
    assert (kd - k).abs().max() <= 0.5 * ks.max() * (1 + 1e-6)
    check_reads_as_dequantized(k8, v8, ks, vs, kd, vd, bt, lens, group, g)


@pytest.mark.parametrize("k_dtype,v_dtype,scales,needle", [
    (torch.int8, FP8, (0.1, 0.1), "needs a float32 tensor"),
    (torch.int8, torch.int8, "tensors", "goes with a float8_e4m3fn V cache"),
    (FP8, FP8, "tensors", "per-token scales go with the int8k cache"),
    (torch.float32, torch.float32, "tensors", "per-token scales go with the int8k cache"),
    (torch.int8, FP8, "wrong shape", "needs a float32 tensor"),
])
def test_mismatched_cache_and_scales_are_refused(k_dtype, v_dtype, scales, needle):
    nblk, bs, hkv, d = 2, 16, 2, 32
    kc, vc = torch.zeros((nblk, bs, hkv, d), dtype=k_dtype), torch.zeros((nblk, bs, hkv, d), dtype=v_dtype)
    if scales == "tensors":
        scales = (torch.ones(nblk, bs, hkv), torch.ones(nblk, bs, hkv))
    elif scales == "wrong shape":
        scales = (torch.ones(nblk, bs), torch.ones(nblk, bs))
    q = torch.randn(1, 4, d)
    ctx, bt = torch.tensor([5], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=needle):
        torch_ops.decode_attention(q, kc, vc, ctx, bt, 0.125, *scales)
    with pytest.raises(ValueError, match=needle):
        torch_ops.prefill_attention(q, kc, vc, torch.tensor([0, 1], dtype=torch.int32), ctx, bt, 1, 0.125, *scales)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("int8k") / "m", num_layers=2, head_dim=32)


def test_engine_int8k_fits_its_bytes_and_is_closer_than_fp8(model):
    plain, fp8, i8 = _llm(model, "auto"), _llm(model, "fp8"), _llm(model, "int8k")
    r, r8, ri = plain.engine.runner, fp8.engine.runner, i8.engine.runner
    spec = r.spec
    assert ri.kv_cache.dtype == torch.int8 and ri.kv_scales is not None and r8.kv_scales is None
    assert ri.model.v_caches[0].dtype == FP8 and ri.model.k_scales[0].shape == ri.kv_cache.shape[2:5]
    # head_dim 32: 32 + 32 bytes of K and V and 8 of scales per kv head and layer, against 4 * 64 in float32
    per_token = spec.num_layers * spec.num_kv_heads * (2 * 32 + 8)
    assert spec.kv_bytes_per_token(torch.int8) == per_token
    assert ri.num_blocks == int(0.01 * 2**30 // (per_token * ri.block_size))
    ids = list(range(2, 300))
    a, b8, bi = r.prompt_logits(ids), r8.prompt_logits(ids), ri.prompt_logits(ids)
    rel8, reli = ((a - b8).norm() / a.norm()).item(), ((a - bi).norm() / a.norm()).item()
    assert not torch.equal(a, bi), "the int8k cache changed nothing: it is not in use"
    assert reli < 0.05 and reli < rel8, f"logits moved {reli:.4f} of their norm (fp8: {rel8:.4f})"
    assert "int8 K and fp8 e4m3 V, per token scales" in i8._kv_note()


def test_engine_int8k_forks_copy_the_scales_with_the_blocks(model):
    """n samples fork a partly filled block: its bytes and its tokens' scales are copied, so every greedy sample
    is the same text as one run alone, and a repeated prompt (prefix cache) gives it again."""
    from flashgen import SamplingParams

    llm = _llm(model, "int8k")
    prompt = list(range(3, 140))  # 137 tokens: the last block is partly filled and forked
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    runner, scheduler = llm.engine.runner, llm.engine.scheduler
    copied = []
    plain_copy = scheduler.on_copy

    def spy(pairs):
        scales = runner.kv_scales
        assert all(not torch.equal(scales[:, :, a], scales[:, :, b]) for a, b in pairs)  # something to copy
        plain_copy(pairs)
        copied.extend(torch.equal(scales[:, :, a], scales[:, :, b]) for a, b in pairs)

    scheduler.on_copy = spy
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3))[0]
    assert copied and all(copied), f"forked blocks' scales copied: {copied}"
    assert llm.stats.cached_tokens > 0
    assert [c.token_ids for c in again.outputs] == [first.outputs[0].token_ids] * 3


def test_cli_kv_cache_dtype_int8k(model, tmp_path):
    check_engine_choice(model, tmp_path, "--kv-cache-dtype", "int8k", "int4")
