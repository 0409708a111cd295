"""The ops the model calls, behind one interface with two backends.

`get_ops("torch")` is the plain-PyTorch reference (any device); `get_ops("cuda")` the run-time compiled CUDA
kernels (kernels/*.cu through CuPy). Both modules expose the same functions with the same contracts
(OpsBackend in backend.py; shapes in docs/design.md): rope_kv_append, prefill_attention, decode_attention,
rms_norm, silu_mul, and linear (torch's GEMM; the CUDA backend swaps in a skinny kernel for up to 8 rows where
it measures faster).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from flashgen.ops.backend import OpsBackend  # noqa: F401 - the contract of both backends

BACKENDS = {"torch": "flashgen.ops.torch_ops", "cuda": "flashgen.ops.cuda_ops"}


def get_ops(backend: str) -> ModuleType:
    """The backend's module (torch_ops or cuda_ops), which implements OpsBackend."""
    if backend not in BACKENDS:
        raise ValueError(f"ops backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def cuda_backend_available() -> tuple[bool, str]:
    """(True, "") when the CUDA kernels can run here, else (False, the reason)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, "cupy is not installed (pip install 'flashgen[cuda13]' or 'flashgen[cuda12]')"
    return True, ""
