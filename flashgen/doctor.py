"""`flashgen doctor`: what this machine will run and why -- GPU, driver, CUDA, torch, CuPy, NVRTC, the backend
`auto` picks and where compiled kernels are cached. Reads only; needs no GPU (it then says there is none)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _nvidia_smi() -> tuple[str | None, str | None, str]:
    """(driver version, highest CUDA version the driver supports, note) from nvidia-smi, or Nones and why."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None, "nvidia-smi not found (no NVIDIA driver installed)"
    try:
        header = subprocess.run([exe], capture_output=True, text=True, timeout=20)
        query = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return None, None, f"nvidia-smi failed: {e}"
    if query.returncode != 0 or not query.stdout.strip():
        msg = (query.stdout + query.stderr).strip().splitlines()
        return None, None, "nvidia-smi reports no driver" + (f": {msg[0]}" if msg else "")
    driver = query.stdout.strip().splitlines()[0].strip()
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header.stdout)
    return driver, m.group(1) if m else None, ""


def kernel_cache_dir() -> str:
    """Where CuPy keeps the compiled kernels (flashgen.ops.jit compiles through CuPy's cache)."""
    return os.environ.get("CUPY_CACHE_DIR") or str(Path.home() / ".cupy" / "kernel_cache")


def diagnose() -> dict[str, Any]:
    """The facts `flashgen doctor` prints, as a JSON-ready dict."""
    import torch

    from flashgen.ops import CUDA_FIX, cuda_backend_available, nvrtc_version

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    driver, driver_cuda, driver_note = _nvidia_smi()
    try:
        import cupy

        cupy_version: str = cupy.__version__
    except ImportError:
        cupy_version = "not installed"
    except Exception as e:  # a broken CuPy install raises more than ImportError
        cupy_version = f"fails to import: {e}"
    nvrtc_ok, nvrtc = nvrtc_version()
    ok, why = cuda_backend_available()
    if not gpus:
        backend, reason = "torch", "no CUDA GPU visible: the torch reference ops run on the CPU"
    elif ok:
        backend, reason = "cuda", "CUDA GPU, CuPy and NVRTC work: the CUDA kernels (bfloat16/float16; " \
                                  "--dtype float32 runs torch)"
    else:
        backend, reason = "torch", f"the CUDA kernels cannot run ({why}): slow torch reference ops. Fix: {CUDA_FIX}"
    try:
        from flashgen.ops.jit import kernel_dir

        sources = str(kernel_dir())
    except FileNotFoundError as e:
        sources = f"not found: {e}"
    if backend != "cuda":
        pdl = "n/a (the CUDA kernels do not run)"
    else:
        from flashgen.ops.jit import pdl_status

        try:
            pdl = pdl_status(0)
        except ValueError as e:  # an unknown FLASHGEN_PDL value: what a run would refuse with
            pdl = f"error: {e}"
    return {
        "gpus": gpus,
        "driver_version": driver,
        "driver_cuda_version": driver_cuda,
        "driver_note": driver_note,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cupy_version": cupy_version,
        "nvrtc_version": nvrtc if nvrtc_ok else None,
        "nvrtc_note": "" if nvrtc_ok else nvrtc,
        "backend": backend,
        "backend_reason": reason,
        "kernel_cache_dir": kernel_cache_dir(),
        "kernel_sources": sources,
        "programmatic_dependent_launch": pdl,
    }


def format_doctor(d: dict[str, Any]) -> str:
    rows = [
        ("GPU", ", ".join(d["gpus"]) if d["gpus"] else "no CUDA GPU visible"),
        ("driver", d["driver_version"] + (f" (supports CUDA {d['driver_cuda_version']})"
                                          if d["driver_cuda_version"] else "")
         if d["driver_version"] else d["driver_note"]),
        ("torch", f"{d['torch_version']} ({'CUDA ' + d['torch_cuda'] if d['torch_cuda'] else 'CPU-only'} build)"),
        ("CuPy", d["cupy_version"]),
        ("NVRTC", d["nvrtc_version"] or f"unavailable: {d['nvrtc_note']}"),
        ("backend (auto)", f"{d['backend']}: {d['backend_reason']}"),
        ("kernel cache", f"{d['kernel_cache_dir']} (CuPy's; set CUPY_CACHE_DIR to move it)"),
        ("kernel sources", d["kernel_sources"]),
        ("dependent launch", d["programmatic_dependent_launch"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)
