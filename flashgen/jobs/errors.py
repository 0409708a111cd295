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
    INCOMPLETE = 4     # flashgen merge: input lines without a record, ids with several, or records of no input line
    INTERRUPTED = 130  # SIGINT, SIGTERM or SIGHUP: finished lines are saved; run again with --resume
    PIPE_CLOSED = 141  # the reader of stdout went away (`| head`): 128 + SIGPIPE, as other Unix tools exit


class FatalError(Exception):
    """A problem that stops the whole job; its message says what to change."""


class Interrupted(BaseException):
    """Raised by the signal handler to abort at once (a second signal, or a signal while loading). A
    BaseException, as KeyboardInterrupt is, so no `except Exception` on the way (a loader's, a library's) can
    swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
