"""In-place, crash-safe removal of lines from an output file (--resume drops old error records and stale results).

The kept lines move backwards in chunks of at most CHUNK bytes; nothing copies the whole file, so the extra disk
is the journal beside the output (`out.jsonl.journal`, two chunk slots: about 2 MiB). The state is two offsets:
[0, w) is the finished output, [r, end) is still the original file, and everything between is dropped or
already moved. Each move is written first to a journal slot (the chunk, its w and r, a sequence number and a
CRC), the journal is fsynced, then the chunk is written at w and the output fsynced. Slots alternate, so a kill
at any moment leaves at least the last committed move readable. The next --resume replays it (rewriting the same
bytes at the same place is harmless), then finishes moving [r, end) to w keeping every whole line, truncates and
deletes the journal; its own scan then drops whatever still needs dropping. A line longer than a chunk moves in
chunk-sized pieces; the piece's end is its r.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1 << 20
_MAGIC = b"FGJRNL01"
_HEAD = struct.Struct("<8sQ")        # magic, chunk size
_SLOT = struct.Struct("<QQQII")      # seq, w, r, n, crc32 of (seq, w, r, n, data)

Hook = Callable[[str, int], None]    # tests: called with ("journaled" | "written", seq) to simulate a crash


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def compact(path: Path, keep: Callable[[bytes], bool], start: int = 0, chunk: int = CHUNK,
            hook: Hook | None = None) -> int:
    """Remove from `path`, from byte `start` on, every line `keep(line)` rejects and a torn last line, in place.
    Return the new size. A crash leaves the journal, and `recover` finishes the job."""
    jpath = journal_path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        jfd = os.open(jpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(jfd, _HEAD.pack(_MAGIC, chunk), 0)
            os.fsync(jfd)
            _fsync_dir(path)
            size = _move(fd, jfd, chunk, start, start, keep, 0, hook)
        finally:
            os.close(jfd)
    finally:
        os.close(fd)
    os.unlink(jpath)
    _fsync_dir(path)
    return size


def recover(path: Path, hook: Hook | None = None) -> bool:
    """Finish a compaction that was cut short (its journal exists); True when there was one. Afterwards `path`
    holds whole lines only (plus at most a torn last line, which the scan drops)."""
    jpath = journal_path(path)
    if not jpath.exists():
        return False
    if path.exists():
        chunk, slot = _read_journal(jpath)
        if slot is not None:  # else no move was made: the output is as it was
            seq, w, r, data = slot
            fd = os.open(path, os.O_RDWR)
            try:
                _write_all(fd, data, w)
                os.fsync(fd)
                jfd = os.open(jpath, os.O_RDWR)
                try:
                    _move(fd, jfd, chunk, w + len(data), r, lambda line: True, seq, hook)
                finally:
                    os.close(jfd)
            finally:
                os.close(fd)
    os.unlink(jpath)
    _fsync_dir(path)
    return True


def discard(path: Path) -> None:
    """Forget a journal (the output is being replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal_path(path))


def _move(fd: int, jfd: int, chunk: int, w: int, r: int, keep: Callable[[bytes], bool], seq: int,
          hook: Hook | None) -> int:
    size = os.fstat(fd).st_size
    buf = bytearray()

    def flush(r_at: int) -> None:  # move buf to w; every line before r_at is in buf, moved or dropped
        nonlocal w, seq
        seq += 1
        data = bytes(buf)
        head = struct.pack("<QQQI", seq, w, r_at, len(data))
        slot = _SLOT.pack(seq, w, r_at, len(data), zlib.crc32(data, zlib.crc32(head)))
        _write_all(jfd, slot + data, _HEAD.size + (seq % 2) * (_SLOT.size + chunk))
        os.fsync(jfd)
        if hook:
            hook("journaled", seq)
        _write_all(fd, data, w)
        os.fsync(fd)
        w += len(data)
        buf.clear()
        if hook:
            hook("written", seq)

    for start, line in _lines(fd, r, size):
        end = start + len(line)
        if keep(line):
            if w == start:  # nothing dropped before it: already in place
                w = end
            elif len(line) > chunk:
                if buf:
                    flush(start)
                for off in range(0, len(line), chunk):
                    buf += line[off:off + chunk]
                    flush(min(start + off + chunk, end))
            else:
                if len(buf) + len(line) > chunk:
                    flush(start)
                buf += line
        r = end
    if buf:
        flush(r)
    os.ftruncate(fd, w)
    os.fsync(fd)
    return w


def _lines(fd: int, pos: int, size: int, block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each whole line of [pos, size); a torn last line (no newline) is left out."""
    pending = b""
    start = pos
    while pos < size:
        data = os.pread(fd, min(block, size - pos), pos)
        if not data:
            break
        pos += len(data)
        data = pending + data
        i = 0
        while (j := data.find(b"\n", i)) >= 0:
            yield start, data[i:j + 1]
            start += j + 1 - i
            i = j + 1
        pending = data[i:]


def _read_journal(jpath: Path) -> tuple[int, tuple[int, int, int, bytes] | None]:
    """(chunk size, the newest whole slot) of a journal; no slot when nothing was committed."""
    with open(jpath, "rb") as f:
        blob = f.read()
    if len(blob) < _HEAD.size:
        return CHUNK, None
    magic, chunk = _HEAD.unpack_from(blob)
    if magic != _MAGIC or not 0 < chunk <= 1 << 34:
        return CHUNK, None
    best = None
    for k in range(2):
        off = _HEAD.size + k * (_SLOT.size + chunk)
        if len(blob) < off + _SLOT.size:
            continue
        seq, w, r, n, crc = _SLOT.unpack_from(blob, off)
        data = blob[off + _SLOT.size: off + _SLOT.size + n]
        if seq == 0 or n > chunk or len(data) != n:
            continue
        if zlib.crc32(data, zlib.crc32(struct.pack("<QQQI", seq, w, r, n))) != crc:
            continue
        if best is None or seq > best[0]:
            best = (seq, w, r, data)
    return chunk, best


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
