"""The CUDA backend's grouped-GEMM MoE path (flashgen/ops/cuda_moe.py) against the per-expert loop, on the CPU:
torch._grouped_mm runs there through torch's per-group fallback, so the routing, the offsets, the layouts and the
gather/scatter around the GEMMs are checked here; tests/test_moe_grouped_gpu.py checks the CUDA kernel. Errors are
max abs differences from a float64 run of the loop, and the grouped path's must be within twice the loop's in the
same dtype (+ a small eps)."""
from __future__ import annotations

import itertools

import pytest
import torch

from flashgen.ops import cuda_moe, cuda_ops, torch_ops
from flashgen.ops.torch_moe import route


def _cpu_grouped_mm_problem() -> str | None:
    if not cuda_moe.has_grouped_mm():
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        torch._grouped_mm(torch.zeros(2, 8), torch.zeros(2, 8, 8).transpose(1, 2),
                          offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as e:
        return f"torch {torch.__version__}'s torch._grouped_mm does not run float32 on the CPU: {e}"
    return None


SKIP = _cpu_grouped_mm_problem()
needs_grouped_mm = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

H, INTER = 64, 32


def _layer(E: int, T: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    router = torch.randn(E, H, generator=g) * 0.3
    gate_up = torch.randn(E, 2 * INTER, H, generator=g) * 0.15
    down = torch.randn(E, H, INTER, generator=g) * 0.15
    return [t.to(dtype) for t in (x, router, gate_up, down)]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(x, router, gate_up, down, k, renorm):
    """grouped vs loop in x's dtype, both against the loop in float64, on the tokens whose top-k experts are the
    same in both precisions (near-tied router scores may route differently)."""
    got = cuda_moe.moe_grouped(x, router, gate_up, down, k, renorm)
    base = torch_ops.moe(x, router, gate_up, down, k, renorm)
    wide = [t.double() for t in (x, router, gate_up, down)]
    ref = torch_ops.moe(*wide, k, renorm)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert not torch.isnan(got).any()
    _, e_lo = route(x, router, k, renorm)
    _, e_hi = route(wide[0], wide[1], k, renorm)
    same = (e_lo.sort(-1).values == e_hi.sort(-1).values).all(-1)
    assert same.float().mean() > 0.9
    e_grouped, e_loop = _err(got[same], ref[same]), _err(base[same], ref[same])
    eps = 1e-4 * ref.abs().max().item() + 1e-6
    assert e_grouped <= 2 * e_loop + eps, f"grouped {e_grouped:.3g} > 2 x loop {e_loop:.3g} + {eps:.2g}"
    return got, base


CASES = [(E, k, T, renorm) for E, k, T, renorm in itertools.product([1, 8, 60, 128], [1, 2, 8], [1, 3, 97, 1025],
                                                                      [False, True]) if k <= E]


@needs_grouped_mm
@pytest.mark.parametrize("E,k,T,renorm", CASES)
def test_grouped_matches_the_loop_float32(E, k, T, renorm):
    x, router, gate_up, down = _layer(E, T, torch.float32, seed=E * 1000 + T)
    got, base = _check(x, router, gate_up, down, k, renorm)
    # the same routing, the same per-group GEMMs on the CPU: float32 agrees to rounding (bitwise, in practice)
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)


@needs_grouped_mm
@pytest.mark.parametrize("E,k,T", [(8, 2, 97), (60, 8, 97), (128, 8, 1025), (60, 1, 3)])
def test_grouped_matches_the_loop_bfloat16(E, k, T):
    _check(*_layer(E, T, torch.bfloat16, seed=7), k, True)


@needs_grouped_mm
def test_empty_experts_at_both_ends_and_between():
    """Only experts 3 and 5 of 8 get tokens: groups 0-2, 4, 6 and 7 are empty (equal offsets, the last ones at
    the end of the rows)."""
    E, T, k = 8, 40, 2
    x, router, gate_up, down = _layer(E, T, torch.float32, seed=3)
    router = torch.zeros(E, H)
    router[3, 0] = router[5, 1] = 5.0
    x[:, :2] = x[:, :2].abs().clamp(max=1) + 1  # in [1, 2]: experts 3 and 5 are every token's top two
    weights, experts = route(x, router, k, True)
    assert set(experts.flatten().tolist()) == {3, 5}
    got, _ = _check(x, router, gate_up, down, k, True)
    want = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            e = int(experts[t, j])
            gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
            want[t] += (weights[t, j].double() * (down[e].double() @ (torch.nn.functional.silu(gate) * up))).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_grouped_mm
def test_no_tokens():
    x, router, gate_up, down = _layer(8, 0, torch.float32)
    assert cuda_moe.moe_grouped(x, router, gate_up, down, 2, True).shape == (0, H)


@needs_grouped_mm
def test_bad_shapes_are_refused_as_the_loop_refuses_them():
    x, router, gate_up, down = _layer(8, 3, torch.float32)
    with pytest.raises(ValueError, match="down has shape"):
        cuda_moe.moe_grouped(x, router, gate_up, down[:, :, :-1], 2, True)
    with pytest.raises(ValueError, match="top_k=9"):
        cuda_moe.moe_grouped(x, router, gate_up, down, 9, True)


def test_the_backend_op_runs_the_loop_where_grouped_does_not_apply(monkeypatch):
    """On CPU tensors (and in float32, float16, or with FLASHGEN_MOE=loop on a GPU) cuda_ops.moe is the loop."""
    x, router, gate_up, down = _layer(8, 5, torch.float32)
    assert cuda_moe.moe_impl(x.dtype, gate_up, down) == "loop"
    assert "CUDA" in (cuda_moe.grouped_unsupported(x.dtype, gate_up, down) or "")
    assert torch.equal(cuda_ops.moe(x, router, gate_up, down, 2, True), torch_ops.moe(x, router, gate_up, down, 2,
                                                                                         True))
    monkeypatch.setenv("FLASHGEN_MOE", "loop")
    assert cuda_moe.moe_impl(x.dtype, gate_up, down) == "loop"
    monkeypatch.setenv("FLASHGEN_MOE", "fast")
    with pytest.raises(ValueError, match="FLASHGEN_MOE='fast'"):
        cuda_moe.moe_impl(x.dtype, gate_up, down)


def test_fused_routing_is_for_decode_sizes_on_a_cuda_device_only(monkeypatch):
    """moe_grouped takes kernels/moe_route.cu's routing only for CUDA tensors of a kernel dtype, at most
    FUSED_ROUTE_MAX_TOKENS tokens, FUSED_ROUTE_MAX_EXPERTS experts and FUSED_ROUTE_MAX_TOP_K choices; the CPU runs
    torch_moe's ops (the grouped tests above), and FLASHGEN_MOE_ROUTE takes fused or torch only."""
    x, router = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    assert not cuda_moe.fused_route_ok(x, router, 2)  # a CPU tensor
    monkeypatch.setenv("FLASHGEN_MOE_ROUTE", "sometimes")
    with pytest.raises(ValueError, match="FLASHGEN_MOE_ROUTE='sometimes': use fused or torch"):
        cuda_moe.fused_route_ok(x, router, 2)
    assert cuda_moe.FUSED_ROUTE_MAX_TOKENS <= 256 and cuda_moe.FUSED_ROUTE_MAX_TOP_K <= 32  # the kernel's limits


def test_fused_routing_ops_refuse_cpu_tensors_naming_the_argument():
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        cuda_moe.moe_route(torch.randn(4, 8, dtype=torch.bfloat16), 2, True)
    with pytest.raises(ValueError, match="ys must be a CUDA tensor"):
        cuda_moe.moe_combine(torch.randn(8, 16, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int32),
                             torch.ones(8), 4, 2)
