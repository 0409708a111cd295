"""Paged KV blocks with reference counts and a prefix cache.

A full block is identified by hash(previous block's hash, its token ids); a new sequence whose leading blocks
hash the same shares them (prefix caching). Freed blocks keep their hash until reused, so a prefix seen earlier
can still hit; freeing in reverse order makes a sequence's tail leave the cache before its shared head.
"""
from __future__ import annotations

from array import array
from collections import deque

from flashgen.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids = b""  # the block's token ids as int32 bytes (Sequence.token_ids' layout), when it is full


def block_hash(token_ids: bytes, prev: int) -> int:
    """A full block's identity: its token ids (int32 bytes: hashed in one pass, no int object a token) and the
    identity of the block before it."""
    return hash((prev, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.free_set = set(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def _take(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, b"", 1
        self.free_set.discard(block_id)
        return block

    def _take_free(self) -> Block:
        while True:  # free_ids may hold ids revived by a prefix hit; skip them
            block_id = self.free_ids.popleft()
            if block_id in self.free_set:
                return self._take(block_id)

    def can_allocate(self, seq: Sequence) -> bool:
        return len(self.free_set) >= seq.num_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached full blocks of the same prefix."""
        assert not seq.block_table
        prev, miss, cached = -1, not (self.prefix_caching and seq.prefix_cache_ok), 0
        for i in range(seq.num_blocks):
            ids = seq.block_tokens(i)
            tokens = ids.tobytes()
            h = block_hash(tokens, prev) if len(ids) == self.block_size else -1
            hit = self.hash_to_block.get(h, -1) if not miss else -1
            if hit == -1 or self.blocks[hit].token_ids != tokens:
                miss = True
            if miss:
                block = self._take_free()
            else:
                cached += self.block_size
                block = self.blocks[hit]
                if block.ref_count == 0:  # a freed block still holding this prefix: revive it
                    self.free_set.discard(hit)
                block.ref_count += 1
            if h != -1:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
            prev = h
            seq.block_table.append(block.block_id)
        # NOTE: at least the last prompt token is always computed: its logits start generation.
        seq.num_cached_tokens = min(cached, seq.num_tokens - 1)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(block_id)
                self.free_set.add(block_id)
        seq.block_table = array("i")
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def fork(self, src: Sequence, dst: Sequence, copies: list[tuple[int, int]]) -> bool:
        """Give `dst` (the same prompt as `src`, whose prompt is computed) `src`'s blocks, the last one a copy
        (appended to `copies` as (src block, dst block)); False, with nothing taken, when no block is free."""
        n = (dst.num_tokens + self.block_size - 1) // self.block_size
        if not self.free_set or n > len(src.block_table):
            return False
        for block_id in src.block_table[:n - 1]:
            self.blocks[block_id].ref_count += 1
        last = self._take_free()
        dst.block_table = src.block_table[:n - 1]
        dst.block_table.append(last.block_id)
        copies.append((src.block_table[n - 1], last.block_id))
        return True

    def forget(self, block_ids) -> None:
        """These (free) blocks' contents changed: drop their prefix-cache identity."""
        for i in block_ids:
            block = self.blocks[i]
            assert block.ref_count == 0, "only free blocks can be rewritten"
            if block.hash != -1 and self.hash_to_block.get(block.hash) == i:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = -1, b""

    def can_append(self, seq: Sequence) -> bool:
        # the token to compute sits at position len-1; it opens a new block when (len-1) % block_size == 0
        return len(self.free_set) >= (len(seq) % self.block_size == 1)

    def may_append(self, seq: Sequence) -> None:
        """Give `seq` a new block when the token this step computes opens one."""
        if len(seq) % self.block_size == 1 and len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free().block_id)

    def register_full_block(self, seq: Sequence, i: int) -> None:
        """Make seq's full block i findable by later prompts. Call only once the step writing its last
        token's K/V has been launched, so any prefill that hits it runs after that write."""
        if not self.prefix_caching:
            return
        prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
        if prev != -1 or i == 0:
            tokens = seq.block_tokens(i).tobytes()
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = block_hash(tokens, prev), tokens
            self.hash_to_block[block.hash] = block.block_id
