"""The CUDA backend's `moe`: the experts as two grouped GEMMs (torch._grouped_mm), no host sync.

The routing, the sort by expert, the gather of each pair's token, the weighting and the scatter back are the
reference's (flashgen/ops/torch_moe.py: sort_by_expert, combine), except at decode sizes (fused_route_ok: up to
FUSED_ROUTE_MAX_TOKENS tokens on a CUDA device), where kernels/moe_route.cu does the routing and sort in one kernel
and the combine in another (the same experts, order and weights; the combine sums in float32), and SiLU-and-multiply
is one kernel: ~20 torch ops, each a CUDA-graph node of a few microseconds, took about as long as the GEMMs of one
token. The experts' GEMMs differ throughout. Instead of one
GEMM pair per active expert, sized on the host from the per-expert counts (the loop's host sync), each of the two
projections is one grouped GEMM over every expert: torch._grouped_mm (CUTLASS's grouped kernel on SM90 / SM100)
with the (T * top_k, K) gathered rows, the (E, K, N) stacked weights and the groups' int32 end offsets, which a
searchsorted on the sorted expert ids computes on the device. Nothing reads a tensor on the host and every shape
follows from T and top_k, so a MoE decode step can be captured in a CUDA graph. Empty experts are empty groups.

Why torch._grouped_mm and not a kernel of ours: it is maintained with torch, reads the offsets on the device,
takes our stored layouts as they are (transposed views, no copy), and its tile shapes are tuned for Hopper. It is
a private torch API (the leading underscore), so it is used behind a check (moe_impl), and the loop stays the
fallback. Its fast path, the one that does not sync, needs all of:
  - bfloat16 operands and output (float16 and float32 are accepted but run torch's fallback, a per-group loop that
    copies the offsets to the host: no better than our loop and not capturable, so they run the loop);
  - a CUDA device of compute capability 9.x or 10.x (elsewhere torch takes the same syncing fallback);
  - each operand's contiguous dimension 1 and its other stride a multiple of 16 bytes, data 16-byte aligned:
    hidden and intermediate sizes multiples of 8 in bfloat16 (the loader's stacked weights are contiguous and
    fresh allocations are aligned; the transposed views put K innermost, the layout the kernel reads best);
  - fewer than 1024 groups (experts).
On the CPU (torch 2.13's build at least) the same op runs through the fallback in float32, bfloat16 and float16,
which is how the CPU tests compare this path with the loop (they skip where a torch lacks it).

FLASHGEN_MOE=loop forces the per-expert loop (A/B measurements); FLASHGEN_MOE=grouped (the default) takes the
grouped GEMMs wherever the checks above pass. flashgen.engine.model_runner asks moe_impl whether every MoE layer
takes the grouped path before it captures decode graphs.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from flashgen.ops import jit
from flashgen.ops.cuda_checks import KERNEL_DTYPES, check_shape, check_tensor, device_index, fail
from flashgen.ops.cuda_elementwise import silu_mul
from flashgen.ops.torch_moe import check_shapes, combine, sort_by_expert
from flashgen.ops.torch_moe import moe as moe_loop

MOE_IMPLS = ("grouped", "loop")
GROUPED_DTYPES = (torch.bfloat16,)   # the dtypes of torch._grouped_mm's CUDA fast path
GROUPED_ARCHS = (9, 10)              # compute capability majors of that fast path
GROUPED_MAX_EXPERTS = 1023           # the kernel takes fewer than 1024 groups
# kernels/moe_route.cu's limits: one CTA routes a decode step's tokens (prefill keeps torch_moe's ops), a lane holds
# E / 32 router probabilities, lane j keeps a token's j-th choice
FUSED_ROUTE_MAX_TOKENS, FUSED_ROUTE_MAX_EXPERTS, FUSED_ROUTE_MAX_TOP_K = 256, 512, 32
ROUTE_THREADS = 1024                 # moe_route_kernel's block (MR_THREADS)


def has_grouped_mm() -> bool:
    return callable(getattr(torch, "_grouped_mm", None))


@functools.cache
def _arch(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def grouped_unsupported(dtype: torch.dtype, gate_up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why the grouped path cannot run a layer with these expert weights and activations of `dtype` on the
    device without a host sync, or None when it can."""
    if not has_grouped_mm():
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if gate_up.device.type != "cuda":
        return "the experts are not on a CUDA device"
    if not (dtype == gate_up.dtype == down.dtype) or dtype not in GROUPED_DTYPES:
        return (f"torch._grouped_mm runs bfloat16 only without a host sync (activations {dtype}, experts "
                f"{gate_up.dtype})")
    index = gate_up.device.index if gate_up.device.index is not None else torch.cuda.current_device()
    if _arch(index) not in GROUPED_ARCHS:
        return f"torch._grouped_mm's grouped kernel needs compute capability 9.x or 10.x (this GPU: {_arch(index)}.x)"
    if gate_up.shape[0] > GROUPED_MAX_EXPERTS:
        return f"{gate_up.shape[0]} experts; torch._grouped_mm takes at most {GROUPED_MAX_EXPERTS} groups"
    align = 16 // gate_up.element_size()
    hidden, inter = gate_up.shape[2], down.shape[2]
    if hidden % align or inter % align:
        return f"hidden size {hidden} and expert width {inter} must be multiples of {align} (16-byte rows)"
    if not (gate_up.is_contiguous() and down.is_contiguous()):
        return "the stacked expert weights are not contiguous"
    if gate_up.data_ptr() % 16 or down.data_ptr() % 16:
        return "the stacked expert weights are not 16-byte aligned"
    return None


