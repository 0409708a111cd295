"""Input lines read by a background thread into a small bounded queue.

The run loop must never block on input while the engine has work: with `producer | flashgen`, a producer that
pauses would otherwise hold back results already computable, and a signal could not stop a loop stuck in a
read. So a daemon thread reads (blocking is harmless there), and the loop polls the queue: without waiting
while the engine has work, with a short timeout while it is idle. The queue bound keeps memory flat.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flashgen.jobs.inputs import LongLine

EOF = object()    # the input is finished
EMPTY = object()  # nothing read yet; ask again


class InputError(Exception):
    """Reading the input failed (an I/O error in the reader thread)."""


class LineSource:
    def __init__(self, lines: Iterator[tuple[int, bytes | LongLine]], maxsize: int = 256):
        self._q: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(lines,), name="flashgen-input", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, lines: Iterator[tuple[int, bytes | LongLine]]) -> None:
        try:
            for item in lines:
                if not self._put(item):
                    return
            self._put(EOF)
        except Exception as e:  # e.g. an I/O error: the run loop re-raises it where it can be reported
            self._put(InputError(f"{type(e).__name__}: {e}"))

    def get(self, wait: bool):
        """(lineno, raw), EOF, or EMPTY (nothing yet; waited at most 0.1 s when `wait`)."""
        try:
            item = self._q.get(timeout=0.1) if wait else self._q.get_nowait()
        except queue.Empty:
            return EMPTY
        if isinstance(item, InputError):
            raise item
        return item

    def close(self) -> None:
        """Stop the reader. It may stay blocked in a read of a stalled pipe: a daemon thread, it ends with us."""
        self._stop.set()
