"""The output: overwrite protection, --resume, and an ordered writer whose every line is whole and flushed.

Crash safety rests on two facts: each record is one `write` of one complete line followed by a flush, so a
kill -9 loses at most the lines in flight plus possibly one torn last line; and --resume drops a torn last line
(a record never contains a raw newline, so a line without its newline is exactly a torn one).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from flashgen.jobs.errors import FatalError
from flashgen.jobs.idset import IdSet
from flashgen.jobs.records import is_error, record_key


@dataclass
class OutputPlan:
    path: Path | None                 # None: stdout
    resume: bool = False
    done: IdSet = field(default_factory=IdSet)   # keys of lines that already have a result
    n_done: int = 0
    n_errors: int = 0                 # error records in the old output: dropped, so their lines run again
    torn: bool = False                # the old output ends in a partial line (the job was killed mid-write)
    good_bytes: int = 0               # size of the old output up to its last whole line

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "stdout"


def plan_output(output: str | None, input_path: str | None, *, overwrite: bool, resume: bool) -> OutputPlan:
    """Decide what happens to the output before the model loads, so a refusal costs nothing."""
    if output in (None, "-"):
        if resume:
            raise FatalError("--resume needs an output file (-o FILE): results on stdout cannot be read back")
        return OutputPlan(None)
    if resume and overwrite:
        raise FatalError(f"--resume keeps {output} and appends to it, --overwrite replaces it; choose one")
    path = Path(output)
    if path.is_dir():
        raise FatalError(f"output {output} is a directory; give a file name such as {path / 'out.jsonl'}")
    if not path.parent.is_dir():
        raise FatalError(f"output directory {path.parent} does not exist; create it first")
    if input_path not in (None, "-") and path.exists() and os.path.samefile(input_path, path):
        raise FatalError(f"output {output} is the input file; write the results to another file")
    has_data = path.is_file() and path.stat().st_size > 0
    if resume and has_data:
        return _scan(path)
    if has_data and not overwrite:
        raise FatalError(
            f"output file {output} already exists; pass --resume to finish an interrupted job into it, "
            "or --overwrite to replace it"
        )
    return OutputPlan(path)


def _scan(path: Path) -> OutputPlan:
    """Read an earlier run's output: ids with a result are done; error records and a torn tail are dropped."""
    plan = OutputPlan(path, resume=True)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                plan.torn = True
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            key = record_key(rec)
            if key is None:
                raise FatalError(
                    f"cannot resume: {path}, line {lineno} is not a flashgen output record, so the file is not "
                    "this job's output (or was edited); fix or delete that line, or pass --overwrite instead"
                )
            if is_error(rec):
                plan.n_errors += 1
            else:
                plan.done.add(key)
                plan.n_done += 1
            plan.good_bytes += len(raw)
    return plan


def open_output(plan: OutputPlan, stdout: BinaryIO | None = None) -> BinaryIO:
    """Open the output for the run; on resume, first cut the torn tail and drop old error records."""
    if plan.path is None:
        return stdout if stdout is not None else sys.stdout.buffer
    if plan.resume and plan.n_errors:
        _drop_errors(plan.path)
    elif plan.resume and plan.torn:
        os.truncate(plan.path, plan.good_bytes)
    # Unbuffered: every record reaches the OS in the write that carries it.
    return open(plan.path, "ab" if plan.resume else "wb", buffering=0)


def _drop_errors(path: Path) -> None:
    """Rewrite the output without its error records (and torn tail), so the failed lines run again and every
    id still ends up exactly once. A temporary file plus os.replace keeps the old file whole if this dies."""
    tmp = path.with_name(f".{path.name}.resume-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src:
            if raw.endswith(b"\n") and not is_error(json.loads(raw)):
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


class OrderedWriter:
    """Writes records in input order (a reorder buffer holds the ones that finish early) or as they finish.
    `pending` counts lines reserved but not written: the runner bounds it, which bounds memory."""

    def __init__(self, stream: BinaryIO, order: str = "input"):
        self.stream = stream
        self.in_order = order == "input"
        self.reserved = 0
        self.written = 0
        self._next = 0                       # the seq to write next, in input order
        self._ready: dict[int, bytes] = {}

    @property
    def pending(self) -> int:
        return self.reserved - self.written

    def reserve(self) -> int:
        self.reserved += 1
        return self.reserved - 1

    def put(self, seq: int, record: dict) -> None:
        # backslashreplace: a lone surrogate becomes a \udXXX escape, which is still valid JSON.
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        if not self.in_order:
            self._write(data)
            return
        self._ready[seq] = data
        while self._next in self._ready:
            self._write(self._ready.pop(self._next))
            self._next += 1

    def flush_finished(self) -> None:
        """On interruption: write every finished record now, even out of order; from here on, write each as it
        finishes. A later kill -9 then loses only what is still running."""
        self.in_order = False
        for seq in sorted(self._ready):
            self._write(self._ready.pop(seq))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a raw file may take part of a large write; the rest follows in the same record
            n = self.stream.write(view)
            view = view[n if n is not None else 0:]
        self.stream.flush()
        self.written += 1
