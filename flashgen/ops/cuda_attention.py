"""CUDA backend, paged attention: varlen causal prefill (kernels/prefill_attention.cu on any sm_80+ GPU,
kernels/prefill_attention_sm90.cu with wgmma and TMA on Hopper) and one-token decode
(kernels/decode_attention.cu), with the choices behind each launch (prefill kernel and tile, decode splits and
plan) and the merge counters of the kernels whose last CTA merges the others' partials (gumbel_argmax uses
them too).

Importing this module needs neither CuPy nor a GPU; calling an op does.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from flashgen.ops import jit, tma
from flashgen.ops.backend import SharedPrefix
from flashgen.ops.cuda_checks import (
    KERNEL_DTYPES,
    check_block_tables,
    check_cache,
    check_kv_scale,
    check_kv_scales,
    check_out,
    check_shape,
    check_tensor,
    choose,
    device_index,
    fail,
    kv_kernel_variant,
    num_sms,
)

ATTN_HEAD_DIMS = (64, 128, 256)
# prefill tiles per head_dim: (16-row m-tiles per warp, keys per tile); kernels/prefill_attention.cu. At head_dim
# 256 only (1, 32) fits the registers (Q's fragments and O for 16 rows x 256 dims take 192 per thread; ptxas spills
# with 64 keys per tile or 2 m-tiles per warp): 64 KB of shared memory, 64 query rows per CTA
PREFILL_TILES = {64: (2, 64), 128: (2, 64), 256: (1, 32)}
PREFILL_TILE_CHOICES = ((1, 64), (1, 32), (2, 32), (2, 64))
# the tiles the mma kernel is built with per head_dim (the choices `tile=` takes): all at 64 and 128
PREFILL_TILE_CHOICES_BY_DIM = {64: PREFILL_TILE_CHOICES, 128: PREFILL_TILE_CHOICES, 256: ((1, 32),)}
# prefill kernels: "wgmma" (kernels/prefill_attention_sm90.cu, Hopper only) and "mma" (prefill_attention.cu,
# any sm_80+ GPU); FLASHGEN_PREFILL=auto|wgmma|mma, auto = wgmma where the GPU has it
PREFILL_IMPLS = ("wgmma", "mma")
WGMMA_ARCH = "sm_90"  # the architecture with wgmma (built for its arch-specific target, sm_90a)
# head dims of the wgmma kernel. Not 256: its scheme (128-row Q and 128-key K/V tiles, 2 slots each, O of 64 rows x
# D per consumer warpgroup in registers) would need 385 KB of shared memory and 128 registers per thread for O
# alone at D = 256; head_dim 256 runs on the mma kernel on Hopper too (prefill_attention routes it there)
PREFILL_SM90_HEAD_DIMS = (64, 128)
PREFILL_SM90_SMEM = {d: 128 * d * 2 * 6 + 1024 for d in PREFILL_SM90_HEAD_DIMS}  # 2 Q + 2 K + 2 V slots + alignment
DECODE_MAX_SPLITS = 256
# the shared part of a shared-prefix decode step: on a cache in the model's dtype "prefill" (the default):
# prefill_attention.cu built with PF_SHARED=1 and these tiles (64 query rows per CTA: a K/V tile serves 64 query
# heads, where the decode kernel's serves 8); or "decode": the decode kernel with the members as query heads, what
# FP8 and int8k caches always take. FLASHGEN_SHARED_KERNEL=decode picks the latter (A/B; BENCHMARKS.md, 7th session)
SHARED_TILES = {64: (1, 64), 128: (1, 64), 256: (1, 32)}
SHARED_KERNELS = ("decode", "prefill")
# its key splits: one per 512 shared tokens (8 key tiles), at most 8 (shared_splits)
SHARED_SPLIT_KEYS = 512
SHARED_MAX_SPLITS = 8
DECODE_PLANS = ("auto", "split", "balanced", "warp")  # kernels/decode_attention.cu: plan 0, 1, 2, 3
WARP_PLAN_MAX_D = 128  # the warp plan is compiled for head_dim 64 and 128 (FG_WARP_PLAN); larger ones take auto
# auto takes the warp plan where it measured ahead (BENCHMARKS.md, "Where the warp plan wins"): no sequence attends
# to more than WARP_AUTO_MAX_CONTEXT tokens (past its group's shared blocks) and the batch gives every SM at least
# WARP_AUTO_PAIRS_PER_SM (sequence, kv head, 8 query heads) pairs, one warp each; longer contexts make one warp's
# walk the launch's critical path, fewer pairs leave the SMs short of warps
WARP_AUTO_MAX_CONTEXT = 512
WARP_AUTO_PAIRS_PER_SM = 12
INT8K_V_MAX = 448.0  # the int8k cache's V: s = amax / 448; decode multiplies p by s * 448, the output by 1 / 448


def _check_window(window) -> int:
    """A sliding window (the query at position p sees keys in (p - window, p]; 0: none) as an int >= 0."""
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < 1 << 31:
        fail("window", "must be an int >= 0 (0: no sliding window)", window)
    return int(window)


def _check_attn(q, k_cache, v_cache, dev):
    bs, hkv, d = check_cache(k_cache, v_cache, q.dtype, dev)
    if d not in ATTN_HEAD_DIMS:
        fail("k_cache", f"head_dim (dim 3) must be one of {ATTN_HEAD_DIMS}", d)
    if q.shape[2] != d:
        fail("q", f"must have head_dim {d} like k_cache", f"shape {tuple(q.shape)}")
    hq = q.shape[1]
    if hq == 0 or hq % hkv:
        fail("q", f"must have a number of heads that is a multiple of num_kv_heads {hkv}", f"shape {tuple(q.shape)}")
    return bs, hkv, d, hq


def prefill_smem_bytes(head_dim: int, tile: tuple[int, int]) -> int:
    mt, bn = tile
    q_tile = 64 * mt * head_dim * 2 if mt == 2 else 0  # MT == 1 stages Q in stage 1's buffers
    return q_tile + 4 * bn * head_dim * 2  # + 2 stages x (K + V)


def _tile_choice(tile: tuple[int, int] | list[int], head_dim: int) -> tuple[int, int]:
    """`tile` (a tuple or list) as the entry of PREFILL_TILE_CHOICES_BY_DIM[head_dim] it equals; a ValueError if
    none."""
    choices = PREFILL_TILE_CHOICES_BY_DIM[head_dim]
    for choice in choices:
        if choice == tuple(tile):
            return choice
    fail("tile", f"must be one of {choices} at head_dim {head_dim}", tile)


def prefill_impl(device_index: int) -> str:
    """The prefill kernel used on a device: $FLASHGEN_PREFILL (auto, wgmma or mma); auto picks wgmma on
    Hopper (compute capability 9.0) and mma elsewhere."""
    choice = choose("FLASHGEN_PREFILL", os.environ.get("FLASHGEN_PREFILL", "auto"), ("auto", *PREFILL_IMPLS))
    if choice == "auto":
        return "wgmma" if jit.device_arch(device_index) == WGMMA_ARCH and device_index not in _WGMMA_FAILED else "mma"
    return choice


_WGMMA_FAILED: dict[int, str] = {}  # device -> why the sm_90a build failed (auto then falls back to mma)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor, max_seqlen_q: int,
                      softmax_scale: float, k_scale: float | torch.Tensor = 1.0,
                      v_scale: float | torch.Tensor = 1.0, window: int = 0, *, out: torch.Tensor | None = None,
                      tile: tuple[int, int] | None = None, impl: str | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged cache. q (total_q, Hq, D); sequence b owns q rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and attends to its first context_lens[b] cached tokens (its new tokens
    included), the mask aligned bottom-right; needs context_lens[b] >= q_len_b and max_seqlen_q >= every
    q_len_b. Returns (total_q, Hq, D). `impl` picks the kernel (PREFILL_IMPLS; default prefill_impl());
    `tile` the mma kernel's (m-tiles per warp, keys per tile) (PREFILL_TILE_CHOICES_BY_DIM; for benchmarks).
    Head_dim 256 always runs on the mma kernel (the wgmma kernel takes PREFILL_SM90_HEAD_DIMS): impl=None or
    $FLASHGEN_PREFILL=wgmma route it there, an explicit impl='wgmma' is refused.
    An FP8 cache's pages are first dequantized (times k_scale, v_scale) into a scratch cache: see _prefill_fp8;
    so are the int8k cache's (int8 k_cache, float8_e4m3fn v_cache; k_scale and v_scale float32 tensors
    (num_blocks, block_size, Hkv), a scale per token and kv head, as rope_kv_append writes them).
    `window` > 0 (sliding-window attention, Gemma 3's local layers): the query at position p sees keys in
    (p - window, p] only; both kernels mask below the window and skip the key tiles below every row's window of
    a query block, so a long prompt costs O(window) per row. 0: full causal attention."""
    window = _check_window(window)
    check_tensor("q", q, KERNEL_DTYPES, 3)
    dev = q.device
    bs, hkv, d, hq = _check_attn(q, k_cache, v_cache, dev)
    int8k = check_kv_scales(k_cache, k_scale, v_scale)  # the int8k cache's scale tensors (else None)
    check_tensor("cu_seqlens_q", cu_seqlens_q, (torch.int32,), 1, dev, align=4)
    B = cu_seqlens_q.shape[0] - 1
    if B < 0:
        fail("cu_seqlens_q", "must have batch + 1 entries", f"shape {tuple(cu_seqlens_q.shape)}")
    check_tensor("context_lens", context_lens, (torch.int32,), 1, dev, align=4)
    check_shape("context_lens", context_lens, (B,))
    check_block_tables(block_tables, B, dev)
    max_seqlen_q = int(max_seqlen_q)
    if max_seqlen_q < 0:
        fail("max_seqlen_q", "must be >= 0", max_seqlen_q)
    out = check_out(out, tuple(q.shape), q.dtype, dev)
    if out is None:
        out = torch.empty_like(q)
    di = device_index(q)
    auto = impl is None and tile is None
    if impl is None:
        impl = "mma" if tile is not None else prefill_impl(di)
        if impl == "wgmma" and d not in PREFILL_SM90_HEAD_DIMS:
            impl = "mma"  # head_dim 256: the wgmma kernel's tiles do not fit (see PREFILL_SM90_HEAD_DIMS)
    if impl not in PREFILL_IMPLS:
        fail("impl", f"must be one of {PREFILL_IMPLS}", impl)
    mma_tile = PREFILL_TILES[d]  # the mma kernel's (m-tiles per warp, keys per tile)
    if impl == "wgmma":
        if tile is not None:
            fail("tile", "applies to the mma kernel only (impl='mma')", tile)
        if d not in PREFILL_SM90_HEAD_DIMS:
            fail("impl", f"'wgmma' takes head_dim {' or '.join(map(str, PREFILL_SM90_HEAD_DIMS))}; head_dim {d} "
                 "runs on the mma kernel (impl='mma' or None)", impl)
        arch = jit.device_arch(di)
        if arch != WGMMA_ARCH:
            fail("impl", f"'wgmma' needs a Hopper GPU ({WGMMA_ARCH}); {dev} is {arch}", impl)
    elif tile is not None:
        mma_tile = _tile_choice(tile, d)
    if not (B and max_seqlen_q and q.shape[0]):
        return out
    if int8k is not None:
        return _prefill_fp8(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                            softmax_scale, int8k[0], int8k[1], out, tile, impl, window)
    if k_cache.dtype == torch.float8_e4m3fn:
        return _prefill_fp8(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                            softmax_scale, check_kv_scale("k_scale", k_scale, True),
                            check_kv_scale("v_scale", v_scale, True), out, tile, impl, window)
    if impl == "wgmma":
        smem, block_m = PREFILL_SM90_SMEM[d], 128
        try:
            k = jit.get_kernel("prefill_attention_sm90.cu", "prefill_attention_sm90_kernel", q.dtype, d, di, smem,
                               arch_specific=True)
            # K/V tiles come by TMA, one box per page (or per 128-token tile of a longer page)
            maps = (tma.paged_cache_map(k_cache, min(bs, 128)), tma.paged_cache_map(v_cache, min(bs, 128)))
        except Exception as e:  # noqa: BLE001 - any failure of the sm_90a build: the portable kernel still works
            if not auto:
                raise
            _WGMMA_FAILED[di] = f"{type(e).__name__}: {e}"
            warnings.warn(f"flashgen: the Hopper (wgmma) prefill kernel could not be built on {dev} "
                          f"({_WGMMA_FAILED[di][:300]}); using the mma.sync kernel instead", RuntimeWarning,
                          stacklevel=2)
            return prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                                     softmax_scale, window=window, out=out, impl="mma")
    else:
        smem, block_m = prefill_smem_bytes(d, mma_tile), 64 * mma_tile[0]
        k = jit.get_kernel("prefill_attention.cu", "prefill_attention_kernel", q.dtype, d, di, smem,
                           (("PF_MT", mma_tile[0]), ("PF_BN", mma_tile[1])))
    mblocks = -(-max_seqlen_q // block_m)
    args = (jit.ptr(q), jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(cu_seqlens_q), jit.ptr(context_lens),
            jit.ptr(block_tables), jit.i32(block_tables.stride(0)), jit.ptr(out), jit.i32(hq), jit.i32(hkv),
            jit.i32(bs.bit_length() - 1), jit.f32(softmax_scale * math.log2(math.e)))
    if impl == "wgmma":
        # persistent: one CTA per SM (a producer and 2 consumer warpgroups) takes (sequence, head, m-block)
        # items from a counter in turn
        sched = split_counters(dev, 2, user="prefill")
        jit.launch(k, (min(num_sms(di), mblocks * hq * B),), (384,), (
            *args, jit.i32(B), jit.ptr(maps[0]), jit.ptr(maps[1]), jit.ptr(sched), jit.i32(window)), dev,
            shared_mem=smem)
    else:
        # grid (m-blocks, Hq, B), 4 warps
        jit.launch(k, (mblocks, hq, B), (128,), (*args, jit.i32(mblocks), jit.i32(window)), dev, shared_mem=smem)
    return out


FP8_SCRATCH_BYTES = 256 << 20  # most bytes of dequantized K + V one prefill launch reads (more: in groups)
_FP8_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # -> (K/V pages, their ids 0..pages-1)


def _prefill_fp8(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, softmax_scale,
                 k_scale: float | torch.Tensor, v_scale: float | torch.Tensor, out, tile, impl,
                 window=0) -> torch.Tensor:
    """Prefill over an FP8 cache (float scales) or the int8k cache (int8 K, e4m3 V, float32 scale tensors per
    token and kv head): the pages the batch reads are dequantized into a scratch cache of q's dtype
    (kernels/kv_fp8.cu), which the bf16/fp16 kernels then read through their own block tables; sequences go
    in groups of at most FP8_SCRATCH_BYTES of scratch. Prefill is compute-bound, so the extra pass over the
    context costs little (BENCHMARKS.md, "FP8 KV cache"); no host sync: the grid covers every page of the
    block tables and the kernel skips those past a sequence's context. The scratch is kept per device and
    geometry (its address, and so the Hopper kernel's TMA maps, stay the same from call to call). A sliding
    `window` is the kernels' (every page up to the context is dequantized all the same)."""
    dev = q.device
    nb_total, bs, hkv, d = k_cache.shape
    B, width = block_tables.shape
    page = bs * hkv * d
    group = max(1, min(B, FP8_SCRATCH_BYTES // (2 * page * q.element_size() * max(width, 1))))
    pages = group * width
    key = (dev, q.dtype, bs, hkv, d)
    entry = _FP8_SCRATCH.get(key)
    if entry is None or entry[0].shape[1] < pages:
        if entry is not None:  # the old scratch (and its TMA maps) go: rebuilt larger
            del _FP8_SCRATCH[key], entry
        entry = _FP8_SCRATCH[key] = (torch.empty((2, pages, bs, hkv, d), dtype=q.dtype, device=dev),
                                     torch.arange(pages, dtype=torch.int32, device=dev))
    buf, ids = entry
    tables = ids[:pages].view(group, width)  # sequence i of a group reads scratch pages i * width ..
    scales: tuple
    if isinstance(k_scale, torch.Tensor) and isinstance(v_scale, torch.Tensor):  # int8k: + log2(head_dim)
        name = "kv_dequant_pages_int8k_kernel"
        scales = (jit.ptr(k_scale), jit.ptr(v_scale), jit.i32(d.bit_length() - 1))
    else:
        name, scales = "kv_dequant_pages_kernel", (jit.f32(float(k_scale)), jit.f32(float(v_scale)))
    kern = jit.get_kernel("kv_fp8.cu", name, q.dtype, d, device_index(q))
    for g0 in range(0, B, group):
        n = min(group, B - g0)
        bt, ctx = block_tables[g0:g0 + n], context_lens[g0:g0 + n]
        jit.launch(kern, (width, n), (256,), (
            jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(buf[0]), jit.ptr(buf[1]), jit.ptr(bt),
            jit.i32(block_tables.stride(0)), jit.ptr(ctx), jit.i32(width), jit.i32(bs.bit_length() - 1),
            jit.i32(page), *scales), dev)
        prefill_attention(q, buf[0], buf[1], cu_seqlens_q[g0:g0 + n + 1], ctx, tables[:n], max_seqlen_q,
                          softmax_scale, window=window, out=out, tile=tile, impl=impl)
    return out


_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}


def split_counters(dev: torch.device, n: int, user: str = "decode") -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last CTA merges the others' partials (decode: one per
    (sequence, kv head, group of 8 query heads); sampling: one per row) and for the persistent Hopper prefill's
    work queue (next item, CTAs done); the kernels leave them at zero again. Allocated once per device and user,
    outside any CUDA-graph capture (the eager warm-up call does it). One set per device: two launches of one
    user must not run at the same time on different streams."""
    buf = _COUNTERS.get((dev, user))
    if buf is None or buf.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{user} needs {n} split counters on {dev}; call it once with this batch outside "
                               "the CUDA-graph capture first")
        buf = _COUNTERS[(dev, user)] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=dev)
    return buf


def decode_num_splits(batch: int, hkv: int, group: int, max_context: int, num_sms: int) -> int:
    """Splits of the context so that batch x kv-head CTAs fill the GPU (2 CTAs per SM are resident): the
    fewest that give >= 90% of a whole number of waves, each split keeping >= 256 tokens."""
    ctas = batch * hkv * -(-group // 8)
    slots = 2 * num_sms
    max_splits = max(1, min(DECODE_MAX_SPLITS, max_context // 256))
    if ctas >= 4 * slots or max_splits == 1:
        return 1
    best, best_eff = 1, 0.0
    for s in range(1, max_splits + 1):
        total = ctas * s
        eff = total / (-(-total // slots) * slots)
        if total >= slots and eff >= 0.9:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def warp_min_batch(hkv: int, group: int, head_dim: int, num_sms: int) -> int | None:
    """The least batch at which auto takes the warp plan for contexts of at most WARP_AUTO_MAX_CONTEXT tokens
    (WARP_AUTO_PAIRS_PER_SM pairs per SM); None at head dims the warp plan is not compiled for."""
    if head_dim > WARP_PLAN_MAX_D:
        return None
    return -(-WARP_AUTO_PAIRS_PER_SM * num_sms // (hkv * -(-group // 8)))


def warp_auto(batch: int, max_context: int, min_batch: int | None) -> bool:
    """auto's rule for the warp plan: a batch of at least `min_batch` (warp_min_batch; None: never) whose
    sequences attend to at most WARP_AUTO_MAX_CONTEXT tokens each. The decode launch applies it, and the engine's
    decode graphs key their short-context graphs by it (engine/cuda_graphs.py)."""
    return min_batch is not None and batch >= min_batch and max_context <= WARP_AUTO_MAX_CONTEXT


def decode_plan(plan: str | None = None) -> str:
    """decode_attention's plan: the argument, else $FLASHGEN_DECODE_PLAN, else auto; checked."""
    if plan is not None:
        return choose("plan", plan, DECODE_PLANS)
    return choose("FLASHGEN_DECODE_PLAN", os.environ.get("FLASHGEN_DECODE_PLAN", "auto"), DECODE_PLANS)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, softmax_scale: float, k_scale: float | torch.Tensor = 1.0,
                     v_scale: float | torch.Tensor = 1.0, window: int = 0, shared: SharedPrefix | None = None,
                     longest: int | None = None, *, out: torch.Tensor | None = None, return_lse: bool = False,
                     num_splits: int | None = None, plan: str | None = None):
    """One new token per sequence: q (B, Hq, D) attends to the first context_lens[b] cached tokens of sequence
    b (none: zeros, LSE -inf). Returns (B, Hq, D), or with return_lse ((B, Hq, D), (B, Hq) float32 natural-log
    LSE of the scaled scores).

    The grid is num_splits CTAs per (sequence, kv head, group of 8 query heads); num_splits overrides the
    heuristic, which depends on shapes only, never on the values of context_lens, so graph capture sees a
    fixed launch. The kernel plans from context_lens how the CTAs share the work: "split" cuts every sequence
    in num_splits pieces; "balanced" lays the steps of the whole batch end to end and cuts them into one
    equal slice per CTA, so a ragged batch no longer waits on its long sequences at the end; "warp" gives each
    warp one (sequence, kv head) pair whole (head_dim 64 and 128, else auto; num_splits does not apply);
    "auto" takes "warp" when no sequence attends past WARP_AUTO_MAX_CONTEXT tokens and the batch has
    WARP_AUTO_PAIRS_PER_SM pairs per SM (warp_min_batch; num_splits not given), else "split" when the grid is
    over two waves, when the mean length is within 5% of the longest, or when the batch comes longest first and
    no piece exceeds 1.25x one resident CTA's share (the engine sorts decode batches so), else "balanced".
    `longest` is the caller's bound on the tokens one sequence attends to past its group's shared blocks (the
    engine knows each step's); without it the block tables' width is the bound (a captured graph's tables are
    as wide as the longest context the engine takes, so there the caller must say). None reads
    $FLASHGEN_DECODE_PLAN (default auto). The result depends on the shapes, `longest` and the
    context lengths only, never on timing. An FP8 cache is read as it is (k_scale folded into the softmax scale,
    v_scale into the output), and so is the int8k cache (int8 k_cache, float8_e4m3fn v_cache; k_scale and
    v_scale float32 tensors (num_blocks, block_size, Hkv), as rope_kv_append writes them: each token's K scale
    multiplies its scores, its V scale its probabilities in P.V). `window` > 0 (sliding-window attention): the
    new token (position context_lens[b] - 1) sees the last `window` cached tokens only; the kernel's steps start
    at the 16-token step holding the window's first token (the tokens below it masked) and both plans count steps
    from there, so a long context costs O(window). Not with `shared` (a ValueError: a window may end inside the
    shared blocks).

    `shared` (SharedPrefix): two launches of the kernel, the groups' shared prefixes (a group's members as the
    query heads of one sequence, q and the output addressed through q_rows) into a float32 output and LSE, then
    every sequence past its group's blocks, merging that state into `out` as it writes it (num_splits and plan
    apply to the second launch; the first takes the heuristic's)."""
    window = _check_window(window)
    if window and shared is not None:
        raise ValueError(f"decode_attention: window={window} with shared= (SharedPrefix): a sliding window and a "
                         "shared prefix do not go together (the engine turns shared-prefix decode off for models "
                         "with sliding-window layers)")
    check_tensor("q", q, KERNEL_DTYPES, 3)
    dev = q.device
    bs, hkv, d, hq = _check_attn(q, k_cache, v_cache, dev)
    int8k = check_kv_scales(k_cache, k_scale, v_scale)  # the int8k cache's scale tensors (else None)
    B = q.shape[0]
    check_tensor("context_lens", context_lens, (torch.int32,), 1, dev, align=4)
    check_shape("context_lens", context_lens, (B,))
    check_block_tables(block_tables, B, dev)
    out = check_out(out, tuple(q.shape), q.dtype, dev)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((B, hq), dtype=torch.float32, device=dev) if return_lse else None
    if not B:
        return (out, lse) if return_lse else out
    defines, ks, vs = kv_kernel_variant(k_cache, k_scale, v_scale, int8k)
    if int8k is not None:  # per-token scales in the kernel (FG_KV_FP8=2): p carries V's times 448, the output 1 / 448
        vs = 1.0 / INT8K_V_MAX
    launch = dict(defines=defines, q=q, k_cache=k_cache, v_cache=v_cache, bs=bs, hkv=hkv,
                  scale_log2=softmax_scale * ks * math.log2(math.e), v_scale=vs, kv_scales=int8k)
    if shared is None:
        _decode_launch(**launch, context_lens=context_lens, block_tables=block_tables, batch=B, hq=hq, out=out,
                       lse=lse, num_splits=num_splits, plan=plan, window=window, longest=longest)
        return (out, lse) if return_lse else out
    ng, g = _check_shared(shared, B, dev)
    on_prefill = shared_on_prefill(k_cache.dtype, q.dtype)
    splits = shared_splits(shared.tables.shape[1] * bs, d) if on_prefill else 1
    o_sh = torch.empty((splits, *q.shape), dtype=torch.float32, device=dev)
    lse_sh = torch.full((splits, B, hq), float("-inf"), dtype=torch.float32, device=dev)
    merge = (o_sh[0], lse_sh[0])

    def shared_part() -> None:
        if ng and on_prefill:
            _shared_prefill_launch(q, k_cache, v_cache, shared, bs, hkv, softmax_scale, o_sh, lse_sh)
        elif ng:
            _decode_launch(**launch, context_lens=shared.lens, block_tables=shared.tables, batch=ng, hq=g * hq,
                           out=o_sh[0], lse=lse_sh[0], num_splits=None, plan=None, q_rows=shared.q_rows, q_group=g,
                           counters="decode_shared")  # its own: it may run beside the own parts' launch

    if ng and shared_overlap():
        # the shared part on a second stream while the own parts run on this one (each writing its float32 state),
        # then merge_states_kernel; the second stream joins this one before the merge (graph capture follows both)
        o_own = torch.empty(q.shape, dtype=torch.float32, device=dev)
        lse_own = torch.empty((B, hq), dtype=torch.float32, device=dev)
        here, side = torch.cuda.current_stream(dev), _side_stream(device_index(q))
        side.wait_stream(here)
        with torch.cuda.stream(side):
            shared_part()
        _decode_launch(**launch, context_lens=shared.suffix_lens, block_tables=block_tables, batch=B, hq=hq,
                       out=o_own, lse=lse_own, num_splits=num_splits, plan=plan, bt_offset=shared.skip,
                       longest=longest)
        here.wait_stream(side)
        merge_states(o_own, lse_own, o_sh, lse_sh, out, lse)
        return (out, lse) if return_lse else out
    shared_part()
    if on_prefill:  # the variant that merges the key splits' states (FG_MERGE_N: one more argument)
        launch["defines"] = (*defines, ("FG_MERGE_N", 1), ("FG_MERGE_MAX", SHARED_MAX_SPLITS))
        merge = (o_sh, lse_sh)
    _decode_launch(**launch, context_lens=shared.suffix_lens, block_tables=block_tables, batch=B, hq=hq, out=out,
                   lse=lse, num_splits=num_splits, plan=plan, bt_offset=shared.skip, merge=merge, longest=longest)
    return (out, lse) if return_lse else out


