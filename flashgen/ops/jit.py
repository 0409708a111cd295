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
import ctypes
import functools
import os
import re
import struct
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


# Kernels that begin with common.cuh's PDL prologue (pdl_prologue, or pdl_allow_next ... pdl_wait before their
# first access to memory an earlier kernel touches): launched with programmatic stream serialization on sm_90+,
# so each may start while the kernel before it finishes (docs/design.md, "Programmatic dependent launch").
# tests/test_pdl.py checks that each of these kernels' source has the prologue.
PDL_KERNELS = frozenset({
    "rms_norm_kernel", "silu_mul_kernel", "gelu_tanh_mul_kernel",
    "quantize_fp8_rows_kernel", "rms_norm_fp8_kernel", "silu_mul_fp8_kernel", "gelu_tanh_mul_fp8_kernel",
    "rope_kv_append_kernel", "decode_attention_kernel", "merge_states_kernel",
    "skinny_gemm_kernel", "skinny_gemm_fp8_kernel",
})


def pdl_mode() -> str:
    """$FLASHGEN_PDL: "auto" (the default: on where the GPU has it, sm_90 and later) or "0" (off)."""
    mode = os.environ.get("FLASHGEN_PDL", "auto").strip().lower()
    if mode not in ("auto", "0"):
        raise ValueError(f"FLASHGEN_PDL={mode!r}: use auto (the default) or 0")
    return mode


def pdl_status(device_index: int) -> str:
    """`flashgen doctor`'s line: whether PDL_KERNELS launch with programmatic dependent launch on the device, and
    if not, why."""
    if pdl_mode() == "0":
        return "off (FLASHGEN_PDL=0)"
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (9, 0):
        return f"off (sm_{major}{minor}: it needs sm_90 or later)"
    if not pdl_on(device_index):
        return "off (the driver library has no cuLaunchKernelEx: CUDA 12.0 or later is needed)"
    return "on (the decode step's kernels; FLASHGEN_PDL=0 turns it off)"


@functools.cache
def pdl_on(device_index: int) -> bool:
    """Whether PDL_KERNELS launch with programmatic stream serialization on this device (pdl_mode, sm_90+)."""
    if pdl_mode() != "auto" or torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    try:
        _driver()
    except (OSError, AttributeError):  # no libcuda.so.1 by that name, or a driver before CUDA 12.0
        return False
    return True


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
# each argument in an 8-byte slot of its C type (what ptr, i64, i32 and f32 make), for struct.pack_into
_SLOT = {"uint64": "Q", "int64": "q", "int32": "i4x", "float32": "f4x"}


class _ArgBlock:
    """One kernel's argument values for cuLaunchKernelEx, for one signature: 8-byte slots in a buffer, and the
    array of pointers to them (made once). The driver copies the values when the launch (or the graph capture)
    is made, so the buffer is refilled for the next launch; each thread has its own (_launch_cache)."""
    __slots__ = ("buf", "params", "pack")

    def __init__(self, types: tuple[type, ...]):
        import numpy as np

        n = max(1, len(types))
        self.buf = ctypes.create_string_buffer(8 * n)
        base = ctypes.addressof(self.buf)
        self.params = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self.pack = struct.Struct("<" + "".join(_SLOT[np.dtype(t).name] for t in types)).pack_into


_LAUNCH_TLS = threading.local()
_MAX_CONFIGS = 4096  # launch configurations kept per thread (prefill grids follow the step's size)


def _launch_cache() -> tuple[dict, dict]:
    """This thread's argument blocks (by argument types) and launch configurations (by grid, block,
    shared memory and stream)."""
    try:
        return _LAUNCH_TLS.blocks, _LAUNCH_TLS.configs
    except AttributeError:
        _LAUNCH_TLS.blocks, _LAUNCH_TLS.configs = {}, {}
        return _LAUNCH_TLS.blocks, _LAUNCH_TLS.configs


@functools.cache
def _driver() -> Any:
    """libcuda's cuLaunchKernelEx (CUDA 12.0+) and cuGetErrorString, through ctypes."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


@functools.cache
def _function(kernel: Any) -> int:
    """The CUfunction handle of a CuPy kernel on the current device (get_kernel makes one per device)."""
    return int(kernel.kernel.ptr)


_PSS_ATTR = _LaunchAttr(_PROGRAMMATIC_STREAM_SERIALIZATION, b"", (ctypes.c_int * 16)(1))
_PSS_ATTRS = ctypes.pointer(_PSS_ATTR)  # every PDL launch's attribute list: made once


def _launch_pdl(kernel: Any, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], stream: int,
                shared_mem: int) -> None:
    """cuLaunchKernelEx of a CuPy kernel with programmatic stream serialization allowed; `args` as launch's.

    The ctypes structures are made once per argument signature and per launch shape, and reused: making them for
    every launch cost ~42 us of host time a launch on a CPU core, against ~1.6 us reused (BENCHMARKS.md,
    fourteenth session); an eager prefill step makes four such launches a layer."""
    blocks, configs = _launch_cache()
    types = tuple(map(type, args))
    argblock = blocks.get(types)
    if argblock is None:
        argblock = blocks[types] = _ArgBlock(types)
    argblock.pack(argblock.buf, 0, *args)
    shape = (tuple(grid), tuple(block), shared_mem, stream)
    cfg = configs.get(shape)
    if cfg is None:
        if len(configs) >= _MAX_CONFIGS:
            configs.clear()
        g, b = (shape[0] + (1, 1))[:3], (shape[1] + (1, 1))[:3]
        cfg = configs[shape] = _LaunchConfig((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem, stream,
                                             _PSS_ATTRS, 1)
    lib = _driver()
    rc = lib.cuLaunchKernelEx(ctypes.byref(cfg), _function(kernel), argblock.params, None)
    if rc:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"CUDA error {rc}: {(msg.value or b'?').decode()}")


def launch(
    kernel: Any,
    grid: Sequence[int],
    block: Sequence[int],
    args: Sequence[Any],
    device: torch.device,
    shared_mem: int = 0,
) -> None:
    """Launch on torch's current stream of `device` (so CUDA-graph capture records it); PDL_KERNELS with
    programmatic stream serialization where pdl_on.

    `args` are built with `ptr`, `i32`, `i64` and `f32` so each one has the C type the kernel declares.
    """
    cupy = _cupy()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw_stream = torch.cuda.current_stream(idx).cuda_stream
    try:
        with cupy.cuda.Device(idx):
            if getattr(kernel, "name", None) in PDL_KERNELS and pdl_on(idx):
                _launch_pdl(kernel, grid, block, args, raw_stream, shared_mem)
            else:
                kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem,
                       stream=_external_stream(raw_stream, idx))
    except (cupy.cuda.driver.CUDADriverError, RuntimeError) as e:
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