def moe_impl(dtype: torch.dtype, gate_up: torch.Tensor, down: torch.Tensor) -> str:
    """"grouped" or "loop": what the CUDA backend's moe runs for activations of `dtype` with these expert weights
    ($FLASHGEN_MOE, then grouped_unsupported)."""
    want = os.environ.get("FLASHGEN_MOE", "grouped")
    if want not in MOE_IMPLS:
        raise ValueError(f"FLASHGEN_MOE={want!r}: use one of {', '.join(MOE_IMPLS)}")
    if want == "loop" or grouped_unsupported(dtype, gate_up, down) is not None:
        return "loop"
    return "grouped"


def fused_route_ok(x: torch.Tensor, router: torch.Tensor, top_k: int) -> bool:
    """Whether moe_grouped routes and combines with kernels/moe_route.cu (decode sizes on a CUDA device) rather than
    torch_moe's ops; $FLASHGEN_MOE_ROUTE=torch keeps the torch ops (A/B measurements)."""
    want = os.environ.get("FLASHGEN_MOE_ROUTE", "fused")
    if want not in ("fused", "torch"):
        raise ValueError(f"FLASHGEN_MOE_ROUTE={want!r}: use fused or torch")
    return (want == "fused" and x.is_cuda and x.dtype in KERNEL_DTYPES and x.dtype == router.dtype
            and 0 < x.shape[0] <= FUSED_ROUTE_MAX_TOKENS and router.shape[0] <= FUSED_ROUTE_MAX_EXPERTS
            and top_k <= FUSED_ROUTE_MAX_TOP_K and x.shape[1] % 8 == 0)


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch_moe's route + sort_by_expert in one kernel (kernels/moe_route.cu) from the router logits (T, E) in the
    activation dtype -> (offs (E,) int32 group end offsets, tokens (P,) int64 and weights (P,) float32 of the pairs
    sorted by expert (tokens ascending within one), pos (P,) int32 the sorted position of pair t * top_k + j,
    weights_tk (P,) float32 the weight of pair t * top_k + j). T <= FUSED_ROUTE_MAX_TOKENS, E <=
    FUSED_ROUTE_MAX_EXPERTS, top_k <= FUSED_ROUTE_MAX_TOP_K. No host sync."""
    check_tensor("logits", logits, KERNEL_DTYPES, 2, align=2)
    T, E = logits.shape
    if not 0 < T <= FUSED_ROUTE_MAX_TOKENS:
        fail("logits", f"must have 1 to {FUSED_ROUTE_MAX_TOKENS} rows (tokens)", f"shape {tuple(logits.shape)}")
    if not 0 < E <= FUSED_ROUTE_MAX_EXPERTS:
        fail("logits", f"must have 1 to {FUSED_ROUTE_MAX_EXPERTS} columns (experts)", f"shape {tuple(logits.shape)}")
    if not 0 < top_k <= min(E, FUSED_ROUTE_MAX_TOP_K):
        fail("top_k", f"must be in [1, {min(E, FUSED_ROUTE_MAX_TOP_K)}]", top_k)
    dev, P = logits.device, T * top_k
    i32 = torch.int32
    experts_tk = torch.empty(P, dtype=i32, device=dev)
    weights_tk = torch.empty(P, dtype=torch.float32, device=dev)
    offs = torch.empty(E, dtype=i32, device=dev)
    tokens = torch.empty(P, dtype=torch.int64, device=dev)
    weights = torch.empty(P, dtype=torch.float32, device=dev)
    pos = torch.empty(P, dtype=i32, device=dev)
    kern = jit.get_kernel("moe_route.cu", "moe_route_kernel", logits.dtype, 0, device_index(logits))
    jit.launch(kern, (1,), (ROUTE_THREADS,), (
        jit.ptr(logits), jit.i32(T), jit.i32(E), jit.i32(top_k), jit.i32(int(renormalize)), jit.ptr(experts_tk),
        jit.ptr(weights_tk), jit.ptr(offs), jit.ptr(tokens), jit.ptr(weights), jit.ptr(pos)), dev)
    return offs, tokens, weights, pos, weights_tk


def moe_combine(ys: torch.Tensor, pos: torch.Tensor, weights_tk: torch.Tensor, T: int, top_k: int) -> torch.Tensor:
    """torch_moe.combine from moe_route's pair positions: out[t] = sum_j dtype(ys[pos[t * top_k + j]] * weight), the
    products rounded to the dtype as combine rounds them, summed in float32 and rounded once (kernels/moe_route.cu)
    -> (T, H). ys (P, H) in sorted pair order, H a multiple of 8."""
    check_tensor("ys", ys, KERNEL_DTYPES, 2)
    P, H = ys.shape
    if P != T * top_k or H % 8:
        fail("ys", f"must be ({T * top_k}, H) with H a multiple of 8", f"shape {tuple(ys.shape)}")
    check_tensor("pos", pos, (torch.int32,), 1, ys.device, align=4)
    check_shape("pos", pos, (P,))
    check_tensor("weights_tk", weights_tk, (torch.float32,), 1, ys.device, align=4)
    check_shape("weights_tk", weights_tk, (P,))
    out = torch.empty((T, H), dtype=ys.dtype, device=ys.device)
    kern = jit.get_kernel("moe_route.cu", "moe_combine_kernel", ys.dtype, 0, device_index(ys))
    threads = min(256, -(-H // 8 // 32) * 32)
    jit.launch(kern, (T,), (threads,), (jit.ptr(ys), jit.ptr(pos), jit.ptr(weights_tk), jit.ptr(out), jit.i32(H),
                                        jit.i32(top_k)), ys.device)
    return out


def moe_grouped(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                renormalize: bool) -> torch.Tensor:
    """ops.moe (the contract of flashgen/ops/torch_moe.py's moe) through torch._grouped_mm: two grouped GEMMs
    over the expert-sorted pairs, on whatever device and dtype torch._grouped_mm takes (on the CPU through its
    fallback, for tests). No host sync where its fast path runs (see grouped_unsupported). At decode sizes on a
    CUDA device (fused_route_ok) the routing, the sort and the combine are kernels/moe_route.cu's two kernels and
    SiLU-and-multiply is one kernel, instead of ~20 torch ops around the GEMMs."""
    check_shapes(x, router, gate_up, down, top_k)
    E = router.shape[0]
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if fused_route_ok(x, router, top_k):
        offs, tokens, _, pos, weights_tk = moe_route(F.linear(x, router), top_k, renormalize)
        h = torch._grouped_mm(x.index_select(0, tokens), gate_up.transpose(1, 2), offs=offs)  # (P, 2 I)
        ys = torch._grouped_mm(silu_mul(h), down.transpose(1, 2), offs=offs)                   # (P, H)
        return moe_combine(ys, pos, weights_tk, x.shape[0], top_k)
    experts, tokens, weights = sort_by_expert(x, router, top_k, renormalize)
    # group e is the pairs routed to expert e: rows offs[e-1] .. offs[e] (empty where none)
    ends = torch.arange(1, E + 1, device=x.device, dtype=experts.dtype)
    offs = torch.searchsorted(experts, ends, out_int32=True)
    xs = x.index_select(0, tokens)                                       # (T * top_k, H), expert by expert
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)        # (T * top_k, 2 I)
    gate, up = h.chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # (T * top_k, H)
    return combine(x, tokens, ys, weights)


def moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
        renormalize: bool) -> torch.Tensor:
    """ops.moe on the GPU: the grouped GEMMs where moe_impl says so, else the per-expert loop."""
    if moe_impl(x.dtype, gate_up, down) == "grouped":
        return moe_grouped(x, router, gate_up, down, top_k, renormalize)
    return moe_loop(x, router, gate_up, down, top_k, renormalize)