SHARED_OVERLAP = ("auto", "0", "1")


def shared_overlap() -> bool:
    """$FLASHGEN_SHARED_OVERLAP: 1 runs a shared-prefix step's two parts side by side (the shared part on a second
    stream, the own parts on this one, then merge_states_kernel); 0 runs them one after the other, the own-part
    launch merging the shared state as it writes its output; auto (the default) side by side inside a CUDA-graph
    capture (the engine's decode graphs, where it measured 5% ahead), one after the other in an eager call (where
    the fork, the join and the third launch cost more host time than the overlap saves). Checked."""
    v = choose("FLASHGEN_SHARED_OVERLAP", os.environ.get("FLASHGEN_SHARED_OVERLAP", "auto"), SHARED_OVERLAP)
    if v == "auto":
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return v == "1"


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(di: int) -> torch.cuda.Stream:
    """The second stream of device `di` (one per device, made once)."""
    if di not in _SIDE_STREAMS:
        _SIDE_STREAMS[di] = torch.cuda.Stream(device=di)
    return _SIDE_STREAMS[di]


def merge_states(o_own: torch.Tensor, lse_own: torch.Tensor, o_sh: torch.Tensor, lse_sh: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    """kernels/merge_states.cu: the own parts' float32 state (o_own (B, Hq, D), lse_own (B, Hq) natural log) merged
    with the shared part's key splits (o_sh (S, B, Hq, D), lse_sh (S, B, Hq); LSE -inf: nothing there) into `out`
    (B, Hq, D, the activation dtype) and, when given, the merged LSE into `lse` (B, Hq)."""
    B, hq, d = o_own.shape
    entries = B * hq
    n = entries * d // 8  # threads: one per 8 dims of an entry
    if n >= 1 << 31:
        fail("o_own", "has too many entries for one merge launch (B x Hq x D / 8 must stay below 2^31)",
             tuple(o_own.shape))
    if not entries:
        return
    k = jit.get_kernel("merge_states.cu", "merge_states_kernel", out.dtype, 0, device_index(out))
    jit.launch(k, (-(-n // 256),), (256,), (
        jit.ptr(o_own), jit.ptr(lse_own), jit.ptr(o_sh), jit.ptr(lse_sh), jit.i32(o_sh.shape[0]), jit.i32(entries),
        jit.i32(d), jit.ptr(out), jit.ptr(lse)), out.device)


def shared_kernel() -> str:
    """The kernel of a shared-prefix step's shared part on a cache in the model's dtype: $FLASHGEN_SHARED_KERNEL
    (prefill, the default, or decode); checked."""
    return choose("FLASHGEN_SHARED_KERNEL", os.environ.get("FLASHGEN_SHARED_KERNEL", "prefill"), SHARED_KERNELS)


def shared_on_prefill(kv_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a shared-prefix step's shared part runs on the PF_SHARED kernel (with its wide groups): a cache in
    the model's dtype and $FLASHGEN_SHARED_KERNEL=prefill (the default)."""
    return kv_dtype == dtype and shared_kernel() == "prefill"


def shared_split_keys() -> int:
    """Shared tokens per PF_SHARED key split: SHARED_SPLIT_KEYS, or $FLASHGEN_SHARED_SPLIT_KEYS (A/B
    measurements: a multiple of 64, the kernel's key tile, from 64 to 8,192)."""
    forced = os.environ.get("FLASHGEN_SHARED_SPLIT_KEYS")
    if not forced:
        return SHARED_SPLIT_KEYS
    if not (forced.isdigit() and 64 <= int(forced) <= 8192 and int(forced) % 64 == 0):
        fail("FLASHGEN_SHARED_SPLIT_KEYS", "must be a multiple of 64 in [64, 8192]", repr(forced))
    return int(forced)


def shared_splits(max_shared: int, head_dim: int) -> int:
    """Key splits in the PF_SHARED kernel's grid for shared prefixes of up to `max_shared` tokens (shapes only, so
    a captured graph sees a fixed grid): one per shared_split_keys() tokens, at most SHARED_MAX_SPLITS; one at
    head_dim 256 (the kernel's variant takes none). In the kernel each group takes one split per those tokens
    of its own shared prefix, at most these, so a short prefix in a graph's wide block tables does not run eight
    splits of a tile or two each. $FLASHGEN_SHARED_SPLITS overrides the grid's (A/B measurements)."""
    keys = shared_split_keys()  # both variables checked whatever the head_dim: no bad value passes unseen
    forced = os.environ.get("FLASHGEN_SHARED_SPLITS")
    if forced:
        if not (forced.isdigit() and 1 <= int(forced) <= SHARED_MAX_SPLITS):
            fail("FLASHGEN_SHARED_SPLITS", f"must be a whole number in [1, {SHARED_MAX_SPLITS}]", repr(forced))
    if head_dim == 256:
        return 1
    if forced:
        return int(forced)
    return max(1, min(SHARED_MAX_SPLITS, max_shared // keys))


def _shared_prefill_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shared: SharedPrefix,
                           bs: int, hkv: int, softmax_scale: float, o_sh: torch.Tensor, lse_sh: torch.Tensor) -> None:
    """The groups' shared prefixes on prefill_attention.cu's PF_SHARED kernel: grid (row blocks x key splits,
    Hkv, groups), each CTA 64 (member, query head) rows of one kv head over one run of its group's shared key
    tiles, no causal mask, writing the float32 output and natural-log LSE of its members' rows into its split's
    o_sh / lse_sh (splits, B, Hq, ...) (the kernel's top comment)."""
    ng, g = shared.q_rows.shape
    splits, B, hq, d = o_sh.shape
    mt, bn = SHARED_TILES[d]
    di = device_index(q)
    smem = prefill_smem_bytes(d, (mt, bn))
    k = jit.get_kernel("prefill_attention.cu", "prefill_attention_kernel", q.dtype, d, di, smem,
                       (("PF_MT", mt), ("PF_BN", bn), ("PF_SHARED", 1), ("PF_SPLIT_KEYS", shared_split_keys())))
    mblocks = -(-(g * (hq // hkv)) // (64 * mt))
    jit.launch(k, (mblocks * splits, hkv, ng), (128,), (
        jit.ptr(q), jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(None), jit.ptr(shared.lens), jit.ptr(shared.tables),
        jit.i32(shared.tables.stride(0)), jit.ptr(None), jit.i32(hq), jit.i32(hkv), jit.i32(bs.bit_length() - 1),
        jit.f32(softmax_scale * math.log2(math.e)), jit.i32(mblocks), jit.i32(0), jit.ptr(shared.q_rows), jit.i32(g),
        jit.i32(splits), jit.i32(B * hq), jit.ptr(o_sh), jit.ptr(lse_sh)), q.device, shared_mem=smem)


def _check_shared(shared: SharedPrefix, B: int, dev: torch.device) -> tuple[int, int]:
    """SharedPrefix's tensors checked against a batch of B on `dev` -> (groups, members per group)."""
    check_tensor("shared.q_rows", shared.q_rows, (torch.int32,), 2, dev, align=4)
    ng, g = shared.q_rows.shape
    if g < 1:
        fail("shared.q_rows", "must have at least one column (members per group)", tuple(shared.q_rows.shape))
    check_tensor("shared.lens", shared.lens, (torch.int32,), 1, dev, align=4)
    check_shape("shared.lens", shared.lens, (ng,))
    if ng:
        check_block_tables(shared.tables, ng, dev)
    for name in ("skip", "suffix_lens"):
        t = getattr(shared, name)
        check_tensor(f"shared.{name}", t, (torch.int32,), 1, dev, align=4)
        check_shape(f"shared.{name}", t, (B,))
    return ng, g


def _decode_launch(defines: tuple, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bs: int, hkv: int,
                   scale_log2: float, v_scale: float, context_lens: torch.Tensor, block_tables: torch.Tensor,
                   batch: int, hq: int, out: torch.Tensor, lse: torch.Tensor | None, num_splits: int | None,
                   plan: str | None, q_rows: torch.Tensor | None = None, q_group: int = 1,
                   bt_offset: torch.Tensor | None = None,
                   merge: tuple[torch.Tensor, torch.Tensor] | None = None, window: int = 0,
                   kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, longest: int | None = None,
                   counters: str = "decode") -> None:
    """One launch of decode_attention_kernel over `batch` rows of `hq` query heads each (a shared-prefix launch:
    groups of q_group members, hq = q_group x the model's heads, `out` float32); `window` > 0: a sliding window
    (never with a shared-prefix launch). `kv_scales`: the int8k cache's (k_scale, v_scale) tensors, the last two
    arguments of its kernel (FG_KV_FP8=2; None for the others, whose arguments end at window). `defines`: the
    kernel variant's (the cache's, FG_MERGE_N); the warp plan adds FG_WARP_PLAN. `counters`: the split_counters
    user (a launch that may run beside another on a second stream has its own)."""
    dev, d = q.device, q.shape[2]
    di = device_index(q)
    group = hq // hkv
    # the most tokens one sequence attends to: the block tables' width (or the caller's bound), or the window (+
    # its first step's tokens below it); shapes, the window and `longest` only, never context_lens (a fixed
    # launch for graph capture)
    max_context = block_tables.shape[1] * bs
    if longest is not None:
        max_context = min(max_context, max(int(longest), 1))
    if window:
        max_context = min(max_context, window + 15)
    code = DECODE_PLANS.index(decode_plan(plan))
    if code == 3 and d > WARP_PLAN_MAX_D:  # the warp plan is not compiled there: auto
        code = 0
    if code == 0 and num_splits is None and warp_auto(batch, max_context, warp_min_batch(hkv, group, d, num_sms(di))):
        code = 3
    if num_splits is None:
        num_splits = decode_num_splits(batch, hkv, group, max_context, num_sms(di))
    num_splits = int(num_splits)
    if not 1 <= num_splits <= DECODE_MAX_SPLITS:
        fail("num_splits", f"must be in [1, {DECODE_MAX_SPLITS}]", num_splits)
    pairs = batch * hkv * -(-group // 8)  # (sequence, kv head, group of 8 query heads)
    if code == 3:  # one warp per pair, 4 pairs per CTA, each written whole: no splits, no partials
        num_splits = 1
    if pairs * max(num_splits, -(-block_tables.shape[1] * bs // 16)) >= 1 << 30:  # 32-bit plan in the kernel
        fail("block_tables", "covers too many 16-token steps for one launch (batch x kv heads x "
             "ceil(query group / 8) x ceil(width x block_size / 16) must stay below 2^30); split the batch",
             tuple(block_tables.shape))
    ncta = pairs * num_splits
    sms = num_sms(di)
    if code == 0 and ncta > 4 * sms:  # > 2 waves: the hardware's CTA scheduling evens out a ragged
        code = 1                                # batch; the split plan needs no scan of context_lens
    if code in (1, 3) and num_splits == 1:  # every CTA (warp) covers a whole pair: no partials
        part_o = part_lse = None
    else:
        part_o = torch.empty((2 * ncta, 8, d), dtype=torch.float32, device=dev)
        part_lse = torch.empty((2 * ncta, 8), dtype=torch.float32, device=dev)
    pair_counters = split_counters(dev, pairs, counters)
    merge_o, merge_lse = merge if merge is not None else (None, None)
    # (states, batch, hq, D): the FG_MERGE_N variant's key splits, passed as one more argument (at most its
    # FG_MERGE_MAX, SHARED_MAX_SPLITS)
    merge_n = (jit.i32(merge_o.shape[0]),) if merge_o is not None and merge_o.dim() == 4 else ()
    if merge_o is not None and merge_o.dim() == 4 and not 1 <= merge_o.shape[0] <= SHARED_MAX_SPLITS:
        fail("merge", f"must hold 1 to {SHARED_MAX_SPLITS} states", merge_o.shape[0])
    f32_out = out.dtype == torch.float32
    if code == 3:  # 4 pairs a CTA; the warp plan is its own variant: the others' kernel carries none of its code
        grid = (-(-pairs // 4), 1, 1)
        defines = (*defines, ("FG_WARP_PLAN", 1))
    else:
        grid = (num_splits, pairs // batch, batch)
    kern = jit.get_kernel("decode_attention.cu", "decode_attention_kernel", q.dtype, d, di, defines=defines)
    jit.launch(kern, grid, (128,), (
        jit.ptr(q), jit.ptr(k_cache), jit.ptr(v_cache), jit.ptr(context_lens), jit.ptr(block_tables),
        jit.i32(block_tables.stride(0)), jit.ptr(None if f32_out else out), jit.ptr(lse), jit.ptr(part_o),
        jit.ptr(part_lse), jit.ptr(pair_counters), jit.i32(batch), jit.i32(hq), jit.i32(hkv),
        jit.i32(bs.bit_length() - 1), jit.f32(scale_log2), jit.i32(num_splits), jit.i32(code), jit.i32(2 * sms),
        jit.f32(v_scale), jit.ptr(q_rows), jit.i32(q_group), jit.ptr(bt_offset),
        jit.ptr(out if f32_out else None), jit.ptr(merge_o), jit.ptr(merge_lse), *merge_n, jit.i32(window),
        *((jit.ptr(kv_scales[0]), jit.ptr(kv_scales[1])) if kv_scales is not None else ())), dev)
