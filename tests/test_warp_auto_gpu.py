"""auto's choice of the decode warp plan on the GPU (cuda_attention.warp_min_batch, WARP_AUTO_MAX_CONTEXT): the op
takes it when the batch is large and the bound on its contexts short (the tables' width, or the caller's
`longest`), and the engine's captured graphs for steps of short contexts launch it, with the same logits as a run
on the split plan."""
from __future__ import annotations

import random

import pytest
import torch

from flashgen.ops import cuda_attention, cuda_ops
from test_kernels_gpu import DEV, _gen, _paged_cache, _randn, _seed
from test_shared_prefix_gpu import generate_logged, logits_match_until_tokens_differ

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("d,group", [(64, 1), (128, 2), (128, 8)])
def test_auto_takes_the_warp_plan_on_a_large_batch_of_short_contexts(d, group, monkeypatch):
    """At warp_min_batch sequences of at most WARP_AUTO_MAX_CONTEXT tokens auto's output is the warp plan's, bit
    for bit; with tables as wide as a graph's the caller's `longest` brings it back; with the width as the bound, or
    a bound past WARP_AUTO_MAX_CONTEXT, it is the split plan's launch (over two waves of CTAs), bit for bit."""
    monkeypatch.delenv("FLASHGEN_DECODE_PLAN", raising=False)
    hkv, bs = 2, 16
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    B = cuda_ops.warp_min_batch(hkv, group, d, sms)
    g = _gen(_seed() + d + group)
    lens = torch.randint(1, cuda_attention.WARP_AUTO_MAX_CONTEXT + 1, (B,), generator=g, device=DEV)
    lens[0] = cuda_attention.WARP_AUTO_MAX_CONTEXT
    lens = lens.sort(descending=True).values
    kc, vc, bt = _paged_cache(lens.tolist(), hkv, d, bs, torch.bfloat16, g)
    bt = bt[:, :cuda_attention.WARP_AUTO_MAX_CONTEXT // bs]  # exactly WARP_AUTO_MAX_CONTEXT tokens wide
    q = _randn((B, hkv * group, d), g, torch.bfloat16)
    ctx = lens.to(torch.int32)

    def run(n=B, tables=bt, **kw):
        return cuda_ops.decode_attention(q[:n], kc, vc, ctx[:n], tables[:n], d**-0.5, **kw)

    warp = run(plan="warp")
    assert torch.equal(run(), warp)
    wide = torch.nn.functional.pad(bt, (0, 64), value=0)  # 1,024 more tokens of table
    assert torch.equal(run(tables=wide, longest=int(lens.max())), warp)
    split = run(plan="split")
    assert torch.equal(run(tables=wide), split)  # the width is the bound: over two waves of CTAs, the split plan
    torch.testing.assert_close(split.float(), warp.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(run(tables=wide, longest=cuda_attention.WARP_AUTO_MAX_CONTEXT + 1), split)


def test_engine_short_context_graphs_match_the_split_plan(tmp_path, monkeypatch):
    """Greedy decode of 24 lines whose contexts cross WARP_AUTO_MAX_CONTEXT (every bucket takes the warp plan on
    short contexts: WARP_AUTO_PAIRS_PER_SM patched to 0): graphs captured for short steps, the plain graphs replayed
    past the bound, and every step's logits equal those of the same run on the split plan until the tokens first
    differ (random weights have near-ties)."""
    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams

    model = tmp_path / "m"
    make_checkpoint(model, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, vocab_size=512, max_position_embeddings=2048)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(440, 500))] for _ in range(24)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    monkeypatch.setattr(cuda_attention, "WARP_AUTO_PAIRS_PER_SM", 0)
    monkeypatch.setenv("FLASHGEN_SHARED_PREFIX", "0")
    runs = {}
    for plan in ("auto", "split"):
        monkeypatch.setenv("FLASHGEN_DECODE_PLAN", plan)
        llm = LLM(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=0.05, max_num_seqs=32)
        runs[plan] = generate_logged(llm, prompts, [params] * len(prompts))
        shorts = [k for k in llm.engine.runner.graphs.graphs if k[2]]
        assert bool(shorts) == (plan == "auto"), shorts
        del llm
    assert logits_match_until_tokens_differ(runs["auto"], runs["split"]) >= 24 * 16


def test_engine_captures_the_large_buckets_on_first_use(tmp_path, monkeypatch):
    """Buckets between EAGER_MAX_BATCH and the largest are not captured at start-up; the first decode step of one
    captures it (counted as a late capture), and every step's logits equal an eager run's until the tokens first
    differ."""
    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams
    from flashgen.engine import cuda_graphs

    model = tmp_path / "m"
    make_checkpoint(model, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, vocab_size=512, max_position_embeddings=1024)
    monkeypatch.setattr(cuda_graphs, "EAGER_MAX_BATCH", 16)
    monkeypatch.setenv("FLASHGEN_SHARED_PREFIX", "0")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(60)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 21, ignore_eos=True) for i in range(60)]
    llm = LLM(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=0.05, max_num_seqs=64)
    graphs = llm.engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 8, 16, 32, 48, 64]
    assert sorted(bs for bs, _, _ in graphs.graphs) == [1, 2, 4, 8, 16, 64]  # 32 and 48: not yet
    run = generate_logged(llm, prompts, params)
    assert {(32, 0, False), (48, 0, False)} <= set(graphs.graphs)  # the batch shrank through both
    assert graphs.late_captures >= 2
    del llm
    eager = LLM(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=0.05, max_num_seqs=64,
                enforce_eager=True)
    assert logits_match_until_tokens_differ(run, generate_logged(eager, prompts, params)) >= 60 * 4
