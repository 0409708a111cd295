"""SIGINT/SIGTERM/SIGHUP handling.

Batch schedulers send SIGTERM and, after a grace period (often ~30 s), SIGKILL; a closed terminal sends SIGHUP.
So by default the first signal makes the run stop at its next step: it stops reading input, writes every line
that is finished (out of order if need be) and exits 130 at once; lines still in flight are dropped and run
again by --resume. With `drain` (--drain) the lines in flight are finished and written first. A second signal
always stops at once. Before the run loop starts (imports, model load) a signal stops the job with nothing
written.
"""
from __future__ import annotations

import signal
import threading

from flashgen.jobs.errors import Interrupted

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def install_startup_handlers() -> None:
    """From the first line of `main`: a signal while flashgen starts up (importing torch takes seconds) ends
    the process with exit 130 and a one-line note instead of a traceback or a death by signal."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handle)


class SignalGuard:
    def __init__(self) -> None:
        self.requested: int | None = None   # the first signal, once seen in graceful mode
        self.abort = False                  # a second signal: the run loop stops at its next safe point
        self.graceful = False               # True while the run loop can stop cleanly; else signals abort
        self._old: dict = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.graceful:  # loading: nothing to save, stop at once
            raise Interrupted(signum)
        # In the run loop only set flags; the loop acts on them between steps (it never blocks for long: input
        # is read by another thread). Raising here could cut a record in half (a write interrupted mid-line),
        # and I/O from a handler can re-enter a stream.
        if self.requested is None:
            self.requested = signum
        else:
            self.abort = True
