"""Gemma 3 text models against HF transformers on tiny random checkpoints (float32, CPU): prefill and decode logits,
greedy tokens over prompts longer than the sliding window and across page boundaries, batch invariance; the torch
ops' sliding-window masking; the CUDA ops' window checks; the config values flashgen refuses; the backend it
picks (the CUDA kernels on GPU: tests/test_window_gpu.py)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from checkpoints import make_checkpoint
from flashgen import LLM
from flashgen.config import EngineConfig
from flashgen.engine import model_runner
from flashgen.engine.model_runner import pick_backend
from flashgen.models.spec import ModelLoadError, load_spec
from flashgen.ops import cuda_ops, torch_ops
from flashgen.ops.backend import SharedPrefix

SLIDING, FULL = "sliding_attention", "full_attention"

# name: checkpoint kwargs (block_size 16 for all: windows of 8 and 16 tokens cross page boundaries)
CASES = {
    # GQA 2, window 8, a global layer between two local ones, final logit soft-capping, tied embeddings
    "gqa2-window8-softcap": dict(num_layers=3, num_heads=4, num_kv_heads=2, sliding_window=8,
                                 layer_types=[SLIDING, FULL, SLIDING], rope_local_base_freq=100.0,
                                 query_pre_attn_scalar=48, final_logit_softcapping=5.0, tie_word_embeddings=True),
    # GQA 4, window 16, every second layer global (sliding_window_pattern), linear rope scaling on global layers
    "gqa4-window16-pattern2-linear": dict(num_layers=4, num_heads=4, num_kv_heads=1, sliding_window=16,
                                          sliding_window_pattern=2, rope_scaling={"rope_type": "linear",
                                                                                  "factor": 2.0},
                                          tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), "gemma3", hidden_size=64, intermediate_size=128,
                           **CASES[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare against ignore_eos: HF must neither stop nor mask EOS
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=16)
    return path, hf, llm


def test_spec_reads_layer_types_and_window(case):
    path, hf, llm = case
    spec = load_spec(path)
    types = hf.config.layer_types
    assert spec.local_layers == tuple(i for i, t in enumerate(types) if t == SLIDING)
    assert 0 < len(spec.local_layers) < spec.num_layers
    assert spec.local_window == hf.config.sliding_window and spec.sliding_window is None
    assert llm.engine.runner.backend == "torch"
    # the global layers see every token: max_model_len is not capped to the window
    assert llm.engine.runner.max_model_len == spec.max_position_embeddings


# prefill and decode logits and greedy tokens against HF, with batch invariance: tests/test_model_families.py
# runs its parity tests on these two checkpoints too (the "gemma3-" cases there)


# ---------------------------------------------------------------- ops
def _masked_softmax_attention(q, k, v, scale, positions, window):
    """Direct computation: query i (at positions[i]) over keys 0..len-1, keys j with positions[i] - window < j <=
    positions[i]; q (Lq, Hq, D), k/v (L, Hkv, D), in float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    j = torch.arange(k.shape[0])[None, :]
    p = positions[:, None]
    allowed = (j <= p) & (j > p - window) if window else (j <= p)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 1, 8, 16, 23])
def test_torch_attention_window_matches_masked_softmax(window):
    g = torch.Generator().manual_seed(window)
    hq, hkv, d, bs, nblocks = 4, 2, 16, 16, 24
    kc = torch.randn(nblocks, bs, hkv, d, generator=g)
    vc = torch.randn(nblocks, bs, hkv, d, generator=g)
    lens = [5, 40, 61]           # context lengths (the new tokens included)
    new = [5, 9, 1]              # query tokens of each sequence this step (a fresh prompt, a chunk, one token)
    perm = torch.randperm(nblocks, generator=g)
    tables = torch.stack([perm[0:8], perm[8:16], perm[16:24]]).to(torch.int32)
    q = torch.randn(sum(new), hq, d, generator=g)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = 0.3
    out = torch_ops.prefill_attention(q, kc, vc, cu, ctx, tables, max(new), scale, window=window)
    for b, (n, m) in enumerate(zip(lens, new, strict=True)):
        k = torch_ops.gather_kv(kc, tables[b], n)
        v = torch_ops.gather_kv(vc, tables[b], n)
        want = _masked_softmax_attention(q[cu[b]:cu[b + 1]], k, v, scale, torch.arange(n - m, n), window)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), want, rtol=1e-5, atol=1e-5)
    qd = torch.randn(3, hq, d, generator=g)
    out = torch_ops.decode_attention(qd, kc, vc, ctx, tables, scale, window=window)
    for b, n in enumerate(lens):
        k = torch_ops.gather_kv(kc, tables[b], n)
        v = torch_ops.gather_kv(vc, tables[b], n)
        want = _masked_softmax_attention(qd[b:b + 1], k, v, scale, torch.tensor([n - 1]), window)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_mul_is_gate_first():
    x = torch.randn(3, 2 * 8)
    want = torch.nn.functional.gelu(x[:, :8], approximate="tanh") * x[:, 8:]
    torch.testing.assert_close(torch_ops.gelu_tanh_mul(x), want)


