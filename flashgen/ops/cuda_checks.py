"""What every CUDA wrapper shares: the argument checks that refuse a bad call with a ValueError naming the
argument and its value (before anything is launched), and the device queries the launch shapes depend on.

Importing this module needs neither CuPy nor a GPU.
"""
from __future__ import annotations

import functools
import math
from typing import NoReturn

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what the kernels run in: models.spec.DTYPES less float32


# ---------------------------------------------------------------- argument checks
def fail(name: str, what: str, value) -> NoReturn:
    raise ValueError(f"{name} {what}, got {value}")


def choose(name: str, value: str, choices: tuple[str, ...]) -> str:
    """value when it is one of choices; else a ValueError naming where it came from (an argument or an
    environment variable), the value and the choices."""
    if value not in choices:
        fail(name, f"must be one of {', '.join(choices)}", repr(value))
    return value


def check_tensor(name: str, t, dtypes=None, ndim: int | None = None, device: torch.device | None = None,
                 contiguous: bool = True, align: int = 16) -> None:
    if not isinstance(t, torch.Tensor):
        fail(name, "must be a torch.Tensor", type(t).__name__)
    if not t.is_cuda:
        fail(name, "must be a CUDA tensor", f"device {t.device}")
    if device is not None and t.device != device:
        fail(name, f"must be on {device} like the other arguments", f"device {t.device}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(name, f"must have dtype {' or '.join(str(d) for d in dtypes)}", t.dtype)
    if ndim is not None and t.dim() != ndim:
        fail(name, f"must have {ndim} dimensions", f"shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        fail(name, "must be contiguous", f"strides {t.stride()} for shape {tuple(t.shape)}")
    if t.numel() and t.data_ptr() % align:  # the kernels use 16-byte vector accesses
        fail(name, f"must start at a {align}-byte aligned address", f"address {t.data_ptr():#x}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        fail(name, f"must have shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def check_out(out, like_shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out"):
    if out is None:
        return None
    check_tensor(name, out, (dtype,), device=device)
    check_shape(name, out, like_shape)
    return out


def check_cache(k_cache, v_cache, dtype, device) -> tuple[int, int, int]:
    """A paged cache in the activation dtype, or an FP8 one (float8_e4m3fn; see kernels/fp8.cuh), or the int8k
    one (int8 K with float8_e4m3fn V, a scale per token and kv head: is_int8k)."""
    check_tensor("k_cache", k_cache, (dtype, torch.float8_e4m3fn, torch.int8), 4, device)
    if k_cache.dtype == torch.int8:  # the int8k cache: int8 K goes with e4m3 V only
        check_tensor("v_cache", v_cache, (torch.float8_e4m3fn,), 4, device)
    else:
        check_tensor("v_cache", v_cache, (k_cache.dtype,), 4, device)
    if k_cache.shape != v_cache.shape:
        fail("v_cache", f"must have k_cache's shape {tuple(k_cache.shape)}", f"shape {tuple(v_cache.shape)}")
    _, bs, hkv, d = k_cache.shape
    if bs < 16 or bs & (bs - 1):
        fail("k_cache", "block size (dim 1) must be a power of two >= 16", bs)
    return bs, hkv, d


def check_kv_scale(name: str, scale: float | torch.Tensor, fp8: bool) -> float:
    """An FP8 cache's scale: a positive finite float (1.0, and ignored, for other caches; a tensor scale is the
    int8k cache's, which check_kv_scales takes and refuses for any other cache)."""
    if not fp8:
        return 1.0
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        fail(name, "must be a positive finite number (the FP8 cache stores x / scale)", scale)
    return scale


def is_int8k(k_cache: torch.Tensor) -> bool:
    """Whether a (checked) cache is the int8k one: int8 K, float8_e4m3fn V, float32 scales per token and kv head
    (kernels/fp8.cuh)."""
    return k_cache.dtype == torch.int8


def check_kv_scales(k_cache: torch.Tensor, k_scale, v_scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8k cache's scales (is_int8k): k_scale and v_scale must be float32 tensors of shape
    k_cache.shape[:3] = (num_blocks, block_size, Hkv), contiguous, on the cache's device; returned as they are.
    Any other cache: None, after refusing tensor scales (they go with an int8 K cache only; its float scales are
    checked by check_kv_scale)."""
    int8k = is_int8k(k_cache)
    shape = tuple(k_cache.shape[:3])
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if int8k and not isinstance(scale, torch.Tensor):
            fail(name, f"must be a float32 tensor of shape {shape} (one scale per cached token and kv head) with an "
                 "int8 k_cache (the int8k cache)", repr(scale))
        if not int8k and isinstance(scale, torch.Tensor):
            fail(name, "is a tensor: per-token scales go with an int8 k_cache (the int8k cache: int8 K, "
                 f"float8_e4m3fn V) only; a {k_cache.dtype} cache takes a float",
                 f"a tensor of shape {tuple(scale.shape)}")
        if int8k:
            check_tensor(name, scale, (torch.float32,), 3, k_cache.device, align=4)
            check_shape(name, scale, shape)
    return (k_scale, v_scale) if int8k else None


def kv_kernel_variant(k_cache: torch.Tensor, k_scale, v_scale, int8k: tuple | None
                      ) -> tuple[tuple[tuple[str, int], ...], float, float]:
    """The cache's kernel variant for rope_kv_append and decode attention: (defines, K scale, V scale as floats).
    FG_KV_FP8=2 for the int8k cache (`int8k`: check_kv_scales' tensors, which carry the scales: the floats are
    1.0), FG_KV_FP8=1 for an FP8 cache (its float scales checked), none for the activation dtype (1.0, 1.0)."""
    if int8k is not None:
        return (("FG_KV_FP8", 2),), 1.0, 1.0
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    return ((("FG_KV_FP8", 1),) if fp8 else ()), check_kv_scale("k_scale", k_scale, fp8), \
        check_kv_scale("v_scale", v_scale, fp8)


def check_block_tables(block_tables, batch: int, device) -> None:
    check_tensor("block_tables", block_tables, (torch.int32,), 2, device, contiguous=False, align=4)
    if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        fail("block_tables", f"must be ({batch}, max_blocks) with contiguous rows",
             f"shape {tuple(block_tables.shape)} strides {block_tables.stride()}")


# ---------------------------------------------------------------- device queries
def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
