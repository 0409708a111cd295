"""FP8 weights on the CPU: FP8 checkpoints as the Hub publishes them (compressed-tensors per tensor and per channel,
fbgemm_fp8), --quantization fp8, the reference op (flashgen.ops.torch_ops.linear_fp8: activations quantized per
token, an e4m3 product scaled by both scales), the engine, tensor parallelism, `flashgen info` and the refusals.
The CUDA op is tested against this reference in tests/test_fp8_weights_gpu.py."""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from checkpoints import make_checkpoint
from flashgen.config import EngineConfig
from flashgen.llm import LLM
from flashgen.models.errors import ModelLoadError
from flashgen.models.loader import fuse_layer_weights, load_weights
from flashgen.models.spec import load_spec
from flashgen.ops import torch_ops
from test_cli_support import check_engine_choice, cli

FP8 = torch.float8_e4m3fn
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
CT_GROUP = {"targets": ["Linear"], "output_activations": None,
            "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False,
                        "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
            "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True,
                                  "dynamic": True, "group_size": None, "block_structure": None}}


def _ct_config(strategy: str = "channel", static: bool = False) -> dict:
    group = json.loads(json.dumps(CT_GROUP))
    group["weights"]["strategy"] = strategy
    if static:
        group["input_activations"].update(strategy="tensor", dynamic=False)
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None, "config_groups": {"group_0": group}}


FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}


def quantize_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scale) as llm-compressor writes them: scale = amax / 448, per tensor ([1]) or per row ([N, 1])."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax / 448.0
    q = (w / (scale if per_channel else scale[0])).clamp(-448, 448).to(FP8)
    return q, scale


def write_fp8_checkpoint(src: Path, dst: Path, qcfg: dict, per_channel: bool, static: bool = False) -> Path:
    """`src` (a float checkpoint) with every projection stored in FP8 + weight_scale (+ input_scale when `static`),
    lm_head left in float, config.json's quantization_config = `qcfg`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    out = {}
    for name, t in sd.items():
        if name.endswith(tuple(f"{p}.weight" for p in PROJ)):
            out[name], out[name + "_scale"] = quantize_weight(t, per_channel)
            if static:
                out[name[:-len("weight")] + "input_scale"] = torch.tensor([0.05])
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_checkpoint(fp8_dir: Path, dst: Path) -> Path:
    """The FP8 checkpoint's own values (fp8 x scale) as a float32 checkpoint without quantization_config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(fp8_dir, dst)
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    out = {}
    for name, t in sd.items():
        if name.endswith("_scale"):
            continue
        scale = sd.get(name + "_scale")
        out[name] = (t.double() * scale.double().reshape(-1, 1)).float() if scale is not None else t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("fp8w") / "base", "qwen2", hidden_size=128, num_heads=4,
                           num_kv_heads=2, head_dim=32)  # qwen2: the q/k/v bias goes through linear_fp8 too


@pytest.fixture(scope="module")
def ckpts(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8w-ckpts")
    return {
        "ct_tensor": write_fp8_checkpoint(base, root / "ct_tensor", _ct_config("tensor", static=True), False, True),
        "ct_channel": write_fp8_checkpoint(base, root / "ct_channel", _ct_config("channel"), True),
        "fbgemm": write_fp8_checkpoint(base, root / "fbgemm", FBGEMM, True),
    }


def _llm(model, **kw) -> LLM:
    return LLM(config=EngineConfig(model=str(model), device="cpu", kv_cache_gb=0.01, **kw))


# -------------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (7, 64, 33), (97, 200, 72), (5, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fp8_reference_equals_float64_on_the_same_quantized_operands(M, K, N, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = (torch.randn((M, K), generator=g) * torch.logspace(-2, 1, M)[:, None]).to(dtype)
    x[0, 0] = 0 if M > 1 else x[0, 0]
    wq, ws = torch_ops.quantize_fp8_rows(torch.randn((N, K), generator=g) * 0.05)
    bias = torch.randn(N, generator=g).to(dtype)
    got = torch_ops.linear_fp8(x, wq, ws, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    # the operands the op must use: x quantized per row exactly as specified, in float64 from there on
    xs = x.double().abs().amax(1).clamp(min=1e-12) / 448
    xq = (x.float() / xs.float()[:, None]).clamp(-448, 448).to(FP8)
    want = (xq.double() * xs[:, None]) @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol * want.abs().max().item())
    # a batch of rows (..., K) and no bias
    x3 = x.reshape(1, M, K)
    torch.testing.assert_close(torch_ops.linear_fp8(x3, wq, ws), torch_ops.linear_fp8(x, wq, ws).reshape(1, M, N))


def test_quantize_fp8_rows_scales_each_row_to_448_and_survives_zero_rows():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e4, 3.0, -1e-3]])
    q, s = torch_ops.quantize_fp8_rows(x)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert s.tolist() == pytest.approx([2 / 448, 1e-12 / 448, 1e4 / 448])
    assert q.float().abs().amax(1).tolist() == [448.0, 0.0, 448.0]
    assert torch.equal(q[1].float(), torch.zeros(3))


