"""Phi-3 / Phi-4, Qwen3-MoE and Mixtral against HF transformers on tiny random checkpoints (float32, CPU): prefill and
decode logits, greedy tokens across page boundaries, batch invariance, tensor parallelism for MoE, and the config
values flashgen refuses."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from flashgen import LLM, SamplingParams
from flashgen.models.spec import ModelLoadError, load_spec, rope_cos_sin
from test_engine_parity import hf_greedy, prompts_of, rel_err
from test_gemma3 import CASES as GEMMA3_CASES


def _longrope(n: int, original: int) -> dict:
    # distinct factor sets, so a table built from the wrong one fails the comparison
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.5 + 0.5 * i for i in range(n)], "original_max_position_embeddings": original}


# name: (arch, checkpoint kwargs, LLM kwargs, shortest prompt HF treats as this case)
CASES = {
    "phi3-gqa2-full": ("phi3", dict(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32), {}, 1),
    "phi3-gqa3-partial": ("phi3", dict(hidden_size=192, num_heads=3, num_kv_heads=1, head_dim=64,
                                       partial_rotary_factor=0.75), {}, 1),
    # longrope, short factors: max_model_len <= original_max_position_embeddings (attention factor != 1)
    "phi3-longrope-short": ("phi3", dict(hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
                                         partial_rotary_factor=0.5, rope_scaling=_longrope(16, 512)),
                            dict(max_model_len=512), 1),
    # longrope, long factors: max_model_len > original (64); HF uses them for sequences longer than 64
    "phi3-longrope-long": ("phi3", dict(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                                        rope_scaling=_longrope(16, 64)), {}, 65),
    "qwen3moe-gqa2-norm-dense1": ("qwen3_moe", dict(num_layers=3, num_experts=8, num_experts_per_tok=2,
                                                    moe_intermediate_size=64, norm_topk_prob=True,
                                                    mlp_only_layers=[1]), {}, 1),
    "qwen3moe-gqa4-step2": ("qwen3_moe", dict(num_heads=4, num_kv_heads=1, num_experts=4, num_experts_per_tok=3,
                                              moe_intermediate_size=64, decoder_sparse_step=2), {}, 1),
    "mixtral-gqa4": ("mixtral", dict(num_heads=4, num_kv_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                     intermediate_size=128), {}, 1),
    # Gemma 3 (torch backend): prompts longer than the sliding window and a page; tests/test_gemma3.py's checkpoints
    **{f"gemma3-{name}": ("gemma3", dict(hidden_size=64, intermediate_size=128, **kw), {}, 1)
       for name, kw in GEMMA3_CASES.items()},
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, kw, llm_kw, min_len = CASES[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare against ignore_eos: HF must neither stop nor mask EOS
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=16, **llm_kw)
    return path, hf, llm, min_len


def test_prefill_logits_match_hf(case):
    _, hf, llm, min_len = case
    for ids in prompts_of(sorted({min_len, 70, 161}), seed=1):
        ours = llm.prompt_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-4, f"prompt of {len(ids)} tokens"


def test_decode_logits_match_hf(case):
    _, hf, llm, min_len = case
    seen: list[torch.Tensor] = []
    llm.engine.runner.on_logits = lambda seqs, logits: seen.append(logits[0].float().clone())
    try:
        ids = prompts_of([max(min_len, 29)], seed=2)[0]  # + 12 tokens cross a 16-token page boundary
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    finally:
        llm.engine.runner.on_logits = None
    with torch.no_grad():
        ref = hf(torch.tensor([ids + out.token_ids])).logits[0].float()
    assert len(seen) == 12
    for k, logits in enumerate(seen):
        assert rel_err(logits, ref[len(ids) - 1 + k]) <= 1e-4, f"decode step {k}"


def test_greedy_matches_hf_and_batch_invariance(case):
    """32 new tokens over prompts longer than a page (block_size 16), alone and in a batch: HF's tokens."""
    _, hf, llm, min_len = case
    prompts = prompts_of([max(min_len, n) for n in (17, 40, 97)], seed=3)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batch = llm.generate(prompts, sp)
    for ids, out in zip(prompts, batch, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 32), f"prompt of {len(ids)} tokens"
    alone = llm.generate([prompts[1]], sp)[0]
    assert alone.token_ids == batch[1].token_ids


# ---------------------------------------------------------------- pieces
def test_longrope_table_picks_factors_by_max_model_len(tmp_path):
    """Short factors up to original_max_position_embeddings, long past it; both scaled by HF's attention factor."""
    path = make_checkpoint(tmp_path, "phi3", hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, num_layers=1,
                           rope_scaling=_longrope(16, 64))
    spec = load_spec(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.rotary_emb
    for n in (64, 100):  # positions 0 .. n-1, as HF sees a sequence of n tokens
        pos = torch.arange(n)[None]
        cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)
        ours = rope_cos_sin(spec, n, "cpu")
        torch.testing.assert_close(ours, torch.cat((cos[0, :, :16], sin[0, :, :16]), -1), rtol=1e-6, atol=1e-6)


