"""A scheduled step as one int64 tensor: built on the host, unpacked into the model's StepContext on the device.

One flat tensor means one host-to-device copy per step and, with tensor parallelism, one broadcast to the other
ranks. Layout: a header (is_prefill, T, B, width, max_seqlen_q, n_rows, 0), then input ids (T), positions (T),
cache slots (T), context lengths (B), cu_seqlens (B + 1), block tables (B x width) and the rows whose logits
are wanted (n_rows).
"""
from __future__ import annotations

import numpy as np
import torch

from flashgen.engine.sequence import Sequence
from flashgen.models.decoder import StepContext

HEADER = 7


def pack_step(seqs: list[Sequence], is_prefill: bool, block_size: int, decode_ids: list[int] | None = None,
              rows: list[int] | None = None) -> torch.Tensor:
    """Pack one step. Prefill computes each sequence's scheduled chunk and wants the logits of the chunks that
    end their prompt; decode computes one token per sequence at position len - 1, its id column `decode_ids`
    (token ids, or device slot numbers: see TokenSlots). `rows` overrides which logits rows are wanted."""
    bs, B = block_size, len(seqs)
    width = max(len(s.block_table) for s in seqs)
    tables = np.zeros((B, width), dtype=np.int64)
    for i, s in enumerate(seqs):
        tables[i, :len(s.block_table)] = s.block_table
    if is_prefill:
        ids, pos, slots, cu, want = [], [], [], [0], []
        for s in seqs:
            start, n = s.num_computed_tokens, s.num_scheduled_tokens
            ids += s.token_ids[start:start + n]
            p = np.arange(start, start + n)
            pos.append(p)
            slots.append(np.asarray(s.block_table)[p // bs] * bs + p % bs)
            cu.append(cu[-1] + n)
            if start + n == s.num_tokens:
                want.append(cu[-1] - 1)
        ctx_lens = [s.num_computed_tokens + s.num_scheduled_tokens for s in seqs]
        pos_a, slot_a = np.concatenate(pos), np.concatenate(slots)
        max_q = max(s.num_scheduled_tokens for s in seqs)
    else:
        assert decode_ids is not None and len(decode_ids) == B
        ids = decode_ids
        ctx_lens = [len(s) for s in seqs]
        pos_a = np.asarray(ctx_lens, dtype=np.int64) - 1
        slot_a = tables[np.arange(B), pos_a // bs] * bs + pos_a % bs
        cu, want, max_q = list(range(B + 1)), list(range(B)), 1
    if rows is not None:
        want = rows
    header = [int(is_prefill), len(ids), B, width, max_q, len(want), 0]
    return torch.from_numpy(np.concatenate([
        np.asarray(header + ids, dtype=np.int64), pos_a, slot_a, np.asarray(ctx_lens + cu, dtype=np.int64),
        tables.ravel(), np.asarray(want, dtype=np.int64)]))


def unpack_step(buf: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
    """(input id column, StepContext, logits rows), all on `device`."""
    is_prefill, T, B, W, max_q, n_rows, _ = buf[:HEADER].tolist()
    buf = buf.to(device, non_blocking=True)
    parts = buf[HEADER:].split([T, T, T, B, B + 1, B * W, n_rows])
    i32 = [p.to(torch.int32) for p in parts[1:6]]
    ctx = StepContext(is_prefill=bool(is_prefill), positions=i32[0], slot_mapping=i32[1], context_lens=i32[2],
                      cu_seqlens_q=i32[3], block_tables=i32[4].view(B, W), max_seqlen_q=max_q)
    return parts[0], ctx, parts[6]
