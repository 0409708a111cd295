"""A scheduled step as one int32 tensor: built on the host, unpacked into the model's StepContext on the device.

One flat tensor means one host-to-device copy per step and, with tensor parallelism, one broadcast to the other
ranks; int32, the type every kernel and index takes, so that unpacking is views of that copy, with no conversion
launched on the device (an id, a position, a cache slot and a block id all stay below 2^31: a cache of 2^31 token
slots would need terabytes).

Layout: a header (is_prefill, T, B, width, max_seqlen_q, n_rows, NG, G, longest: a decode step's most tokens of
one sequence past its group's shared blocks), then input ids (T), positions (T), cache slots (T),
context lengths (B), cu_seqlens (B + 1), block tables (B x width), the rows whose logits are wanted (n_rows)
and, for a decode step with shared-prefix groups (NG > 0), the SharedPrefix fields: q_rows (NG x G), lens (NG),
tables (NG x width), skip (B), suffix_lens (B).
"""
from __future__ import annotations

from array import array

import numpy as np
import torch

from flashgen.engine.sequence import Sequence
from flashgen.models.decoder import StepContext
from flashgen.ops.backend import SharedPrefix

HEADER = 9
STEP_DTYPE = torch.int32  # of the packed step (and of what tensor parallelism broadcasts)
# Shared-prefix decode (docs/design.md, "Shared-prefix decode"): members per group. SHARED_GROUP with the decode
# kernel for the shared part (a group's query heads are 8 x the model's query heads per kv head: the kernel reads
# the shared blocks once per 8 of them; FP8 and int8k caches, or $FLASHGEN_SHARED_KERNEL=decode);
# SHARED_GROUP_WIDE with prefill_attention.cu's PF_SHARED kernel (the default on model-dtype caches), which takes
# a group's (member, query head) rows of one kv head 64 at a time: 32 members fill that at 2 query heads per kv head.
# SHARED_MIN_SAVING: the least share of a step's context tokens that grouping must save to be used (below it, the
# second launch and the merge cost more than the blocks they save).
SHARED_GROUP = 8
SHARED_GROUP_WIDE = 32
SHARED_MIN_SAVING = 0.25


def block_tables(seqs: list[Sequence]) -> np.ndarray:
    """The sequences' block ids as one (B, longest table) int32 array, zero past each table's end."""
    nblocks = [len(s.block_table) for s in seqs]
    width = max(nblocks)
    # every block id in one copy: the int32 tables' bytes joined, then placed into the padded rows (a row
    # assignment per sequence costs twice as much at 256, an int object per block ten times as much at 512)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    tables[np.arange(width)[None, :] < np.asarray(nblocks)[:, None]] = np.frombuffer(
        b"".join([s.block_table for s in seqs]), dtype=np.int32)
    return tables


class SharedGroups:
    """A decode step's shared-prefix groups as arrays: `rows` the members, group after group; `sizes` each group's
    member count; `blocks` each group's shared leading blocks. len() is the number of groups."""

    def __init__(self, rows: np.ndarray, sizes: np.ndarray, blocks: np.ndarray):
        self.rows, self.sizes, self.blocks = rows, sizes, blocks

    def __len__(self) -> int:
        return len(self.sizes)

    def as_list(self) -> list[tuple[list[int], int]]:
        """(member rows, shared blocks) a group."""
        ends = np.cumsum(self.sizes).tolist()
        rows = self.rows.tolist()
        return [(rows[e - n:e], p) for e, n, p in zip(ends, self.sizes.tolist(), self.blocks.tolist(), strict=True)]