def test_cuda_attention_checks_the_window():
    """The CUDA kernels take a window (tests/test_window_gpu.py runs them); a window with a shared prefix, or one
    that is not an int >= 0, is refused before anything is launched."""
    q = torch.zeros(1, 2, 64)
    i32 = torch.zeros(1, dtype=torch.int32)
    shared = SharedPrefix(q_rows=i32.view(1, 1), lens=i32, tables=i32.view(1, 1), skip=i32, suffix_lens=i32)
    with pytest.raises(ValueError, match="window=8 with shared=.*do not go together"):
        cuda_ops.decode_attention(q, q, q, q, q, 1.0, window=8, shared=shared)
    for bad in (-1, 2.0, True, None):
        with pytest.raises(ValueError, match="window must be an int >= 0"):
            cuda_ops.decode_attention(q, q, q, q, q, 1.0, window=bad)
        with pytest.raises(ValueError, match="window must be an int >= 0"):
            cuda_ops.prefill_attention(q, q, q, q, q, q, 1, 1.0, window=bad)


# ---------------------------------------------------------------- config
def _cfg(tmp_path) -> dict:
    path = make_checkpoint(tmp_path / "g", "gemma3", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                           head_dim=32, sliding_window=8)
    return json.loads((path / "config.json").read_text())


def _spec_of(tmp_path, cfg: dict):
    d = tmp_path / "edited"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return load_spec(d)


def test_older_config_spelling_gives_the_same_spec(tmp_path):
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (transformers < 5) read as
    rope_parameters / layer_types do; Gemma 3's defaults where fields are missing."""
    cfg = _cfg(tmp_path)
    new = _spec_of(tmp_path, {**cfg, "num_hidden_layers": 12, "layer_types": None, "sliding_window_pattern": 6})
    assert new.local_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=2)
    spec = _spec_of(tmp_path, old)
    assert (spec.rope_theta, spec.local_rope_theta, spec.rope_scaling) == (1e6, 1e4, {"rope_type": "linear",
                                                                                      "factor": 8.0})
    assert spec.local_layers == (0,) and spec.local_window == 8
    bare = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                      "sliding_window_pattern", "query_pre_attn_scalar",
                                                      "tie_word_embeddings")}
    spec = _spec_of(tmp_path, bare)
    assert (spec.rope_theta, spec.local_rope_theta, spec.rope_scaling) == (1e6, 1e4, None)
    assert spec.softmax_scale == 256 ** -0.5 and spec.tie_word_embeddings


@pytest.mark.parametrize("change,named", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"final_logit_softcapping": -1}, "final_logit_softcapping=-1"),
    ({"hidden_activation": "relu"}, "hidden_activation='relu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"layer_types": [SLIDING, "chunked_attention"]}, "layer_types[1]='chunked_attention'"),
    ({"layer_types": [SLIDING]}, "layer_types must be a list of num_hidden_layers=2"),
    ({"sliding_window": 0}, "sliding_window=0"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar=0"),
    ({"rope_parameters": {FULL: {"rope_type": "default", "rope_theta": 1e6},
                          SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention.rope_type='linear'"),
    ({"rope_parameters": {FULL: {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
                          SLIDING: {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters.full_attention.rope_type='yarn'"),
])
def test_refused_configs_name_the_field(tmp_path, change, named):
    with pytest.raises(ModelLoadError) as e:
        _spec_of(tmp_path, {**_cfg(tmp_path), **change})
    assert named in str(e.value)


def test_backend_choice_runs_gemma_on_cuda(tmp_path, monkeypatch):
    """Sliding-window layers run on the CUDA kernels: auto picks cuda on a GPU where the kernels work and
    --backend cuda is accepted, at head_dim 128 and at Gemma 3 1B-12B's 256; a head_dim the attention kernels lack
    (96 here) stays on torch, with --backend cuda refused naming it."""
    monkeypatch.setattr(model_runner, "cuda_backend_available", lambda: (True, ""))
    cuda, cpu, bf16 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16
    spec = _spec_of(tmp_path, {**_cfg(tmp_path), "head_dim": 128})
    assert spec.local_layers and spec.local_window == 8
    assert pick_backend(EngineConfig(model="x", backend="cuda"), cuda, bf16, spec) == "cuda"
    assert pick_backend(EngineConfig(model="x"), cuda, bf16, spec) == "cuda"
    assert pick_backend(EngineConfig(model="x"), cpu, torch.float32, spec) == "torch"
    assert pick_backend(EngineConfig(model="x", backend="torch"), cuda, bf16, spec) == "torch"
    wide = _spec_of(tmp_path, {**_cfg(tmp_path), "head_dim": 256})
    assert pick_backend(EngineConfig(model="x", backend="cuda"), cuda, bf16, wide) == "cuda"
    assert pick_backend(EngineConfig(model="x"), cuda, bf16, wide) == "cuda"
    odd = _spec_of(tmp_path, {**_cfg(tmp_path), "head_dim": 96})
    with pytest.raises(RuntimeError, match="head_dim 96.*--backend torch"):
        pick_backend(EngineConfig(model="x", backend="cuda"), cuda, bf16, odd)
    assert pick_backend(EngineConfig(model="x"), cuda, bf16, odd) == "torch"
