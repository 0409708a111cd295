"""kernels/moe_route.cu on the GPU: the fused routing and sort against torch_moe's route and sort_by_expert (the same
experts, the same pair order, weights within float32 rounding; tokens whose k-th and (k+1)-th probabilities tie are
left out, since torch.topk may take either), the fused combine against torch_moe.combine and a float64 sum (its
error within twice the reference's), and moe_grouped with the fused routing against it with torch's routing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashgen.ops import cuda_moe
from flashgen.ops.torch_moe import combine, route, sort_by_expert
from test_kernels_gpu import DEV, _randn
from test_moe_grouped_gpu import _grouped_runs_here

pytestmark = pytest.mark.gpu

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048), "mixtral-8x7b": (8, 2, 4096), "small": (60, 4, 64)}  # E, top_k, H


def _untied(x: torch.Tensor, router: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) bool: tokens whose k-th largest probability is above the (k+1)-th (no choice at the boundary)."""
    probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    if k == probs.shape[1]:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    top = probs.topk(k + 1, dim=-1).values
    return top[:, k - 1] > top[:, k]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 64, 100, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_route_matches_sort_by_expert(shape, T, dtype, renormalize):
    E, k, H = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(T + E)
    x = _randn((T, H), g, dtype)
    router = _randn((E, H), g, dtype, 0.05)
    offs, tokens, weights, pos, weights_tk = cuda_moe.moe_route(F.linear(x, router), k, renormalize)
    ref_experts, ref_tokens, ref_weights = sort_by_expert(x, router, k, renormalize)
    P = T * k
    assert offs.shape == (E,) and int(offs[-1]) == P and bool((offs[1:] >= offs[:-1]).all())
    experts = torch.searchsorted(offs, torch.arange(P, device=DEV, dtype=torch.int32), right=True)
    # the pair order of a stable sort: by expert, then token
    key = experts.long() * T + tokens
    assert bool((key[1:] > key[:-1]).all()), "pairs not sorted by (expert, token), or a token twice in one group"
    # pos inverts the sort; weights_tk is the weight in pair order
    assert torch.equal(pos.sort().values, torch.arange(P, device=DEV, dtype=torch.int32))
    assert torch.equal(tokens[pos.long()], torch.arange(P, device=DEV) // k)
    assert torch.equal(weights[pos.long()], weights_tk)
    ok = _untied(x, router, k)
    assert ok.float().mean() >= 0.9, f"only {ok.float().mean():.2f} of the tokens have no tie at the k-th choice"
    keep, ref_keep = ok[tokens], ok[ref_tokens]
    assert torch.equal(experts[keep].long(), ref_experts[ref_keep])
    assert torch.equal(tokens[keep], ref_tokens[ref_keep])
    torch.testing.assert_close(weights[keep], ref_weights[ref_keep], rtol=2e-6, atol=1e-7)
    if renormalize:
        sums = torch.zeros(T, device=DEV).index_add_(0, tokens, weights)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 33, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_combine_is_at_least_as_close_as_the_reference(shape, T, dtype):
    E, k, H = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(7 * T + E)
    x = _randn((T, H), g, dtype)
    router = _randn((E, H), g, dtype, 0.05)
    _, tokens, weights, pos, weights_tk = cuda_moe.moe_route(F.linear(x, router), k, True)
    ys = _randn((T * k, H), g, dtype)
    out = cuda_moe.moe_combine(ys, pos, weights_tk, T, k)
    ref = combine(x, tokens, ys, weights)
    exact = torch.zeros(T, H, dtype=torch.float64, device=DEV).index_add_(
        0, tokens, ys.double() * weights.double()[:, None])
    err, ref_err = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)  # the repo's rule: within twice the same-dtype reference's error
    assert out.dtype == dtype and out.shape == (T, H)


@pytest.mark.parametrize("T", [1, 7, 100, 256])
@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "small"])
def test_grouped_moe_with_fused_routing_matches_torch_routing(shape, T, monkeypatch):
    why = _grouped_runs_here()
    if why:
        pytest.skip(why)
    E, k, H = SHAPES[shape]
    inter = 128
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(3 * T + E)
    x = _randn((T, H), g, dtype)
    router = _randn((E, H), g, dtype, 0.05)
    gate_up = _randn((E, 2 * inter, H), g, dtype, H ** -0.5)
    down = _randn((E, H, inter), g, dtype, inter ** -0.5)
    assert cuda_moe.fused_route_ok(x, router, k)
    fused = cuda_moe.moe_grouped(x, router, gate_up, down, k, True)
    monkeypatch.setenv("FLASHGEN_MOE_ROUTE", "torch")
    assert not cuda_moe.fused_route_ok(x, router, k)
    plain = cuda_moe.moe_grouped(x, router, gate_up, down, k, True)
    exact = cuda_moe.moe_loop(x.float(), router.float(), gate_up.float(), down.float(), k, True)
    _, e_lo = route(x, router, k, True)
    _, e_hi = route(x.float(), router.float(), k, True)
    same = (e_lo.sort(-1).values == e_hi.sort(-1).values).all(-1) & _untied(x, router, k)
    assert same.any()
    err = (fused[same].float() - exact[same]).abs().max().item()
    base = (plain[same].float() - exact[same]).abs().max().item()
    assert err <= 2 * base + 1e-3 * exact[same].abs().max().item(), (err, base)
