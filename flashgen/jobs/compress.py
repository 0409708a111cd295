"""Compressed input and output, chosen by the file name's suffix: .gz and .bz2 (the standard library), .zst (the
`zstandard` package, when installed). Any other name is plain JSONL.

--resume refuses a compressed output: resume drops old records and a torn tail in place and appends, which a
compressed stream cannot do safely. Write a plain output to be able to resume, and compress it afterwards.
"""
from __future__ import annotations

import bz2
import gzip
import importlib
import io
from pathlib import Path
from typing import Any, BinaryIO

from flashgen.jobs.errors import FatalError

SUFFIXES = (".gz", ".bz2", ".zst")


def compression_of(path: str | Path | None) -> str:
    """"gz", "bz2", "zst", or "" for a plain file (or stdin / stdout)."""
    if path is None or str(path) == "-":
        return ""
    suffix = Path(path).suffix.lower()
    return suffix[1:] if suffix in SUFFIXES else ""


def _zstandard(path: str | Path) -> Any:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise FatalError(f"{path} is zstd-compressed (.zst), which needs the zstandard package: "
                         "pip install zstandard (or use .gz / .bz2, or a plain .jsonl file)") from None


def check_supported(path: str | Path | None) -> None:
    """FatalError now (before the model loads) if `path` needs a codec that is not installed."""
    if compression_of(path) == "zst":
        _zstandard(path)  # type: ignore[arg-type]


def open_read(path: str | Path) -> BinaryIO:
    """The file's decompressed bytes (a plain file as it is)."""
    kind = compression_of(path)
    if kind == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if kind == "zst":
        zstd = _zstandard(path)
        return io.BufferedReader(zstd.open(path, "rb"))  # its reader has no readline(size) of its own
    return open(path, "rb")


def open_write(path: str | Path) -> BinaryIO:
    """A new compressed file (truncated if it exists). Each flush() pushes what was written so far into the file,
    so a reader sees every record written before a crash."""
    kind = compression_of(path)
    if kind == "gz":
        return gzip.open(path, "wb")  # type: ignore[return-value]
    if kind == "bz2":
        return bz2.open(path, "wb")  # type: ignore[return-value]
    if kind == "zst":
        zstd = _zstandard(path)
        return zstd.open(path, "wb")
    return open(path, "wb", buffering=0)
