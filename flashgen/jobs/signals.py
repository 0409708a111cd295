"""SIGINT/SIGTERM handling: the first signal asks the run to stop taking work, a second one aborts at once.

Batch schedulers send SIGTERM and, after a grace period, SIGKILL. So on the first signal the run stops reading
input, writes every finished line at once (out of order if need be) and each further one as it finishes, while
the lines in flight complete; whatever SIGKILL then cuts off is only what was still running.
"""
from __future__ import annotations

import signal
import threading

from flashgen.jobs.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalGuard:
    def __init__(self) -> None:
        self.requested: int | None = None   # the first signal, once seen in graceful mode
        self.abort = False                  # a second signal: the run loop stops at its next safe point
        self.graceful = False               # True while the run loop can stop cleanly; else signals abort
        self._old: dict = {}

    def __enter__(self) -> "SignalGuard":
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
