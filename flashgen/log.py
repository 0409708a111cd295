"""Where the `flashgen` logger's records go: stderr, set up by the command line only.

Modules log through `logging.getLogger(__name__)`, children of "flashgen". The library never installs a handler
(an application decides where its logs go); the CLI calls `log_to_stderr` before each command, so stdout keeps
only results.
"""
from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when the handler was made (tests swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


class _Format(logging.Formatter):
    """`flashgen: message`, like the CLI's other notes; a level other than INFO is named: `flashgen: warning: ...`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"flashgen: {level}{record.message}"


def log_to_stderr(level: int) -> None:
    """Send the `flashgen` logger's records of `level` and above to stderr; again, it only changes the level."""
    logger = logging.getLogger("flashgen")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
        logger.propagate = False  # a root handler some other library installed would print each record twice
    logger.setLevel(level)