def test_partial_rotary_matches_hf_rotation():
    """torch_ops.rope_kv_append rotates the first rotary_dim dims of each head, as HF's apply_rotary_pos_emb."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from flashgen.ops import torch_ops

    g = torch.Generator().manual_seed(0)
    T, hq, hkv, d, r = 5, 4, 2, 64, 48
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g)
    pos = torch.tensor([0, 3, 17, 40, 63])
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2).float() / r))
    f = pos[:, None].float() * inv[None]
    cos_sin = torch.cat((f.cos(), f.sin()), -1)
    kc = torch.zeros(4, 16, hkv, d)
    vc = torch.zeros(4, 16, hkv, d)
    q = torch_ops.rope_kv_append(qkv, torch.arange(T), cos_sin, torch.arange(T), kc, vc)
    qr, kr, _ = qkv.view(T, hq + 2 * hkv, d).split([hq, hkv, hkv], 1)
    emb = torch.cat((f, f), -1)
    q_ref, k_ref = apply_rotary_pos_emb(qr.transpose(0, 1)[None], kr.transpose(0, 1)[None], emb.cos()[None],
                                        emb.sin()[None])
    torch.testing.assert_close(q, q_ref[0].transpose(0, 1))
    torch.testing.assert_close(kc.view(-1, hkv, d)[:T], k_ref[0].transpose(0, 1))


def test_moe_op_matches_a_dense_computation():
    """ops.moe (sorted per-expert loop) equals every token run through its top-k experts one by one."""
    from flashgen.ops import torch_ops

    g = torch.Generator().manual_seed(0)
    T, H, E, inter, k = 23, 32, 6, 16, 2
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    router = torch.randn(E, H, generator=g, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * inter, H, generator=g, dtype=torch.float64) * 0.2
    down = torch.randn(E, H, inter, generator=g, dtype=torch.float64) * 0.2
    for renorm in (False, True):
        got = torch_ops.moe(x, router, gate_up, down, k, renorm)
        probs = torch.softmax(x @ router.T, -1)
        w, idx = probs.topk(k, -1)
        w = w / w.sum(-1, keepdim=True) if renorm else w
        want = torch.zeros_like(x)
        for t in range(T):
            for j in range(k):
                e = int(idx[t, j])
                gate, up = (gate_up[e] @ x[t]).chunk(2)
                want[t] += w[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the routing weights are float32
    assert torch_ops.moe(x[:0], router, gate_up, down, k, True).shape == (0, H)


# ---------------------------------------------------------------- tensor parallel
def test_moe_tp2_greedy_matches_tp1(tmp_path):
    path = str(make_checkpoint(tmp_path, "qwen3_moe", num_heads=4, num_kv_heads=2, vocab_size=511, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                               mlp_only_layers=[0]))
    prompts = prompts_of((1, 17, 97), seed=4)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    one = LLM(model=path, device="cpu", dtype="float32")
    ref = one.generate(prompts, sp)
    tp = LLM(model=path, device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        two = tp.generate(prompts, sp)
        assert (tp.prompt_logits(prompts[2]) - one.prompt_logits(prompts[2])).abs().max() < 1e-4
    finally:
        tp.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in ref]


# ---------------------------------------------------------------- refusals
def _cfg(tmp_path, arch: str, **kw) -> dict:
    path = make_checkpoint(tmp_path / arch, arch, num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                           head_dim=32, **kw)
    return json.loads((path / "config.json").read_text())


def _refused(tmp_path, cfg: dict) -> str:
    d = tmp_path / "edited"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_spec(d)
    return str(e.value)


@pytest.mark.parametrize("change,named", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"partial_rotary_factor": 1.5, "rope_parameters": None}, "partial_rotary_factor=1.5"),
    ({"partial_rotary_factor": 0.01, "rope_parameters": None}, "partial_rotary_factor=0.01"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 16}},
     "rope_parameters.short_factor is a list of 3"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [-1.0] * 16}},
     "rope_parameters.long_factor"),
])
def test_phi3_refused_configs_name_the_field(tmp_path, change, named):
    cfg = {**_cfg(tmp_path, "phi3"), **change}
    assert named in _refused(tmp_path, cfg)


@pytest.mark.parametrize("change,named", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"shared_expert_intermediate_size": 128}, "shared_expert_intermediate_size=128"),
    ({"mlp_only_layers": [3]}, "mlp_only_layers=[3]"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob='yes'"),
    ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
    ({"moe_intermediate_size": None}, "'moe_intermediate_size' is missing"),
])
def test_moe_refused_configs_name_the_field(tmp_path, change, named):
    cfg = {**_cfg(tmp_path, "qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32), **change}
    assert named in _refused(tmp_path, cfg)


def test_mismatched_fused_weights_are_refused_naming_the_tensor(tmp_path):
    path = make_checkpoint(tmp_path / "phi3", "phi3", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                           head_dim=32)
    sd = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.qkv_proj.weight"
    sd[name] = sd[name][:-32].contiguous()  # v's rows cut off: the shape of a fused weight of another config
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"tensor '{name}' has shape \\[96, 64\\], expected \\[128, 64\\]"):
        LLM(model=str(path), device="cpu", dtype="float32")


def test_moe_tp_size_must_divide_expert_width(tmp_path):
    from flashgen.models.tensor_parallel import TPInfo

    path = make_checkpoint(tmp_path / "moe", "qwen3_moe", num_layers=1, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=30)
    with pytest.raises(ValueError, match="experts' intermediate size 30"):
        TPInfo(0, 4).check(load_spec(path))
    shutil.rmtree(path)


def test_info_counts_active_parameters(tmp_path):
    from flashgen.info import describe_model, format_info

    path = make_checkpoint(tmp_path / "moe", "mixtral", num_layers=2, num_local_experts=4, num_experts_per_tok=2,
                           intermediate_size=64)
    d = describe_model(str(path))
    per_expert = 3 * 128 * 64
    assert d["active_parameters"] == d["parameters"] - 2 * (4 - 2) * per_expert
    assert d["num_experts"] == 4 and d["experts_per_token"] == 2
    assert "active parameters per token" in format_info(d)
