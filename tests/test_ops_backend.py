"""Both ops backends (torch_ops, the reference; cuda_ops, the kernels) against their contract, OpsBackend
(CPU only: signatures, not numbers; tests/test_kernels_gpu.py compares the numbers on a GPU).

A backend's op is compatible when every parameter of the contract is there, in the same order, of the same
kind and with the same default; the CUDA backend may add keyword-only parameters with defaults (out=, ...).
"""
from __future__ import annotations

import inspect

import pytest

from flashgen.ops import OpsBackend, cuda_ops, get_ops, torch_ops

OPS = sorted(n for n, f in vars(OpsBackend).items() if inspect.isfunction(f) and not n.startswith("_"))
BACKENDS = {"torch": torch_ops, "cuda": cuda_ops}


def _contract(op: str) -> list[inspect.Parameter]:
    return list(inspect.signature(getattr(OpsBackend, op)).parameters.values())[1:]  # without self


def test_the_contract_lists_the_model_ops():
    assert OPS == ["act_mul_fp8", "decode_attention", "gelu_tanh_mul", "linear", "linear_fp8", "linear_fp8_rows",
                   "moe", "prefill_attention", "rms_norm", "rms_norm_fp8", "rope_kv_append", "silu_mul"]
    for op in OPS:
        assert (getattr(OpsBackend, op).__doc__ or "").strip(), f"OpsBackend.{op} has no docstring"


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_ops_gives_a_module_that_has_every_op(backend):
    ops = get_ops(backend)
    assert ops is BACKENDS[backend]
    assert isinstance(ops, OpsBackend)  # runtime_checkable: every op is there
    for op in OPS:
        assert callable(getattr(ops, op, None)), f"{ops.__name__} has no {op}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_signature_is_compatible(backend, op):
    fn = getattr(BACKENDS[backend], op)
    want = _contract(op)
    have = list(inspect.signature(fn).parameters.values())
    where = f"{BACKENDS[backend].__name__}.{op}{inspect.signature(fn)}"
    assert [(p.name, p.kind, p.default) for p in have[:len(want)]] == [
        (p.name, p.kind, p.default) for p in want], f"{where} does not match OpsBackend.{op}"
    for p in have[len(want):]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, (
            f"{where}: an extra parameter must be keyword-only with a default, {p.name!r} is not")
    if backend == "torch":
        assert len(have) == len(want), f"{where}: the reference takes exactly the contract's parameters"


def test_every_op_both_backends_share_is_in_the_contract():
    """An op added to both backends is added to OpsBackend too (helpers start with _ or live in one backend)."""
    def public_functions(mod):
        return {n for n, f in vars(mod).items() if inspect.isfunction(f) and not n.startswith("_")}

    assert public_functions(torch_ops) & public_functions(cuda_ops) == set(OPS)
