"""Tensor maps for Hopper's TMA (the tensor memory accelerator), built with the CUDA driver's
cuTensorMapEncodeTiled and kept in device memory, where a kernel's cp.async.bulk.tensor reads them.

A map describes one tensor's geometry and address (at most 5 dimensions, strides in bytes, a multiple of 16) and
the box one copy moves into shared memory, with the shared-memory swizzle. The driver is reached through
ctypes (libcuda.so.1, which every CUDA machine has): neither torch nor CuPy exposes this call.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

# cuda.h enums (CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion)
_DT_UINT16 = 1  # the kernels only move the bits: one type serves bfloat16 and float16
SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_MAP_BYTES = 128  # CU_TENSOR_MAP_NUM_QWORDS * 8
_MAX_MAPS = 1024  # two per layer of the largest models, with room for tests and benchmarks

_LOCK = threading.Lock()
_MAPS: OrderedDict[tuple, torch.Tensor] = OrderedDict()


@functools.cache
def _encode_fn():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"TMA maps need the CUDA driver library libcuda.so.1, which did not load: {e}") from e
    fn = getattr(lib, "cuTensorMapEncodeTiled", None)
    if fn is None:
        raise RuntimeError("this CUDA driver has no cuTensorMapEncodeTiled (TMA needs a CUDA 12 driver or newer)")
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def encode_tiled(address: int, dims: Sequence[int], strides: Sequence[int], box: Sequence[int],
                 swizzle: int = SWIZZLE_128B) -> bytes:
    """The 128-byte map of a tensor of 2-byte elements at `address`: `dims` innermost first, `strides` in
    bytes of dims[1:], `box` the elements one copy moves along each dimension."""
    rank = len(dims)
    if not (len(strides) == rank - 1 and len(box) == rank and 1 <= rank <= 5):
        raise ValueError(f"tensor map: dims {dims}, strides {strides} and box {box} do not fit one rank")
    buf = (ctypes.c_uint8 * (_MAP_BYTES + 64))()  # the map must sit on a 64-byte boundary
    base = ctypes.addressof(buf)
    aligned = (base + 63) & ~63
    arr64, arr32 = ctypes.c_uint64 * rank, ctypes.c_uint32 * rank
    rc = _encode_fn()(ctypes.c_void_p(aligned), _DT_UINT16, rank, ctypes.c_void_p(address), arr64(*dims),
                      (ctypes.c_uint64 * max(rank - 1, 1))(*strides), arr32(*box), arr32(*([1] * rank)), 0, swizzle,
                      _L2_PROMOTION_256B, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} (dims {list(dims)}, strides "
                           f"{list(strides)}, box {list(box)}, address {address:#x})")
    return bytes(buf)[aligned - base:aligned - base + _MAP_BYTES]


def paged_cache_map(cache: torch.Tensor, rows_per_box: int) -> torch.Tensor:
    """The device-resident map of a paged KV cache (num_blocks, block_size, kv_heads, head_dim) seen as a 3-D
    tensor (head_dim, kv_heads, token rows); one box is 64 columns of one kv head over `rows_per_box` rows,
    128-byte swizzled (kernels/wgmma.cuh's layout). Maps are cached per (address, geometry): building one
    copies 128 bytes to the device, which a CUDA-graph capture cannot do, so the first call for a cache must
    come before any capture."""
    nb, bs, hkv, d = cache.shape
    key = (cache.device, cache.data_ptr(), nb, bs, hkv, d, rows_per_box)
    with _LOCK:
        m = _MAPS.get(key)
        if m is not None:
            _MAPS.move_to_end(key)
            return m
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the TMA map of this KV cache does not exist yet and cannot be built during a CUDA-graph "
                           "capture: run the prefill once eagerly first")
    raw = encode_tiled(cache.data_ptr(), (d, hkv, nb * bs), (d * 2, hkv * d * 2), (64, 1, rows_per_box))
    m = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(cache.device)
    with _LOCK:
        _MAPS[key] = m
        while len(_MAPS) > _MAX_MAPS:
            _MAPS.popitem(last=False)
    return m
