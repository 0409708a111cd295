"""The ops the model calls, behind one interface with two backends.

`get_ops("torch")` is the plain-PyTorch reference (any device); `get_ops("cuda")` the run-time compiled CUDA
kernels (kernels/*.cu through CuPy). Both modules expose the same functions with the same contracts
(OpsBackend in backend.py; shapes in docs/design.md): rope_kv_append, prefill_attention, decode_attention,
rms_norm, silu_mul, gelu_tanh_mul, linear (torch's GEMM; the CUDA backend swaps in a skinny kernel for up to 8
rows where it measures faster) and linear_fp8 (FP8 weights; the CUDA backend runs cuBLASLt's FP8 GEMM).
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


CUDA_FIX = ("pip install 'flashgen[cuda13]' (driver for CUDA 13) or 'flashgen[cuda12]' (CUDA 12); "
            "`flashgen doctor` shows which")


def cuda_backend_available() -> tuple[bool, str]:
    """(True, "") when the CUDA kernels can run here, else (False, the reason): no CUDA device, no CuPy, or a
    CuPy whose NVRTC (the run-time compiler the kernels are built with) cannot be loaded. CUDA_FIX says how to
    install the missing pieces."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    ok, why = nvrtc_version()
    return (True, "") if ok else (False, why)


def nvrtc_version() -> tuple[bool, str]:
    """(True, "12.8") when CuPy imports and loads NVRTC, else (False, why not). Needs no GPU."""
    try:
        import cupy
    except ImportError:
        return False, "cupy is not installed"
    except Exception as e:  # a broken CuPy install raises more than ImportError
        return False, f"cupy fails to import: {e}"
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
    except Exception as e:  # a missing libnvrtc is a RuntimeError, a CUDA error, ...
        return False, f"cupy {getattr(cupy, '__version__', '?')} cannot load NVRTC: {e}"
    return True, f"{major}.{minor}"
