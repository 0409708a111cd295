"""CUDA backend, sampling: logits to tokens in one pass (kernels/sampling.cu).

Importing this module needs neither CuPy nor a GPU; calling an op does.
"""
from __future__ import annotations

from typing import Any

import torch

from flashgen.ops import jit
from flashgen.ops.cuda_attention import split_counters
from flashgen.ops.cuda_checks import KERNEL_DTYPES, check_out, check_tensor, device_index, fail, num_sms


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  *, out: torch.Tensor | None = None, bitmask: torch.Tensor | None = None,
                  mask_rows: torch.Tensor | None = None, checked: torch.Tensor | None = None,
                  slot_ids: torch.Tensor | None = None, slot_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits (float32, bfloat16 or float16) -> (B,) int64 tokens: argmax(logits / T + Gumbel(seed, step,
    token)), plain argmax where T == 0. The noise is flashgen.engine.sampler.gumbel_noise's up to the rounding
    of fast logarithms; -inf logits never win.

    bitmask (M, W) int32 and mask_rows (B,) int32, both or neither: row i draws only among the tokens that
    bitmask row mask_rows[i] allows (-1: all; token t allowed iff bit t & 31 of word t >> 5; tokens >= 32 W
    never), and gets -1 when none of them has a logit above -inf. mask_rows entries must be < M (not checked:
    that would need the values on the host).

    checked (B,) int64: the step's epilogue in the same launch (kernels/sampling.cu's top comment). The returned
    tokens are then all valid ids (0 where a row got -1), checked[i] is row i's token or -1 where the row had no
    allowed token or the logit picked (of `logits`) is not finite; and with slot_ids (B,) int32, slot_tokens
    (1-D int64) gets the tokens at those indices (not checked against its length: the values are on the
    device)."""
    check_tensor("logits", logits, (torch.float32, *KERNEL_DTYPES), 2, align=logits.element_size())
    dev = logits.device
    B, V = logits.shape
    check_tensor("temperature", temperature, (torch.float32,), 1, dev, align=4)
    check_tensor("seeds", seeds, (torch.int64,), 1, dev, align=8)
    check_tensor("steps", steps, (torch.int64,), 1, dev, align=8)
    for name, t in (("temperature", temperature), ("seeds", seeds), ("steps", steps)):
        if t.shape[0] != B:
            fail(name, f"must have one entry per logits row ({B})", f"shape {tuple(t.shape)}")
    if (bitmask is None) != (mask_rows is None):
        fail("mask_rows", "must be given with bitmask (both or neither)",
             f"bitmask {'None' if bitmask is None else 'set'}, mask_rows {'None' if mask_rows is None else 'set'}")
    if bitmask is not None and mask_rows is not None:
        check_tensor("bitmask", bitmask, (torch.int32,), 2, dev, align=4)
        check_tensor("mask_rows", mask_rows, (torch.int32,), 1, dev, align=4)
        if bitmask.shape[1] == 0:
            fail("bitmask", "must have at least one word per row", f"shape {tuple(bitmask.shape)}")
        if mask_rows.shape[0] != B:
            fail("mask_rows", f"must have one entry per logits row ({B})", f"shape {tuple(mask_rows.shape)}")
    if checked is not None:
        checked = check_out(checked, (B,), torch.int64, dev, "checked")
    if slot_ids is not None or slot_tokens is not None:
        if checked is None:
            fail("slot_ids", "needs checked (the epilogue writes the slots)", "checked=None")
        if slot_ids is None or slot_tokens is None:
            fail("slot_tokens", "must be given with slot_ids (both or neither)",
                 f"slot_ids {'None' if slot_ids is None else 'set'}, "
                 f"slot_tokens {'None' if slot_tokens is None else 'set'}")
        check_tensor("slot_ids", slot_ids, (torch.int32,), 1, dev, align=4)
        check_tensor("slot_tokens", slot_tokens, (torch.int64,), 1, dev, align=8)
        if slot_ids.shape[0] != B:
            fail("slot_ids", f"must have one entry per logits row ({B})", f"shape {tuple(slot_ids.shape)}")
    out = check_out(out, (B,), torch.int64, dev)
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=dev)
    if B:
        f32 = logits.dtype == torch.float32
        vec = 4 if f32 else 8
        # CTAs per row: enough to fill the GPU twice over, each scanning >= 8192 logits
        S = 1 if V % vec else max(1, min(-(-2 * num_sms(device_index(logits)) // B), V // 8192))
        chunk = -(-V // (S * vec)) * vec
        S = -(-V // chunk)
        part_v = torch.empty((B, S), dtype=torch.float32, device=dev) if S > 1 else None
        part_i = torch.empty((B, S), dtype=torch.int32, device=dev) if S > 1 else None
        counters = split_counters(dev, B, "sampling") if S > 1 else None
        name = "gumbel_argmax_kernel" if bitmask is None else "gumbel_argmax_masked_kernel"
        k = jit.get_kernel("sampling.cu", name, torch.bfloat16 if f32 else logits.dtype, 0,
                           device_index(logits), 0, (("SAMPLING_F32", int(f32)),))
        args: tuple[Any, ...] = (jit.ptr(logits), jit.i32(V), jit.i32(chunk), jit.ptr(temperature), jit.ptr(seeds),
                                 jit.ptr(steps), jit.ptr(out), jit.ptr(part_v), jit.ptr(part_i), jit.ptr(counters))
        if bitmask is not None:
            args += (jit.ptr(bitmask), jit.ptr(mask_rows), jit.i32(bitmask.shape[1]))
        args += (jit.ptr(checked), jit.ptr(slot_ids), jit.ptr(slot_tokens))
        jit.launch(k, (B, S), (512,), args, dev)
    return out


LOGPROBS_MAX_K = 20
LOGPROBS_K_VARIANTS = (5, 20)  # the kernel's register lists: the smallest that holds k is launched


def logprobs_pack(x: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """flashgen.engine.logprobs.pack_logprobs in one pass over the logits (kernels/logprobs.cu): x (R, V)
    (float32, bfloat16 or float16; rows may be strided), tokens (R,) int64 -> (R, 2 + 2k) float32: the chosen
    token's logprob, its rank, the top-k logprobs and their ids."""
    check_tensor("x", x, (torch.float32, *KERNEL_DTYPES), 2, contiguous=False, align=x.element_size())
    dev = x.device
    R, V = x.shape
    if x.stride(1) != 1:
        fail("x", "must have contiguous rows", f"strides {x.stride()}")
    check_tensor("tokens", tokens, (torch.int64,), 1, dev, align=8)
    if tokens.shape[0] != R:
        fail("tokens", f"must have one entry per row of x ({R})", f"shape {tuple(tokens.shape)}")
    if not 0 <= k <= LOGPROBS_MAX_K:
        fail("k", f"must be in [0, {LOGPROBS_MAX_K}]", k)
    out = torch.empty((R, 2 + 2 * k), dtype=torch.float32, device=dev)
    if R and V:
        f32 = x.dtype == torch.float32
        lk = next(v for v in LOGPROBS_K_VARIANTS if v >= max(k, 1))
        kern = jit.get_kernel("logprobs.cu", "logprobs_pack_kernel", torch.bfloat16 if f32 else x.dtype, 0,
                              device_index(x), 0, (("LP_F32", int(f32)), ("LP_K", lk)))
        jit.launch(kern, (R,), (512,), (jit.ptr(x), jit.i64(x.stride(0)), jit.i32(V), jit.ptr(tokens), jit.i32(k),
                                        jit.ptr(out)), dev)
    return out