# -------------------------------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("fmt", ["ct_tensor", "ct_channel", "fbgemm"])
def test_loader_reads_fp8_checkpoints_and_fuses_their_scales(ckpts, base, fmt):
    spec = load_spec(ckpts[fmt])
    assert spec.quant is not None and spec.quant.method == ("fbgemm_fp8" if fmt == "fbgemm" else "compressed-tensors")
    assert spec.quant.static_input_scales == (fmt == "ct_tensor")
    w = load_weights(ckpts[fmt], spec, torch.float32, "cpu")
    ref = load_weights(base, load_spec(base), torch.float32, "cpu")
    assert w["lm_head.weight"].dtype == torch.float32 and not any(k.endswith("input_scale") for k in w)
    L = fuse_layer_weights(w, spec, 1)
    R = fuse_layer_weights(ref, load_spec(base), 1)
    parts = {"qkv": [spec.q_size, spec.kv_size, spec.kv_size], "o": [spec.hidden_size],
             "gate_up": [spec.intermediate_size] * 2, "down": [spec.hidden_size]}
    for name, sizes in parts.items():
        q, s = L[name], L[name + "_scale"]
        assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (q.shape[0],)
        # the scale of every row is its part's: amax of the part (per tensor) or of the row (per channel) / 448
        for part, part_s, ref_part in zip(q.split(sizes), s.split(sizes), R[name].split(sizes), strict=True):
            amax = ref_part.abs().amax(1) if fmt != "ct_tensor" else ref_part.abs().amax().expand(len(part_s))
            torch.testing.assert_close(part_s, amax / 448, rtol=1e-6, atol=0)
            assert (part.float() * part_s[:, None] - ref_part).abs().max() <= ref_part.abs().max() / 16
        if fmt == "ct_tensor" and name == "qkv":
            assert len(set(s.split(sizes)[0].tolist())) == 1 and len(set(s.tolist())) == 3  # q, k, v: a scale each
    assert L["qkv_bias"] is not None and L["qkv_bias"].dtype == torch.float32


