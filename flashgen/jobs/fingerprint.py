"""Request hashes: which input line, under which settings, an output record was made from.

Every result record carries `request_hash`: 12 hex characters of BLAKE2b over the input line's JSON object in
canonical form (keys sorted, no ASCII escaping, lone surrogates escaped) and the job fingerprint, a digest of the
settings that change what a line produces: the sampling defaults, the --template file's content, --field,
--chat and --system (not the model path: pointing at a moved copy of the same model must not rerun a whole job).
--resume compares it with the input line's to find results made from a line or from settings that have changed since.
Formatting changes (spacing, key order) of the input line do not change the hash.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from flashgen.jobs.idset import id_hash, probe

HASH_CHARS = 12


def job_fingerprint(sampling_defaults: dict[str, Any], template_path: str = "", field: str = "",
                    chat: bool = False, system: str = "") -> str:
    template = hashlib.sha256(Path(template_path).read_bytes()).hexdigest() if template_path else ""
    doc: dict[str, Any] = {"sampling": sampling_defaults, "template": template, "field": field, "chat": bool(chat)}
    if system:  # only when set: the hashes of results made without --system stay what they were
        doc["system"] = system
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def request_hash(obj: Any, fingerprint: str = "") -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n" + fingerprint
    return hashlib.blake2b(text.encode("utf-8", "backslashreplace"), digest_size=HASH_CHARS // 2).hexdigest()


def hash_value(h: Any) -> int:
    """A stored request_hash as a nonzero int, or 0 when there is none (records of older versions)."""
    if not isinstance(h, str) or len(h) != HASH_CHARS:
        return 0
    try:
        return int(h, 16) or 1
    except ValueError:
        return 0


class KeyHashMap:
    """Line key -> request hash, for every line of a large input: 16 bytes a slot in open-addressing numpy arrays
    (a dict of str would cost ~150 bytes a line). Keys are 64-bit BLAKE2b hashes as in IdSet; a value of 0 means
    "no hash known". Only the first value put for a key is kept (the first line with an id owns it)."""

    def __init__(self, capacity: int = 1024):
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._vals = np.zeros(capacity, dtype=np.uint64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _slot(self, h: int) -> tuple[int, bool]:
        return probe(self._keys, h)

    def __contains__(self, key: str) -> bool:
        return self._slot(id_hash(key))[1]

    def get(self, key: str) -> int | None:
        """The value for `key` (0: known key, no hash), or None when the key is absent."""
        i, found = self._slot(id_hash(key))
        return int(self._vals[i]) if found else None

    def put_first(self, key: str, value: int) -> bool:
        """Set key -> value unless key is already there; True when it was added."""
        return self._put(id_hash(key), value, overwrite=False)

    def clear_value(self, key: str) -> None:
        i, found = self._slot(id_hash(key))
        if found:
            self._vals[i] = 0

    def _put(self, h: int, value: int, overwrite: bool) -> bool:
        i, found = self._slot(h)
        if found:
            if overwrite:
                self._vals[i] = value
            return False
        self._keys[i], self._vals[i] = h, value
        self._n += 1
        if 2 * self._n > len(self._keys):
            keep = self._keys != 0
            old_k, old_v = self._keys[keep], self._vals[keep]
            self._keys = np.zeros(2 * len(self._keys), dtype=np.uint64)
            self._vals = np.zeros(2 * len(self._vals), dtype=np.uint64)
            self._n = 0
            for start in range(0, len(old_k), 4096):
                for k, v in zip(old_k[start:start + 4096].tolist(), old_v[start:start + 4096].tolist(), strict=True):
                    self._put(k, v, overwrite=True)
        return True
