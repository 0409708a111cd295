"""Lines built (checked, templated, tokenized) in worker processes, so the job's process keeps its GIL for the engine.

The preparation thread (flashgen.jobs.source.Prepared) runs Python for every line: JSON, checks, the chat template,
the tokenizer's wrapper. The engine's thread shares that process's GIL, and it gives the GIL up in every torch call
of a step; each time the preparation thread holds it, the engine's next launch waits. `PreparePool` (`--prepare-
workers N`) moves the costly part out of the process: the job's thread still reads each line's id and screens it
(flashgen.jobs.runner.LineScreen: duplicates and --resume need the lines in order, and cost one JSON parse), and the
lines to build go, a group at a time, to `workers` spawned processes that run the same LineParser (pickled: the
tokenizer, the sampling defaults, the --template by its path) and return the same items, in order. Several workers
also build groups side by side.

Start-up costs nothing: the workers start on a thread of their own while the job's preparation thread builds the
first groups itself, and take over once one of them is up. A worker that dies (a fault in the tokenizer's native
code) breaks the pool: the groups it had are built again on the job's thread, and so is every later one (`broken`
says why). A worker ends itself once the job's process is gone.

Importing this module needs neither torch nor a GPU; the workers import only the jobs' input code (and the job's
main module, as every spawned process does, unless it is a package's __main__, as `python -m flashgen` is).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashgen.jobs.inputs import LineParser, LongLine

_PARSER: LineParser | None = None  # a worker's own parser (_init)


def auto_workers() -> int:
    """[job] prepare_workers = auto: 0, the preparation thread, for now. On an H100 machine (16 cores) the workers
    halved how late a thread waiting like the engine's got the GIL back (1.44 -> 0.69 ms on average) and cut the
    engine's host time inside its launches, but the extract job at 0.3 of its lines took longer as a whole with
    them (19.78 s against 15.03 s, one pair): start-up waited for the workers to boot, and the preparation thread
    for the second one's (a 2.6 s stall), both fixed since and not yet measured on a GPU: BENCHMARKS.md, fifteenth
    session."""
    return 0


def _init(parser: LineParser, parent: int) -> None:
    global _PARSER
    # the job's process owns signals: it stops or drains the job, then ends the pool
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="flashgen-orphan-watch",
                     daemon=True).start()
    _PARSER = parser


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this worker once the job's process (`parent`, its pid given by the job: a worker still starting when
    the job was killed has been handed to another parent already) is gone (killed with SIGKILL: nothing ended the
    pool), instead of staying behind, blocked on its queue, on the scheduler's node."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _ready() -> bool:
    return _PARSER is not None


def _build(lines: list[tuple[int, bytes | LongLine]]) -> list:
    """The lines' items (build_lines). Each request's prompt ids are an int32 array (LineParser._check_len), which
    pickles as one block of bytes: as a list, unpickling a group's ~40,000 ints held the GIL ~1 ms at a time on the
    pool's result thread, the stall this module exists to avoid; the engine takes the array as it is."""
    from flashgen.jobs.runner import build_lines

    assert _PARSER is not None, "the worker's initializer ran"
    parser = _PARSER
    return build_lines(parser, [(lineno, parser.head(lineno, raw)) for lineno, raw in lines])


class PreparePool:
    """`workers` processes that build screened lines (`submit`), each with its own copy of `parser`.

    The processes are started on a thread of their own, all of them at once: starting one writes the pickled parser
    to it, which waits until its interpreter is up and reading (~0.5 s a worker on a 2-core CPU, more where the
    job's main module imports torch), and neither the job's thread nor the preparation thread may wait for that.
    Until a worker is up, `ready` is False."""

    def __init__(self, parser: LineParser, workers: int, log: Callable[[str], None] = lambda s: None):
        self.broken: str | None = None
        self.groups = 0  # groups handed to the workers
        self._log = log
        self._ex: ProcessPoolExecutor | None = None
        self._up: Future = Future()  # done once a worker has its parser (or the start failed)
        self._lock = threading.Lock()
        self._closed = False
        self._starter = threading.Thread(target=self._start, args=(parser, workers, os.getpid()),
                                         name="flashgen-prepare-start", daemon=True)
        self._starter.start()

    def _start(self, parser: LineParser, workers: int, parent: int) -> None:
        try:
            ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                                     initargs=(parser, parent))
            # A spawning executor starts a process inside submit() while none is idle, up to `workers`: one task
            # each now starts them all here. Left to the groups' submits, the second worker's start held the
            # preparation thread ~2.6 s on the H100 machine (BENCHMARKS.md, fifteenth session).
            first = [ex.submit(_ready) for _ in range(workers)]
        except BaseException as e:  # noqa: BLE001 - e.g. a parser that does not pickle: the thread builds
            self._up.set_exception(e)
            return
        with self._lock:
            self._ex = ex
            closed = self._closed
        if closed:  # the job ended while the workers started
            ex.shutdown(wait=False, cancel_futures=True)
        first[0].add_done_callback(self._started)

    def _started(self, first: Future) -> None:
        e = first.exception()
        if e is not None:
            self._up.set_exception(e)
        else:
            self._up.set_result(True)

    def ready(self) -> bool:
        """Whether a worker is up to take groups (until then, and once broken, the caller builds them itself)."""
        if self.broken is not None or not self._up.done():
            return False
        e = self._up.exception()
        if e is not None:
            self.fail(e)
            return False
        return True

    def submit(self, lines: list[tuple[int, bytes | LongLine]]) -> Future:
        """A future of the lines' items, as _build gives them; raises BrokenProcessPool once broken."""
        assert self._ex is not None, "only once ready()"
        fut = self._ex.submit(_build, lines)
        self.groups += 1
        return fut

    def fail(self, e: BaseException) -> None:
        """The pool is broken (a worker died, or could not start): say so once; the caller builds from now on."""
        if self.broken is None:
            self.broken = f"{type(e).__name__}: {e}"
            self._log(f"flashgen: the line preparation processes failed ({self.broken}); preparing lines in the "
                      "job's own process from here on")

    def close(self) -> None:
        """End the workers without waiting for groups still queued (their lines were never admitted); workers
        still starting are ended once started."""
        with self._lock:
            self._closed = True
            ex = self._ex
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)


def is_broken(e: BaseException) -> bool:
    return isinstance(e, BrokenProcessPool)


def result_or_none(fut: Future, timeout: float | None) -> Any:
    """fut's result, or None when it is not done within `timeout` (it raises what the work raised)."""
    try:
        return fut.result(timeout)
    except FutureTimeout:
        return None
