"""The FP8 KV cache on the CPU: the torch reference's scheme (flashgen.ops.torch_ops: stored = x / scale rounded
to e4m3 and saturated; read = fp8 * scale), the scales (the checkpoint's, else calibrated at start-up), the engine
and the CLI. The kernels are tested against this reference in tests/test_kv_fp8_gpu.py."""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen.config import EngineConfig
from flashgen.llm import LLM
from flashgen.models.errors import ModelLoadError
from flashgen.ops import torch_ops
from test_cli_support import check_engine_choice

FP8 = torch.float8_e4m3fn


def test_to_cache_rounds_to_nearest_and_saturates():
    x = torch.tensor([0.0, 1.0, -3.3, 17.0, 448.0 * 0.5 * 3, -1e6, 1e-4])
    got = torch_ops.to_cache(x, FP8, 0.5)
    assert got.dtype == FP8
    assert torch.equal(got.float(), (x / 0.5).clamp(-448, 448).to(FP8).float())
    assert got.float()[3].item() == 32.0 and got.float()[4].item() == 448.0 and got.float()[5].item() == -448.0
    back = torch_ops.from_cache(got, torch.float32, 0.5)
    assert back[1].item() == 1.0 and back[4].item() == 224.0
    assert torch_ops.to_cache(x, torch.bfloat16, 0.5).dtype == torch.bfloat16  # other caches: scales ignored
    assert torch.equal(torch_ops.from_cache(x.bfloat16(), torch.float32, 7.0), x.bfloat16().float())


