"""How many KV blocks fit: the memory left after the weights and the largest step's activations.

On a GPU the activation peak is measured, not estimated: the largest prefill step the scheduler can build
(max_num_batched_tokens) runs once on a scratch cache, then a sort as wide as sampling's. What is left of
gpu_memory_utilization goes to the cache. With tensor parallelism every rank holds the same number of blocks.
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Callable

import torch

from flashgen.config import EngineConfig
from flashgen.engine.sequence import Sequence
from flashgen.engine.step_packing import pack_step
from flashgen.models.decoder import DecoderLM

log = logging.getLogger(__name__)


def kv_cache_shape(model: DecoderLM, num_blocks: int, block_size: int) -> tuple[int, ...]:
    spec = model.spec
    return (2, spec.num_layers, num_blocks, block_size, model.num_kv_heads_local, spec.head_dim)


def alloc_kv_cache(model: DecoderLM, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zeroed cache of `dtype` (the model's kv_dtype by default) bound to the model: (kv, scales), scales the
    int8k cache's float32 per-token K and V scales (2, layers, blocks, block_size, kv heads), else None."""
    dtype = dtype or model.kv_dtype
    shape = kv_cache_shape(model, num_blocks, block_size)
    kv = torch.zeros(shape, dtype=dtype, device=model.device)
    scales = torch.ones(shape[:-1], dtype=torch.float32, device=model.device) if dtype == torch.int8 else None
    model.bind_kv_cache(kv, scales)
    return kv, scales


def plan_kv_blocks(config: EngineConfig, model: DecoderLM, max_len: int, execute: Callable) -> int:
    """Blocks for the KV cache; `execute` runs a packed step (used to measure the activation peak)."""
    per_token = model.spec.kv_bytes_per_token(model.kv_dtype, model.num_kv_heads_local)
    per_block = per_token * config.block_size
    need = config.max_num_seqs * max_len * per_token
    if config.kv_cache_gb:
        budget = config.kv_cache_gb * 2**30
    elif model.device.type == "cuda":
        peak = profile_activations(config, model, max_len, execute)
        free, total = torch.cuda.mem_get_info(model.device)
        budget = free - total * (1 - config.gpu_memory_utilization) - peak
        log.info("activation peak %.2f GiB; KV cache gets %.2f GiB", peak / 2**30, max(budget, 0) / 2**30)
    else:
        budget = min(2 * 2**30, need)
    blocks = int(max(budget, 0) // per_block)
    if config.tensor_parallel_size > 1:  # every rank must hold the same blocks: take the smallest
        import torch.distributed as dist

        t = torch.tensor([blocks], device=model.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        blocks = int(t.item())
    if blocks < 1:
        raise RuntimeError(f"no memory is left for the KV cache ({per_block} bytes per block); lower "
                           "max_num_batched_tokens, raise gpu_memory_utilization or set kv_cache_gb")
    return blocks


def profile_activations(config: EngineConfig, model: DecoderLM, max_len: int, execute: Callable) -> int:
    """Peak activation bytes of the largest prefill step plus a full decode batch's logits and sampling,
    measured by running them on a scratch cache (freed afterwards)."""
    bs, device = config.block_size, model.device
    T = config.max_num_batched_tokens
    seq_len = min(T, max_len)
    nseq = (T + seq_len - 1) // seq_len
    blocks_per_seq = (seq_len + bs - 1) // bs
    scratch, scratch_scales = alloc_kv_cache(model, nseq * blocks_per_seq, bs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    seqs = []
    for i in range(nseq):
        n = min(seq_len, T - i * seq_len)
        s = Sequence(f"_profile{i}", None, [0] * n, None, bs, 0)  # type: ignore[arg-type]
        s.block_table, s.num_scheduled_tokens = array("i", range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), n
        seqs.append(s)
    # NOTE: no broadcast here: every rank profiles its own copy of the same step
    execute(pack_step(seqs, True, bs, rows=[]))
    probe = torch.randn(config.max_num_seqs, model.spec.vocab_size, device=device)
    probe.softmax(-1).sort(-1)  # sampling's widest temporaries: a sort of (max_num_seqs, vocab)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del probe, scratch, scratch_scales
    model.unbind_kv_cache()
    torch.cuda.empty_cache()
    return int(peak * 1.1) + (256 << 20)  # headroom for allocator fragmentation and graph pools


CALIBRATION_TOKENS = 512   # tokens of the start-up calibration prefill
CALIBRATION_HEADROOM = 4   # the calibration's largest |K| (|V|) is stored as 448 / 4: room for larger values later


def calibrate_kv_scales(config: EngineConfig, model: DecoderLM, max_len: int, execute: Callable) -> None:
    """Measure the FP8 KV-cache scales at start-up, for a checkpoint that brings none: one prefill of
    CALIBRATION_TOKENS seeded random token ids on a scratch cache in the model's own dtype, then per layer
    scale = max|K| * CALIBRATION_HEADROOM / 448 (and the same for V). E4M3 keeps its relative precision over
    2^15 of range, so the headroom costs nothing for typical values but keeps a token that is larger than any
    the calibration saw from saturating. Random ids are enough: the large K/V values of these models come from a
    few channels and from the first position (the attention sink), not from particular tokens."""
    from flashgen.ops.torch_ops import FP8_MAX

    bs, device, spec = config.block_size, model.device, model.spec
    n = min(CALIBRATION_TOKENS, max_len, config.max_num_batched_tokens)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist()
    nblk = (n + bs - 1) // bs
    scratch, _ = alloc_kv_cache(model, nblk, bs, model.dtype)
    s = Sequence("_calibrate", None, ids, None, bs, 0)  # type: ignore[arg-type]
    s.block_table, s.num_scheduled_tokens = array("i", range(nblk)), n
    execute(pack_step([s], True, bs, rows=[]))
    amax = scratch.flatten(2).abs().amax(-1).float()  # (2, layers)
    if config.tensor_parallel_size > 1:  # every rank holds other heads: one scale per layer for all of them
        import torch.distributed as dist

        t = amax.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        amax = t
    scales = (amax.cpu().clamp(min=1e-6) * CALIBRATION_HEADROOM / FP8_MAX).tolist()
    model.k_scales, model.v_scales = list(scales[0]), list(scales[1])
    model.kv_scales_from = "calibrated"
    model.unbind_kv_cache()
    del scratch
    if device.type == "cuda":
        torch.cuda.empty_cache()
