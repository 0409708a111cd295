"""A compact set of line ids: 8-byte hashes in an open-addressing numpy table.

Duplicate detection and --resume must remember every id seen, so this is the one structure that grows with the
input. A Python set of str ids costs ~100+ bytes per line; this costs 16-32 bytes (the table stays under half
full). Ids are hashed with 64-bit BLAKE2b: two distinct ids collide with probability ~n^2 / 2^65 (~3e-8 at 1M).
"""
from __future__ import annotations

import hashlib

import numpy as np


def id_hash(key: str) -> int:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h or 1  # 0 marks an empty slot


def probe(table: np.ndarray, h: int) -> tuple[int, bool]:
    """(slot, found) of hash `h` in an open-addressing table of a power-of-two size (0 marks an empty slot)."""
    mask = len(table) - 1
    i = h & mask
    while True:
        v = int(table[i])
        if v == 0:
            return i, False
        if v == h:
            return i, True
        i = (i + 1) & mask


class IdSet:
    def __init__(self, capacity: int = 1024):
        self._table = np.zeros(capacity, dtype=np.uint64)  # capacity is a power of two
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, key: str) -> bool:
        return self._find(id_hash(key))[1]

    def add(self, key: str) -> bool:
        """Add `key`; True when it was not there yet."""
        return self._insert(id_hash(key))

    def _find(self, h: int) -> tuple[int, bool]:
        return probe(self._table, h)

    def _insert(self, h: int) -> bool:
        i, found = self._find(h)
        if found:
            return False
        self._table[i] = h
        self._n += 1
        if 2 * self._n > len(self._table):
            old = self._table[self._table != 0]
            self._table = np.zeros(2 * len(self._table), dtype=np.uint64)
            self._n = 0
            for start in range(0, len(old), 4096):  # in chunks: no big list of Python ints at once
                for v in old[start:start + 4096].tolist():
                    self._insert(v)
        return True