def test_fp8_checkpoint_with_one_part_left_in_float_is_dequantized_into_the_fused_weight(ckpts, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = shutil.copytree(ckpts["ct_channel"], tmp_path / "mixed")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    k = "model.layers.0.self_attn.k_proj.weight"
    sd[k] = sd[k].float() * sd.pop(k + "_scale")
    save_file(sd, str(d / "model.safetensors"))
    spec = load_spec(d)
    L = fuse_layer_weights(load_weights(d, spec, torch.float32, "cpu"), spec, 0)
    assert L["qkv"].dtype == torch.float32 and L["qkv_scale"] is None
    assert L["o"].dtype == FP8 and L["o_scale"] is not None
    assert len(_llm(d).generate([[5, 6, 7]], _greedy(3))[0].outputs[0].token_ids) == 3


# -------------------------------------------------------------------------------------------------- the engine
def _greedy(n: int):
    from flashgen import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


PROMPT = list(range(3, 200))


def _fake_quant_ops(lm_head: torch.Tensor) -> types.SimpleNamespace:
    """torch_ops whose linear quantizes each activation row as linear_fp8 does, then multiplies in float64 with
    the (dequantized) float weight: the FP8 engine's arithmetic, computed another way."""
    def linear(x, w, b=None):
        if w is lm_head:
            return torch_ops.linear(x, w, b)
        xq, xs = torch_ops.quantize_fp8_rows(x.reshape(-1, x.shape[-1]))
        y = (xq.double() * xs.double()[:, None]) @ w.double().t()
        return (y + b.double() if b is not None else y).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    ops = {k: getattr(torch_ops, k) for k in dir(torch_ops) if not k.startswith("_")}
    return types.SimpleNamespace(**{**ops, "linear": linear})


@pytest.mark.parametrize("fmt", ["ct_tensor", "fbgemm"])
def test_engine_fp8_logits_equal_the_dequantized_model_with_quantized_activations(ckpts, tmp_path, fmt):
    fp8 = _llm(ckpts[fmt])
    m = fp8.engine.runner.model
    assert m.weights_fp8 == "checkpoint" and all(L["qkv"].dtype == FP8 for L in m.layers)
    assert "with FP8 weights" in fp8.describe()
    deq = _llm(dequantized_checkpoint(ckpts[fmt], tmp_path / "deq"))
    a = fp8.prompt_logits(PROMPT)
    plain = deq.prompt_logits(PROMPT)
    ref_model = deq.engine.runner.model
    ref_model.ops = _fake_quant_ops(ref_model.lm_head)
    ref = deq.prompt_logits(PROMPT)
    # same weights, same per-token activation quantization: float32 vs float64 accumulation only, about 1e-6 of
    # a position's logits; except where an activation sits on an e4m3 rounding boundary and the two round it
    # differently (one step of 2^-4, carried on through the layers): a few positions in a hundred
    per_pos = (a - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_pos.median() < 1e-5, f"FP8 engine vs float64 reference: median {per_pos.median():.2e}"
    assert (per_pos < 1e-4).float().mean() > 0.9, f"positions off by more than 1e-4: {(per_pos >= 1e-4).sum()}"
    rel = ((a - ref).norm() / ref.norm()).item()
    # against the dequantized weights with float activations: the activation quantization's error. Each
    # quantized activation is off by e4m3's rounding, uniform within +-2^-4 of its row's scale at most (RMS about
    # 3.6% of an element), which random weights pass on undiminished; 4 GEMM inputs per layer, 2 layers: about
    # sqrt(8) x 3.6% = 10% of the logits' norm (measured 8%)
    rel_plain = ((a - plain).norm() / plain.norm()).item()
    assert 5 * rel < rel_plain < 0.15, (rel, rel_plain)
    agree = (a.argmax(-1) == plain.argmax(-1)).float().mean().item()
    assert agree > 0.8, f"top-1 agreement with float activations {agree:.2%}"  # measured 88% and 90%


def test_quantization_fp8_quantizes_a_float_checkpoint_per_channel_at_load(base, ckpts):
    plain, q = _llm(base), _llm(base, quantization="fp8")
    m = q.engine.runner.model
    assert m.weights_fp8 == "quantized" and q.engine.runner.model.lm_head.dtype == torch.float32
    assert "quantized at load" in q.describe() and "FP8" not in plain.describe()
    # the same per-row scheme as the per-channel checkpoint: identical weights, identical logits
    a, b = q.prompt_logits(PROMPT), _llm(ckpts["ct_channel"]).prompt_logits(PROMPT)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = plain.prompt_logits(PROMPT)
    # Each FP8 operand carries e4m3's rounding (RMS about 3.6% of an element), which random weights pass on
    # undiminished: weights and activations of 4 GEMMs per layer, 2 layers, about sqrt(16) x 3.6% = 14% of the
    # logits' norm (measured 12%). Random weights leave a third of the positions with a top-1 margin below that
    # noise (real weights are measured in BENCHMARKS.md: bench accuracy), so the bound on top-1 agreement is low
    # (measured 83%), and the telling checks are the others: every position whose float32 margin is 3x the
    # position's RMS logit error keeps its token, and the float32 token is always among FP8's top 3.
    rel = ((a - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, f"logits moved by {rel:.3f} of their norm"
    agree = a.argmax(-1) == ref.argmax(-1)
    assert agree.float().mean() > 0.75, f"teacher-forced top-1 agreement with float32 {agree.float().mean():.2%}"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 3 * (a - ref).pow(2).mean(-1).sqrt()
    assert clear.sum() > 20 and agree[clear].all()
    assert (ref.argmax(-1)[:, None] == a.topk(3, dim=-1).indices).any(-1).all()
    assert q.generate([PROMPT[:20]], _greedy(8))[0].outputs[0].token_ids  # and it generates


def test_quantization_fp8_on_an_fp8_checkpoint_keeps_its_weights(ckpts):
    a = _llm(ckpts["ct_tensor"], quantization="fp8")
    assert a.engine.runner.model.weights_fp8 == "checkpoint"
    torch.testing.assert_close(a.prompt_logits(PROMPT[:30]), _llm(ckpts["ct_tensor"]).prompt_logits(PROMPT[:30]),
                               rtol=0, atol=0)


def test_tensor_parallel_shards_fp8_weights_and_scales(ckpts):
    one = _llm(ckpts["ct_tensor"])
    two = LLM(model=str(ckpts["ct_tensor"]), device="cpu", dtype="float32", tensor_parallel_size=2, kv_cache_gb=0.01)
    try:
        a, b = one.prompt_logits(PROMPT[:64]), two.prompt_logits(PROMPT[:64])
    finally:
        two.close()
    # o and down quantize each rank's slice of the activations with that slice's own per-token scale, so the
    # roundings differ from one GPU's: the size of the activation quantization's own error (measured 8%), where
    # wrongly sharded scales would be off by the logits' whole size. test_shard_layer_splits_fp8_scales_with_rows
    # checks the slices exactly.
    assert ((a - b).norm() / a.norm()).item() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.75


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_shard_layer_splits_fp8_scales_with_rows(ckpts, kv_heads):
    """Dequantizing a rank's slice gives that rank's slice of the dequantized weight: column-parallel scales are
    split with their rows, row-parallel ones kept whole."""
    from dataclasses import replace

    from flashgen.models.tensor_parallel import TPInfo, shard_layer

    spec = load_spec(ckpts["ct_tensor"])
    L = fuse_layer_weights(load_weights(ckpts["ct_tensor"], spec, torch.float32, "cpu"), spec, 0)
    if kv_heads == 1:  # one kv head for two ranks: replicated
        spec = replace(spec, num_kv_heads=1)
        L["qkv"], L["qkv_scale"] = L["qkv"][:spec.q_size + 2 * spec.kv_size], L["qkv_scale"][:spec.q_size + 64]
        L["qkv_bias"] = L["qkv_bias"][:spec.q_size + 64]

    def deq(layer, name):
        return layer[name].float() * layer[name + "_scale"][:, None]

    full = {name: deq(L, name) for name in ("qkv", "o", "gate_up", "down")}
    full_layer = {**L, **full, "qkv_bias": L["qkv_bias"]}
    for rank in range(2):
        tp = TPInfo(rank, 2)
        got, want = shard_layer(L, spec, tp), shard_layer(full_layer, spec, tp)
        for name in full:
            assert got[name].dtype == FP8 and got[name + "_scale"].shape == (got[name].shape[0],)
            assert torch.equal(deq(got, name), want[name]), (rank, name)


def test_gpu_without_fp8_is_refused_at_start_up(base, ckpts, monkeypatch):
    from flashgen.engine.model_runner import check_fp8_weights

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    gpu = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"quantization='fp8' needs a GPU with FP8.*A100 is 8.0: use "
                                           r"quantization='auto'"):
        check_fp8_weights(EngineConfig(model=str(base), quantization="fp8"), load_spec(base), gpu)
    with pytest.raises(RuntimeError, match="quant_method='fbgemm_fp8'.*unquantized checkpoint"):
        check_fp8_weights(EngineConfig(model="m"), load_spec(ckpts["fbgemm"]), gpu)
    assert check_fp8_weights(EngineConfig(model="m"), load_spec(base), gpu) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert check_fp8_weights(EngineConfig(model="m"), load_spec(ckpts["fbgemm"]), gpu) is True


# -------------------------------------------------------------------------------------------------- refusals
def _with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _weights(q):
    return q["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("edit,needle", [
    (lambda q: q.update(quant_method="gptq"), "quantization_config.quant_method='gptq' is not supported"),
    (lambda q: q.update(quant_method="fp8", weight_block_size=[128, 128]), "quant_method='fp8'"),
    (lambda q: _weights(q).update(strategy="block", block_structure=[128, 128]),
     "config_groups.group_0.weights.strategy='block'"),
    (lambda q: _weights(q).update(num_bits=4), "config_groups.group_0.weights.num_bits=4"),
    (lambda q: _weights(q).update(type="int"), "config_groups.group_0.weights.type='int'"),
    (lambda q: _weights(q).update(symmetric=False), "config_groups.group_0.weights.symmetric=False"),
    (lambda q: _weights(q).update(strategy="group", group_size=128), "weights.strategy='group'"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="group"),
     "input_activations.strategy='group'"),
    (lambda q: q.update(format="pack-quantized"), "quantization_config.format='pack-quantized'"),
])
def test_unsupported_quantization_configs_are_refused_naming_the_field(ckpts, tmp_path, edit, needle):
    d = _with_config(ckpts["ct_channel"], tmp_path / "bad", edit)
    with pytest.raises(ModelLoadError, match="config.json: .*" + needle.replace("[", r"\[").replace("(", r"\(")) as e:
        load_spec(d)
    assert "use the model's unquantized" in str(e.value)
    r = cli(["info", str(d)], cwd=tmp_path)  # refused before any weight is read, by info too
    assert r.exit_code == 2 and "quantization_config" in r.stderr


def test_missing_weight_scale_is_refused(ckpts, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = shutil.copytree(ckpts["ct_channel"], tmp_path / "noscale")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight_scale"}
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="'model.layers.1.mlp.up_proj.weight' is FP8 .F8_E4M3. but its scale "
                                             "'model.layers.1.mlp.up_proj.weight_scale' is missing"):
        _llm(d)


def test_bad_weight_scales_and_fp8_tensors_without_a_config_are_refused(ckpts, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.o_proj.weight_scale"
    for i, (value, needle) in enumerate([
            (torch.zeros(128, 1), "must hold positive finite scales"),
            (torch.ones(128, 4), r"has shape \[128, 4\]; flashgen reads one scale per tensor")]):
        d = shutil.copytree(ckpts["ct_channel"], tmp_path / f"bad{i}")
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        sd[name] = value
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(ModelLoadError, match=needle):
            _llm(d)
    # FP8 tensors without a quantization_config: the message for quantized checkpoints, as before
    d = _with_config(ckpts["ct_channel"], tmp_path / "noconfig", lambda q: None)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has dtype F8_E4M3; flashgen loads float32, float16 and bfloat16 "
                                             "weights .quantized checkpoints are not supported."):
        _llm(d)


def test_engine_config_refuses_an_unknown_quantization():
    with pytest.raises(ValueError, match="quantization='int4' is invalid; use auto .* or fp8"):
        EngineConfig(model="m", quantization="int4")


# -------------------------------------------------------------------------------------------------- info and CLI
def test_info_sizes_fp8_weights_at_one_byte_per_parameter(base, ckpts):
    from flashgen.info import describe_model, format_info

    spec = load_spec(base)
    h, inter, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    proj_rows = spec.q_size + 2 * spec.kv_size + h + 2 * inter + h  # output rows of the seven projections
    proj = (spec.q_size + 2 * spec.kv_size) * h + h * spec.q_size + 3 * inter * h
    plain = describe_model(str(base))
    assert plain["weights"] == "float32"
    for d in (describe_model(str(ckpts["ct_channel"])), describe_model(str(base), quantization="fp8")):
        assert d["weights"] == "fp8"
        assert d["weight_bytes"] == plain["weight_bytes"] - L * (proj * 3 - 4 * proj_rows)
        assert "FP8 e4m3 linear layers" in format_info(d)


def test_cli_quantization(base, tmp_path):
    bf16 = make_checkpoint(tmp_path / "bf16", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                           head_dim=32, intermediate_size=128, dtype="bfloat16")
    check_engine_choice(bf16, tmp_path, "--quantization", "fp8", "int8")
    info = cli(["info", str(bf16), "--quantization", "fp8"], tmp_path)
    assert info.exit_code == 0 and "FP8 e4m3" in info.stdout


def test_accuracy_bench_configurations_take_fp8_weights(base):
    """bench accuracy's dtype[+fp8kv][+fp8w] configurations build the engines they name; anything else is refused."""
    from flashgen.bench import accuracy

    both = accuracy._engine(str(base), "cpu", "float32+fp8kv+fp8w").engine.runner
    assert both.model.weights_fp8 == "quantized" and both.kv_dtype == torch.float8_e4m3fn
    weights = accuracy._engine(str(base), "cpu", "float32+fp8w").engine.runner
    assert weights.model.weights_fp8 == "quantized" and weights.kv_dtype == torch.float32
    with pytest.raises(ValueError, match="int4"):
        accuracy._engine(str(base), "cpu", "float32+int4")