def _paged(lens, hkv, d, bs, gen):
    nblk = [(n + bs - 1) // bs for n in lens]
    total = sum(nblk) + 2
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    bt = torch.zeros((len(lens), max(nblk)), dtype=torch.int32)
    pos = 0
    for b, k in enumerate(nblk):
        bt[b, :k] = perm[pos:pos + k]
        pos += k
    k = torch.randn((total, bs, hkv, d), generator=gen) * 3
    v = torch.randn((total, bs, hkv, d), generator=gen)
    return k, v, bt


@pytest.mark.parametrize("lens,hkv,group", [([1, 97], 2, 4), ([65, 16, 129], 1, 3), ([300], 4, 1)])
def test_attention_over_fp8_equals_attention_over_its_dequantized_values(lens, hkv, group):
    """Decode and prefill read an FP8 cache exactly as a float32 cache holding fp8 * scale."""
    g = torch.Generator().manual_seed(sum(lens))
    d, bs, ks, vs = 64, 16, 0.021, 0.0047
    k, v, bt = _paged(lens, hkv, d, bs, g)
    k8, v8 = torch_ops.to_cache(k, FP8, ks), torch_ops.to_cache(v, FP8, vs)
    kd, vd = k8.float() * ks, v8.float() * vs
    assert (k8.float().abs() == 448).any(), "saturation exercised"
    check_reads_as_dequantized(k8, v8, ks, vs, kd, vd, bt, lens, group, g)


def check_reads_as_dequantized(k8, v8, ks, vs, kd, vd, bt, lens, group, g) -> None:
    """Decode and prefill (a third of each context as new tokens) over the quantized cache (k8, v8 with scales ks,
    vs: floats or per-token tensors) equal the same attention over a float32 cache holding kd, vd."""
    hkv, d = k8.shape[2], k8.shape[3]
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn((len(lens), hkv * group, d), generator=g)
    torch.testing.assert_close(torch_ops.decode_attention(q, k8, v8, ctx, bt, 0.125, ks, vs),
                               torch_ops.decode_attention(q, kd, vd, ctx, bt, 0.125), rtol=0, atol=1e-6)
    qlens = [max(1, n // 3) for n in lens]
    qp = torch.randn((sum(qlens), hkv * group, d), generator=g)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    torch.testing.assert_close(torch_ops.prefill_attention(qp, k8, v8, cu, ctx, bt, max(qlens), 0.125, ks, vs),
                               torch_ops.prefill_attention(qp, kd, vd, cu, ctx, bt, max(qlens), 0.125),
                               rtol=0, atol=1e-6)


def test_rope_kv_append_writes_x_over_scale():
    g = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 5, 4, 2, 32
    qkv = torch.randn((T, (hq + 2 * hkv) * d), generator=g) * 4
    pos = torch.arange(T)
    cs = torch.cat([torch.ones(64, d // 2), torch.zeros(64, d // 2)], 1)  # rotation by 0: k is k
    slots = torch.tensor([3, -1, 0, 7, 6])
    k8, v8 = torch.zeros((2, 4, hkv, d), dtype=FP8), torch.zeros((2, 4, hkv, d), dtype=FP8)
    torch_ops.rope_kv_append(qkv, pos, cs, slots, k8, v8, k_scale=0.03, v_scale=0.01)
    k = qkv.view(T, -1, d)[:, hq:hq + hkv]
    v = qkv.view(T, -1, d)[:, hq + hkv:]
    keep = slots >= 0
    assert torch.equal(k8.view(-1, hkv, d)[slots[keep]].float(), (k[keep] / 0.03).clamp(-448, 448).to(FP8).float())
    assert torch.equal(v8.view(-1, hkv, d)[slots[keep]].float(), (v[keep] / 0.01).clamp(-448, 448).to(FP8).float())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "m", num_layers=2, head_dim=32)


def _llm(model, kv: str, **kw) -> LLM:
    return LLM(config=EngineConfig(model=str(model), device="cpu", kv_cache_dtype=kv, kv_cache_gb=0.01, **kw))


def test_engine_fp8_calibrates_scales_fits_more_tokens_and_stays_close(model):
    plain, fp8 = _llm(model, "auto"), _llm(model, "fp8")
    r8, r = fp8.engine.runner, plain.engine.runner
    assert r8.kv_cache.dtype == FP8 and r.kv_cache.dtype == torch.float32
    assert r8.num_blocks >= 4 * r.num_blocks - 1  # float32 -> 1 byte: four times the tokens
    assert r8.model.kv_scales_from == "calibrated"
    scales = r8.model.k_scales + r8.model.v_scales
    assert len(scales) == 4 and all(0 < s < 1 for s in scales) and len(set(scales)) == 4
    ids = list(range(2, 300))
    a, b = r.prompt_logits(ids), r8.prompt_logits(ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # random weights: many positions have near-ties; real weights are measured in BENCHMARKS.md (bench accuracy)
    assert agree > 0.8, f"teacher-forced top-1 agreement with the float32 cache {agree:.2%}"
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, f"logits moved by {rel:.3f} of their norm"
    assert not torch.equal(a, b), "the FP8 cache changed nothing: it is not in use"


def test_engine_fp8_with_prefix_cache_and_n_samples(model):
    """Forked samples copy FP8 blocks (byte copies) and share cached prefixes: every sample of a greedy line is
    the same text, and a repeated prompt gives the same text as its first run."""
    from flashgen import SamplingParams

    llm = _llm(model, "fp8")
    prompt = list(range(3, 140))
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3))[0]
    assert llm.stats.cached_tokens > 0
    assert [c.token_ids for c in again.outputs] == [first.outputs[0].token_ids] * 3


def _add_tensors(model_dir, tensors: dict[str, torch.Tensor], name: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(model_dir / name))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            data = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}  # noqa: SIM118
    data["weight_map"].update({k: name for k in tensors})
    index.write_text(json.dumps(data))


def test_checkpoint_kv_scales_are_used(tmp_path):
    d = make_checkpoint(tmp_path / "m", num_layers=2, head_dim=32)
    _add_tensors(d, {f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(0.01 * (i + 1) + (w == "v") * 0.5)
                     for i in range(2) for w in "kv"}, "kv_scales.safetensors")
    m = _llm(d, "fp8").engine.runner.model
    assert m.kv_scales_from == "checkpoint"
    assert m.k_scales == pytest.approx([0.01, 0.02]) and m.v_scales == pytest.approx([0.51, 0.52])
    assert _llm(d, "auto").engine.runner.model.kv_scales_from == "default"  # no FP8: the scales are not read


@pytest.mark.parametrize("tensors,needle", [
    ({"model.layers.0.self_attn.k_scale": torch.tensor(0.1), "model.layers.0.self_attn.v_scale": torch.tensor(0.1)},
     "model.layers.1.self_attn.k_scale' is missing"),
    ({f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(0.0) for i in range(2) for w in "kv"},
     "must be one positive finite number"),
])
def test_bad_checkpoint_kv_scales_are_refused(tmp_path, tensors, needle):
    d = make_checkpoint(tmp_path / "m", num_layers=2, head_dim=32)
    _add_tensors(d, tensors, "kv_scales.safetensors")
    with pytest.raises(ModelLoadError, match=needle):
        _llm(d, "fp8")


def test_cli_kv_cache_dtype(model, tmp_path):
    check_engine_choice(model, tmp_path, "--kv-cache-dtype", "fp8", "int4")
