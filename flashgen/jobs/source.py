"""Input lines read by a background thread into a small bounded queue, and prepared ahead of the engine by another.

The run loop must never block on input while the engine has work: with `producer | flashgen`, a producer that
pauses would otherwise hold back results already computable, and a signal could not stop a loop stuck in a
read. So a daemon thread reads (blocking is harmless there), and the loop polls the queue: without waiting
while the engine has work, with a short timeout while it is idle. The queue bound keeps memory flat.

Preparing a line (JSON, checks, chat template, tokenization) costs about 2 ms for a 1,300-token prompt, most of it
tokenization; on the job's thread that is time the GPU waits. `Prepared` does it on one more thread, in input
order, a few lines at a time, so it overlaps the engine's steps; the texts of a group are tokenized in one
encode_batch call, which runs outside the GIL and on all cores (the tokenizers library's encode() holds the GIL).
At most `ahead` lines are prepared and not yet taken: memory stays bounded by the window, not the input.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashgen.jobs.inputs import LongLine

EOF = object()    # the input is finished
EMPTY = object()  # nothing read yet; ask again


class InputError(Exception):
    """Reading the input failed (an I/O error in the reader thread)."""


class PrepareError(Exception):
    """Preparing the input failed as a whole, not as one line's fault (e.g. out of memory): the job stops."""


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

    def close(self, wait: float = 1.0) -> None:
        """Stop the reader; wait for it at most `wait` seconds. It may stay blocked in a read of a stalled pipe: a
        daemon thread, it ends with us."""
        self._stop.set()
        if wait > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait)


class Prepared:
    """`source`'s lines through `prepare` on a thread of their own, in input order: `get` gives each line's
    prepared item (a request, an error record or SKIP), EOF or EMPTY, as LineSource.get gives raw lines. `prepare`
    takes a group of (lineno, raw) and returns one item for each, or a handle whose `result(timeout)` gives them
    once they are made elsewhere (None until then: flashgen.jobs.runner.PendingGroup, a worker process building
    them); it handles each line's own faults itself (an exception it raises stops the job: PrepareError). A group
    is what the reader has ready, at most `group` lines, so a slow producer's lines are not held back to fill one;
    groups still being made count against `ahead`: at most that many lines are prepared, or being prepared, and not
    yet taken."""

    def __init__(self, source: LineSource, prepare: Callable[[list], Any], ahead: int, group: int = 32):
        self._source, self._prepare = source, prepare
        self.ahead = max(1, ahead)
        self._group = max(1, min(group, self.ahead))
        self._ready: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.busy_s = 0.0  # seconds this thread spent preparing (overlapped with the engine's steps)
        self.max_ready = 0  # the most items prepared and not yet taken at any time (tests: the bound holds)
        # groups handed to `prepare` and not yet pushed, in input order: (items or handle, lines, what ends the
        # input after them or None)
        self._pending: deque = deque()
        self._in_flight = 0  # lines in those groups
        self._thread = threading.Thread(target=self._run, name="flashgen-prepare", daemon=True)
        self._thread.start()

    def _push(self, items: list) -> None:
        with self._cv:
            self._ready.extend(items)
            self.max_ready = max(self.max_ready, len(self._ready))
            self._cv.notify_all()

    def _flush(self, timeout: float) -> bool:
        """Push the groups made so far, in input order, waiting at most `timeout` for the oldest one; True once the
        input's end has been pushed."""
        while self._pending:
            handle, n, end = self._pending[0]
            items = handle if isinstance(handle, list) else handle.result(timeout)
            if items is None:
                return False
            timeout = 0
            assert len(items) == n, "one item per line"
            self._pending.popleft()
            self._in_flight -= n
            self._push(items if end is None else [*items, end])
            if end is not None:
                return True
        return False

    def _run(self) -> None:
        try:
            while True:
                if self._flush(0):
                    return
                with self._cv:
                    if self._stop:
                        return
                    free = self.ahead - len(self._ready) - self._in_flight
                    full = free < self._group and (self._ready or self._pending)
                    if full and not self._pending:
                        self._cv.wait(0.1)  # room for a whole group (or nothing held: room for any)
                        continue
                if full:
                    self._flush(0.05)  # the oldest group in the making
                    continue
                got = self._source.get(wait=not self._pending)
                if got is EMPTY:
                    self._flush(0.01)
                    continue
                if got is EOF:
                    self._pending.append(([], 0, EOF))
                    self._finish()
                    return
                room = min(self._group, max(1, free))
                raws, end = [got], None
                while len(raws) < room:
                    try:
                        got = self._source.get(wait=False)
                    except InputError as e:  # the lines read before it are still answered first
                        end = e
                        break
                    if got is EMPTY:
                        break
                    if got is EOF:
                        end = EOF
                        break
                    raws.append(got)
                t = time.perf_counter()
                handle = self._prepare(raws)
                self.busy_s += time.perf_counter() - t
                self._pending.append((handle, len(raws), end))
                self._in_flight += len(raws)
                if end is not None:
                    self._finish()
                    return
        except InputError as e:
            self._finish()
            self._push([e])
        except BaseException as e:  # not one line's fault: the job's thread stops the job
            err = PrepareError(f"{type(e).__name__}: {e}")
            err.__cause__ = e
            self._push([err])

    def _finish(self) -> None:
        """Push every group still in the making, in order (the input has ended), unless stopped first."""
        while self._pending and not self._stop:
            self._flush(0.1)

    def get(self, wait: bool):
        """A prepared item, EOF, or EMPTY (nothing ready; waited at most 0.1 s when `wait`). Re-raises the reader's
        InputError and PrepareError, after every line before them was taken."""
        with self._cv:
            if not self._ready and wait:
                self._cv.wait(0.1)
            if not self._ready:
                return EMPTY
            item = self._ready[0]
            if item is EOF or isinstance(item, (InputError, PrepareError)):
                pass  # stays: the end is the end however often it is asked for
            else:
                self._ready.popleft()
                if len(self._ready) + self._group <= self.ahead:  # room for a group: wake the thread if it waits
                    self._cv.notify_all()
        if isinstance(item, (InputError, PrepareError)):
            raise item
        return item

    def close(self, wait: float = 5.0) -> None:
        """Stop preparing (a group being prepared is finished first, then dropped) and the reader; wait for both
        threads at most `wait` seconds each. Once the thread has ended, `prepare` is let go: it is usually a method
        of the object that holds this one, and the reference cycle would keep that object (and what it holds, the
        engine) alive until a garbage collection instead of ending with the job."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._source.close(0)
        if self._thread is not threading.current_thread():
            self._thread.join(wait)
        self._source.close(wait)
        if not self._thread.is_alive():
            self._prepare = _closed


def _closed(group: list) -> list:
    raise RuntimeError("the preparation thread was closed")
