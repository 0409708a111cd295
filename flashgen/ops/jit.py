"""Run-time compilation and launch of the CUDA kernels in kernels/*.cu, through CuPy (NVRTC).

One compiled module per (source file, dtype, head_dim, extra defines, arch): cached in memory here (functools.cache) and
on disk by CuPy (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache), so a process compiles each variant at most
once and later processes load the cubin. The block size is a run-time argument of the kernels (they take
its log2), so one variant serves every block size.

CuPy is imported lazily: importing this module never needs it (CI has neither CuPy nor a GPU); the first
compile or launch does, and says how to install it when it is missing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CUPY_HINT = (
    "flashgen's CUDA kernels need CuPy: pip install 'flashgen[cuda13]' (CUDA 13 driver) "
    "or 'flashgen[cuda12]' (CUDA 12)"
)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    """The folder holding the .cu/.cuh sources: $FLASHGEN_KERNEL_DIR, else the copy shipped inside the
    package (flashgen/kernels, in a wheel), else kernels/ beside the package (a source checkout)."""
    env = os.environ.get("FLASHGEN_KERNEL_DIR")
    candidates = [Path(env)] if env else []
    pkg = Path(__file__).resolve().parent.parent  # flashgen/
    candidates += [pkg / "kernels", pkg.parent / "kernels"]
    for c in candidates:
        if (c / "common.cuh").is_file():
            return c
    raise FileNotFoundError(
        "flashgen's CUDA sources (common.cuh and *.cu) were not found in "
        + ", ".join(str(c) for c in candidates)
        + "; set FLASHGEN_KERNEL_DIR to the folder that holds them"
    )


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(CUPY_HINT) from e
    return cupy


def _expand_includes(path: Path, seen: set[Path] | None = None) -> str:
    # NOTE: CuPy's disk cache is keyed on the source text and options, not on the files it includes, so
    # local headers are inlined here: editing common.cuh then changes the key and forces a recompile.
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    text = path.read_text()

    def repl(m: re.Match) -> str:
        inc = path.parent / m.group(1)
        if not inc.is_file():
            return m.group(0)  # not ours: let the compiler resolve it through -I
        return f'#line 1 "{inc.name}"\n{_expand_includes(inc, seen)}\n#line 1 "{path.name}"'

    return _INCLUDE_RE.sub(repl, text)


def device_arch(device: torch.device | int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# Architectures whose own instructions (wgmma, setmaxnreg on Hopper) only exist in an arch-specific target.
ARCH_SPECIFIC = {"sm_90": "sm_90a"}
_ARCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _nvrtc_target(target: str):
    """Make CuPy's NVRTC compile (and its disk-cache key) use `-arch=<target>` instead of the plain
    compute capability it derives from the device, e.g. sm_90a for Hopper's wgmma. CuPy picks the option in
    one helper, cupy.cuda.compiler._get_arch_for_options_for_nvrtc; it is swapped for the duration of one
    compile, under a lock."""
    from cupy.cuda import compiler

    orig = getattr(compiler, "_get_arch_for_options_for_nvrtc", None)
    if orig is None:  # pragma: no cover - depends on the CuPy version
        raise RuntimeError(f"this CuPy cannot be told to compile for {target}")
    with _ARCH_LOCK:
        compiler._get_arch_for_options_for_nvrtc = lambda arch=None: (f"-arch={target}", "cubin")
        try:
            yield
        finally:
            compiler._get_arch_for_options_for_nvrtc = orig


@functools.cache
def _module(source: str, dtype_code: int, head_dim: int, defines: tuple, arch: str, device_index: int) -> Any:
    cupy = _cupy()
    kdir = kernel_dir()
    code = _expand_includes(kdir / source)
    # NOTE: CuPy appends the architecture option (-arch=sm_<cc> of the current device) itself, unless `arch`
    # names an arch-specific target (sm_90a), set through _nvrtc_target; `arch` is part of the cache key so
    # that a process driving different GPUs keeps one module per architecture.
    options: tuple[str, ...] = ("--std=c++17", f"-I{kdir}", f"-DFG_DTYPE={dtype_code}", "-lineinfo")
    if head_dim:
        options += (f"-DFG_HEAD_DIM={head_dim}",)
    options += tuple(f"-D{k}={v}" for k, v in defines)
    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=code, options=options)
        with _nvrtc_target(arch) if arch in ARCH_SPECIFIC.values() else contextlib.nullcontext():
            mod.compile()  # compile and load now, never inside a CUDA-graph capture
    return mod


@functools.cache  # per (source, name, dtype, ...): a launch looks its kernel up without CuPy or driver calls
def get_kernel(
    source: str,
    name: str,
    dtype: torch.dtype,
    head_dim: int,
    device_index: int,
    max_dynamic_smem: int = 0,
    defines: tuple[tuple[str, int], ...] = (),
    arch_specific: bool = False,
) -> Any:
    """The compiled kernel `name` of kernels/`source` for (dtype, head_dim, extra -D defines) on a device
    (a cupy.RawKernel). `arch_specific` builds for the device's arch-specific target (ARCH_SPECIFIC: sm_90a
    on Hopper), which a source using wgmma needs."""
    if dtype not in _DTYPE_CODE:
        raise ValueError(f"kernels support bfloat16 and float16, not {dtype}")
    arch = device_arch(device_index)
    if arch_specific:
        if arch not in ARCH_SPECIFIC:
            raise ValueError(f"{source} needs one of {sorted(ARCH_SPECIFIC)}, device {device_index} is {arch}")
        arch = ARCH_SPECIFIC[arch]
    mod = _module(source, _DTYPE_CODE[dtype], head_dim, tuple(defines), arch, device_index)
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        kern = mod.get_function(name)
        if max_dynamic_smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = max_dynamic_smem
    return kern


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device_index: int) -> Any:
    # NOTE: CuPy 14 deprecates ExternalStream in favour of Stream.from_external(<object with
    # __cuda_stream__>); ExternalStream still works there and in CuPy 13, so keep it and stay quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _cupy().cuda.ExternalStream(ptr, device_index)


def launch(
    kernel: Any,
    grid: Sequence[int],
    block: Sequence[int],
    args: Sequence[Any],
    device: torch.device,
    shared_mem: int = 0,
) -> None:
    """Launch on torch's current stream of `device` (so CUDA-graph capture records it).

    `args` are built with `ptr`, `i32` and `f32` so each one has the C type the kernel declares.
    """
    cupy = _cupy()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = _external_stream(torch.cuda.current_stream(idx).cuda_stream, idx)
    try:
        with cupy.cuda.Device(idx):
            kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem, stream=stream)
    except cupy.cuda.driver.CUDADriverError as e:
        raise RuntimeError(
            f"launch of CUDA kernel {getattr(kernel, 'name', kernel)} failed "
            f"(grid {tuple(grid)}, block {tuple(block)}, shared memory {shared_mem} B): {e}"
        ) from e


def ptr(t: torch.Tensor | None) -> Any:
    """A tensor's device pointer as a kernel argument (null for None)."""
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def i32(x: int) -> Any:
    import numpy as np

    return np.int32(x)


def i64(x: int) -> Any:
    import numpy as np

    return np.int64(x)


def f32(x: float) -> Any:
    import numpy as np

    return np.float32(x)