NO_GROUPS = SharedGroups(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def shared_prefix_groups(seqs: list[Sequence], block_size: int, lens: list[int] | np.ndarray | None = None,
                         group: int = SHARED_GROUP, tables: np.ndarray | None = None) -> SharedGroups:
    """Decode batch rows that share leading KV blocks, in groups of 2 to `group` rows; none when grouping would
    save less than SHARED_MIN_SAVING of the context tokens the step reads. `lens` and `tables` (block_tables): the
    sequences' lengths and block ids, when the caller has them.

    Sequences share a block only by holding the same block id (a prefix-cache hit or a fork of the n samples),
    and a hit or a fork always covers a whole leading run of blocks, so sequences with the same first block share
    a common run of ids; a group takes the run all its members share, never the block a member writes into.
    Whole-batch array operations, so that the host's cost barely grows with the batch: the rows sorted by their
    first block, each compared with the first row of those with its first block."""
    if lens is None:
        lens = [len(s.token_ids) for s in seqs]
    if tables is None:
        tables = block_tables(seqs)
    length = np.asarray(lens)
    rows = np.flatnonzero(length > block_size)  # a whole block before the one holding the new token
    if len(rows) < 2:
        return NO_GROUPS
    rows = rows[np.argsort(tables[rows, 0], kind="stable")]
    first = tables[rows, 0]
    start = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    size = np.diff(np.r_[start, len(rows)])
    keep = size >= 2
    if not keep.any():
        return NO_GROUPS
    # the blocks before each set's shortest member's new token, cut to the run its members all share (the same id
    # at a position means the same ids before it: a row's run ends at its first difference with the set's lead)
    most = (np.minimum.reduceat(length[rows], start) - 1) // block_size
    width = int(most.max())
    same = tables[rows, :width] == tables[np.repeat(rows[start], size), :width]
    run = np.where(same.all(1), width, same.argmin(1))
    shared = np.minimum(most, np.minimum.reduceat(run, start))
    rows = rows[np.repeat(keep, size)]
    size, shared = size[keep], shared[keep]
    # a set of m rows as ceil(m / group) groups of nearly equal size (each of 2 or more): group j of n ends at
    # row (j + 1) * m // n of its set
    n = -(-size // group)
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + 1
    ends = np.repeat(np.cumsum(size) - size, n) + j * np.repeat(size, n) // np.repeat(n, n)
    sizes = np.diff(np.r_[0, ends])
    blocks = np.repeat(shared, n)
    if ((sizes - 1) * blocks).sum() * block_size < SHARED_MIN_SAVING * length.sum():
        return NO_GROUPS
    return SharedGroups(rows, sizes, blocks)


def pack_step(seqs: list[Sequence], is_prefill: bool, block_size: int, decode_ids: list[int] | None = None,
              rows: list[int] | None = None, shared_prefix: int = 0, lens: np.ndarray | None = None
              ) -> torch.Tensor:
    """Pack one step. Prefill computes each sequence's scheduled chunk and wants the logits of the chunks that
    end their prompt; decode computes one token per sequence at position len - 1, its id column `decode_ids`
    (token ids, or device slot numbers: see TokenSlots). `rows` overrides which logits rows are wanted.
    `shared_prefix` > 0: a decode step groups the sequences that share leading blocks, at most that many to a
    group (shared_prefix_groups; 0: no groups). `lens`: a decode step's sequence lengths, when the caller has
    them."""
    bs, B = block_size, len(seqs)
    tables = block_tables(seqs)
    width = tables.shape[1]
    ids: array | list[int]
    if is_prefill:
        ids = array("i")  # the chunks' token ids: copied array to array, no int object made a token
        starts, counts, ends = [], [], []
        for s in seqs:
            start, n = s.num_computed_tokens, s.num_scheduled_tokens
            ids += s.token_ids[start:start + n]
            starts.append(start)
            counts.append(n)
            ends.append(len(s.token_ids))
        # the rest as whole-step arrays (a few NumPy calls a sequence cost ~5 us each, 2.5 ms at 512 prompts)
        start_a, n_a = np.asarray(starts, dtype=np.int32), np.asarray(counts, dtype=np.int32)
        cu_a = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(n_a, out=cu_a[1:])
        pos_a = (np.arange(cu_a[-1], dtype=np.int32) + np.repeat(start_a - cu_a[:-1], n_a)).astype(np.int32)
        slot_a = tables[np.repeat(np.arange(B), n_a), pos_a // bs] * bs + pos_a % bs
        ctx = start_a + n_a
        want_a = cu_a[1:][ctx == np.asarray(ends)] - 1  # the chunks that end their prompt: their last row
        max_q = int(n_a.max())
    else:
        assert decode_ids is not None and len(decode_ids) == B
        ids = decode_ids
        ctx = np.asarray(lens if lens is not None else [len(s.token_ids) for s in seqs], dtype=np.int32)
        pos_a = ctx - 1
        slot_a = tables[np.arange(B), pos_a // bs] * bs + pos_a % bs
        cu_a = np.arange(B + 1, dtype=np.int32)
        want_a, max_q = cu_a[:B], 1
    if rows is not None:
        want_a = np.asarray(rows, dtype=np.int32)
    groups = (shared_prefix_groups(seqs, bs, ctx, shared_prefix, tables) if shared_prefix and not is_prefill
              else NO_GROUPS)
    extra: list[np.ndarray] = []
    own = ctx  # decode: the tokens each sequence attends to past its group's blocks
    if len(groups):
        ng, members, blocks = len(groups), groups.rows, groups.blocks
        starts = np.cumsum(groups.sizes) - groups.sizes
        q_rows = np.full((ng, shared_prefix), -1, dtype=np.int32)
        q_rows[np.repeat(np.arange(ng), groups.sizes), np.arange(len(members)) - np.repeat(starts, groups.sizes)] = \
            members
        skip = np.zeros(B, dtype=np.int32)
        skip[members] = np.repeat(blocks, groups.sizes)
        lead = tables[members[starts]]
        lead[np.arange(width)[None, :] >= blocks[:, None]] = 0  # the shared blocks only
        own = ctx - skip * bs
        extra = [q_rows.ravel(), blocks * bs, lead.ravel(), skip, own]
    longest = 0 if is_prefill else int(own.max())  # the decode plan's bound (StepContext.longest)
    header = [int(is_prefill), len(ids), B, width, max_q, len(want_a), len(groups), shared_prefix if groups else 0,
              longest]
    head = [np.asarray(header, dtype=np.int32), np.frombuffer(ids, dtype=np.int32)] if isinstance(ids, array) \
        else [np.asarray(header + ids, dtype=np.int32)]
    return torch.from_numpy(np.concatenate([*head, pos_a, slot_a, ctx, cu_a, tables.ravel(), want_a, *extra],
                                           dtype=np.int32))


def unpack_step(buf: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
    """(input id column, StepContext, logits rows), all on `device`."""
    is_prefill, T, B, W, max_q, n_rows, ng, g, longest = buf[:HEADER].tolist()
    buf = buf.to(device, non_blocking=True)
    sizes = [T, T, T, B, B + 1, B * W, n_rows] + ([ng * g, ng, ng * W, B, B] if ng else [])
    parts = buf[HEADER:].split(sizes)  # views of the one copy: every field is int32 already
    i32 = parts[1:6]
    shared = None
    if ng:
        q_rows, lens, tables, skip, suffix = parts[7:]
        shared = SharedPrefix(q_rows.view(ng, g), lens, tables.view(ng, W), skip, suffix)
    ctx = StepContext(is_prefill=bool(is_prefill), positions=i32[0], slot_mapping=i32[1], context_lens=i32[2],
                      cu_seqlens_q=i32[3], block_tables=i32[4].view(B, W), max_seqlen_q=max_q, shared=shared,
                      longest=None if is_prefill else longest)
    return parts[0], ctx, parts[6]
