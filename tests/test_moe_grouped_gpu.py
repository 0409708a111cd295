"""The grouped-GEMM MoE path (flashgen/ops/cuda_moe.py) on the GPU: against the per-expert loop and a float32
oracle at Qwen3-30B-A3B's and Mixtral's layer shapes (the rules of tests/test_kernels_gpu.py: err(grouped) <=
2 * err(loop in the same dtype) + eps), with no host sync (sync debug mode, CUDA graph capture and replay), and
the engine decoding the same greedy tokens with CUDA graphs as without on a tiny Qwen3-MoE checkpoint."""
from __future__ import annotations

import random

import pytest
import torch

from flashgen.ops import cuda_moe, torch_ops
from flashgen.ops.torch_moe import route
from test_kernels_gpu import DEV, _randn
from test_model_families_gpu import _assert_close

pytestmark = pytest.mark.gpu

SEED = 0
SHAPES = {  # E, top_k, hidden, expert width
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}


def _grouped_runs_here() -> str | None:
    """Why the grouped path does not run on this GPU in bfloat16, or None."""
    w = torch.zeros(2, 16, 8, device=DEV, dtype=torch.bfloat16)
    return cuda_moe.grouped_unsupported(torch.bfloat16, w, torch.zeros(2, 8, 8, device=DEV, dtype=torch.bfloat16))


def _layer(shape: str, T: int, dtype: torch.dtype):
    E, k, H, inter = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(SEED)
    x = _randn((T, H), g, dtype)
    router = _randn((E, H), g, dtype, 0.05)
    gate_up = _randn((E, 2 * inter, H), g, dtype, H ** -0.5)
    down = _randn((E, H, inter), g, dtype, inter ** -0.5)
    return x, router, gate_up, down, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 256, 1025])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe_matches_the_loop_and_float32(shape, T, dtype):
    """cuda_ops.moe (grouped GEMMs in bfloat16; float16 is the loop: torch._grouped_mm's float16 path syncs) and
    the loop in the same dtype, against the loop in float32, on the tokens routed alike in both precisions."""
    from flashgen.ops import cuda_ops

    x, router, gate_up, down, k = _layer(shape, T, dtype)
    impl = cuda_moe.moe_impl(dtype, gate_up, down)
    if dtype == torch.bfloat16:
        why = _grouped_runs_here()
        if why:
            pytest.skip(why)
        assert impl == "grouped"
    else:
        assert impl == "loop"
    out = cuda_ops.moe(x, router, gate_up, down, k, True)
    base = torch_ops.moe(x, router, gate_up, down, k, True)
    ref = torch_ops.moe(x.float(), router.float(), gate_up.float(), down.float(), k, True)
    _, e_lo = route(x, router, k, True)
    _, e_hi = route(x.float(), router.float(), k, True)
    same = (e_lo.sort(-1).values == e_hi.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.75 or T < 8, f"only {same.float().mean():.2f} of the tokens routed alike"
    if same.any():
        _assert_close(f"moe {impl}", out[same], base[same], ref[same])
    if dtype == torch.bfloat16:  # the grouped path itself, also where cuda_ops.moe would not take it
        got = cuda_moe.moe_grouped(x, router, gate_up, down, k, True)
        if same.any():
            _assert_close("moe_grouped", got[same], base[same], ref[same])


def test_grouped_moe_does_not_sync_and_replays_in_a_cuda_graph():
    """No synchronizing call in an eager run (sync debug mode raises on one), and a captured run replayed with new
    inputs (new routing, new token counts per expert) gives the eager run's output."""
    why = _grouped_runs_here()
    if why:
        pytest.skip(why)
    x, router, gate_up, down, k = _layer("qwen3-30b-a3b", 64, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_moe.moe_grouped(x, router, gate_up, down, k, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_moe.moe_grouped(static, router, gate_up, down, k, True)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_moe.moe_grouped(static, router, gate_up, down, k, True)
    g = torch.Generator(device=DEV).manual_seed(SEED + 1)
    for scale in (1.0, 0.1, 3.0):
        new = _randn(tuple(x.shape), g, torch.bfloat16, scale)
        new[:8] = new[0]  # a few tokens with the same routing: one expert's group larger than the rest
        static.copy_(new)
        graph.replay()
        eager = cuda_moe.moe_grouped(new, router, gate_up, down, k, True)
        # the same kernels on the same data; index_add_'s atomic adds of top_k bf16 terms may round in another
        # order, so equal up to a few bf16 steps of the output
        torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2 * eager.abs().max().item())


FLIP = 0.1  # a position's logits moved by more than this fraction of their norm: a routing decision flipped


def _against_torch_per_position(path: str, prompts: list[list[int]]):
    """The MoE engine on the CUDA backend (bf16) against the float32 torch reference, with the torch backend in bf16
    as the yardstick, position by position. A router's near tie can go either way in a bf16 run: the position's
    logits then move by a third of their norm, in the CUDA run and the torch bf16 run alike, but not at the same
    positions (different GEMMs round differently upstream). So the whole-prompt norm of cuda_against_torch is the
    wrong measure here; instead each prompt's median per-position error must be within twice the yardstick's
    (+ 1e-2), and the CUDA run may flip at most one position per prompt more than the yardstick. A wrong kernel
    moves every position. Returns the CUDA engine."""
    from flashgen import LLM

    fast = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1)
    ref = LLM(model=path, dtype="float32", block_size=16, kv_cache_gb=1, backend="torch")
    same = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1, backend="torch")
    for ids in prompts:
        a, b, c = fast.prompt_logits(ids).float(), ref.prompt_logits(ids).float(), same.prompt_logits(ids).float()
        err, yard = (a - b).norm(dim=-1) / b.norm(dim=-1), (c - b).norm(dim=-1) / b.norm(dim=-1)
        assert err.median() < 2 * yard.median() + 1e-2, (
            f"prompt of {len(ids)} tokens: median error per position CUDA {err.median():.3g}, torch bf16 "
            f"{yard.median():.3g}")
        flips, yard_flips = int((err > FLIP).sum()), int((yard > FLIP).sum())
        assert flips <= yard_flips + 1, f"prompt of {len(ids)} tokens: {flips} positions moved past {FLIP} " \
                                        f"(torch bf16: {yard_flips})"
    return fast


def test_engine_moe_decodes_in_cuda_graphs_as_eagerly(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE checkpoint in bfloat16: prompt logits against the torch reference, position by position
    (_against_torch_per_position), the runner captures decode graphs (none with FLASHGEN_MOE=loop), and greedy
    decoding with graphs gives the eager run's tokens. Eight prompts decode together to the end (a captured bucket
    size, so the graph runs the eager run's shapes exactly, and top_k 2: two terms add the same in either order)."""
    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams

    why = _grouped_runs_here()
    if why:
        pytest.skip(why)
    path = str(make_checkpoint(tmp_path, "qwen3_moe", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                               num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
                               norm_topk_prob=True, mlp_only_layers=[0]))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 17, 33, 40, 64, 100, 130)]
    graphs = _against_torch_per_position(path, prompts[::3])
    assert graphs.engine.runner.graphs is not None, "the MoE model decodes without CUDA graphs"
    eager = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1, enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    a, b = graphs.generate(prompts, sp), eager.generate(prompts, sp)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.token_ids == y.token_ids, f"prompt {i}: graphs and eager decode differ"
    monkeypatch.setenv("FLASHGEN_MOE", "loop")
    loop = LLM(model=path, dtype="bfloat16", block_size=16, kv_cache_gb=1)
    assert loop.engine.runner.graphs is None
