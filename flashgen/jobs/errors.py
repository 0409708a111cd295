"""Exit codes and the two exceptions that end a job early.

The exit codes are part of flashgen's interface (shells, cron and batch schedulers branch on them), so they live
in one place and the README documents this table.
"""
from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0             # every line got a result
    LINE_ERRORS = 1    # the job finished, but some lines got error records instead of results
    FATAL = 2          # nothing more could run: bad flags, config, model, input or output file, engine failure
    MAX_ERRORS = 3     # stopped early because --max-errors bad lines were seen; fix the input, then --resume
    INTERRUPTED = 130  # SIGINT or SIGTERM: finished lines are saved; run again with --resume


class FatalError(Exception):
    """A problem that stops the whole job; its message says what to change."""


class Interrupted(Exception):
    """Raised by the signal handler to abort at once (a second signal, or a signal while loading)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
