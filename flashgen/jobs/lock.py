"""One job per output file: an exclusive lock held for the job's lifetime.

The lock is `flock(LOCK_EX | LOCK_NB)` on a file beside the output (`out.jsonl.lock`) that names the holder
(pid and host). Only the flock is trusted, never the file's existence: the kernel drops a flock when its process
dies, so a lock file left behind by `kill -9` does not block the next job. The holder removes the file when it
ends. A job that opened the lock file just before the holder removed it could lock the removed file, so a lock
counts only when the file it holds is still the one at the path (checked after locking, else retried).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from flashgen.jobs.errors import FatalError

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover - no flock (Windows): jobs are not protected from each other
    fcntl = None


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    def __init__(self, output: Path, name: str | None = None):
        self.output = name or str(output)  # as the user wrote it, for messages
        self.path = lock_path(Path(os.path.realpath(output)))  # a link to the output shares its lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock or raise FatalError naming the output file and the job that holds it."""
        if fcntl is None or self._fd is not None:
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FatalError(f"cannot create the lock file {self.path} for output {self.output}: "
                                 f"{e.strerror}; the output's directory must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FatalError(
                    f"output {self.output} is in use by another flashgen job ({holder}; lock file {self.path}); "
                    "two jobs must not write one file: wait for that job to end or stop it, or write to another "
                    "file with -o") from None
            except OSError as e:
                os.close(fd)
                raise FatalError(f"cannot lock {self.path} for output {self.output}: {e.strerror}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return self
        raise FatalError(f"cannot lock {self.path} for output {self.output}: it keeps changing")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # removed while still locked: no other job can take a removed file
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if not text:
        return "pid unknown"
    pid, host = text[0], (text[1] if len(text) > 1 else "")
    return f"pid {pid} on host {host}" if host else f"pid {pid}"
