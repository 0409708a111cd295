"""The output: one job per file, overwrite protection, --resume, and an ordered writer of whole, flushed lines.

Crash safety rests on three facts: each record is one `write` of one complete line followed by a flush, so a
kill -9 loses at most the lines in flight plus possibly one torn last line; --resume drops a torn last line
(a record never contains a raw newline, so a line without its newline is exactly a torn one); and a write that
fails (a full disk) cuts the file back to its last whole line before the job stops.

The output is the job's own: an exclusive lock (flashgen.jobs.lock) is taken before anything reads or changes it,
before the model loads, and held until the job ends. --resume checks what it finds: every line must be a
flashgen record; when the input is a file, each result's request_hash (flashgen.jobs.fingerprint) is compared
with its input line's, and results of changed lines are dropped like old error records, in place
(flashgen.jobs.compact), so those lines run again.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, BinaryIO

from flashgen.jobs import compact
from flashgen.jobs.compress import check_supported, compression_of, open_read, open_write
from flashgen.jobs.errors import FatalError
from flashgen.jobs.fingerprint import KeyHashMap, hash_value, request_hash
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, LongLine, read_lines
from flashgen.jobs.lock import OutputLock
from flashgen.jobs.records import input_line_hint, is_error, read_record

if TYPE_CHECKING:
    from flashgen.jobs.shard import Shard

SHOW_IDS = 5  # ids named in a resume note


@dataclass
class OutputPlan:
    path: Path | None                 # None: stdout
    resume: bool = False
    done: IdSet | KeyHashMap = field(default_factory=IdSet)   # keys of lines that already have a result
    n_done: int = 0
    n_errors: int = 0                 # error records in the old output: dropped, so their lines run again
    torn: bool = False                # the old output ends in a partial line (the job was killed mid-write)
    good_bytes: int = 0               # size of the old output up to its last whole line
    n_stale: int = 0                  # results of input lines (or settings) changed since: dropped, run again
    stale_ids: list = field(default_factory=list)
    n_foreign: int = 0                # results whose id is not in the input: kept
    foreign_ids: list = field(default_factory=list)
    first_drop: int = 0               # offset of the first line to drop: compaction starts there
    recovered: bool = False           # an interrupted compaction was finished first
    fingerprint: str = ""
    input_hashes: KeyHashMap | None = None   # the input's key -> request hash (input from a file, on resume)
    lock: OutputLock | None = None
    notes: list[str] = field(default_factory=list)   # what --resume found, for the log

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "stdout"

    def release(self) -> None:
        """End of the job: let another job have the file."""
        if self.lock is not None:
            self.lock.release()

    def verdict(self, rec: dict, key: str) -> str:
        """What --resume does with one old record: "error" and "stale" are dropped, "keep" is a done line."""
        if is_error(rec):
            return "error"
        if self.input_hashes is not None:
            want = self.input_hashes.get(key)
            have = hash_value(rec.get("request_hash"))
            if want and have and want != have:
                return "stale"
        return "keep"

    def keep(self, raw: bytes) -> bool:
        # a line that is no record (the scan refuses such files) was moved in by a recovery: kept as it is
        rec, key = read_record(raw)
        return key is None or self.verdict(rec, key) == "keep"

    def watch(self, lines: Iterator[tuple[int, bytes | LongLine]],
              log: Callable[[str], None]) -> Iterator[tuple[int, bytes | LongLine]]:
        """Input from stdin on --resume: it cannot be read twice, so nothing was compared before the run. Pass the
        lines through and warn about each done line whose request hash differs from its result's: that result is
        kept (the line does not run again)."""
        if not isinstance(self.done, KeyHashMap) or not len(self.done):
            yield from lines
            return
        head, n = _head_parser().head, 0
        for lineno, raw in lines:
            line = head(lineno, raw)
            if line.own_id and line.error is None:
                old = self.done.get(line.key)
                if old:
                    self.done.clear_value(line.key)  # the first line with an id owns it
                    if hash_value(request_hash(line.obj, self.fingerprint)) != old:
                        n += 1
                        if n <= SHOW_IDS:
                            log(f"flashgen: warning: line {lineno} (id {line.id!r}) changed (or the settings did) "
                                f"since its result in {self.name} was written; the old result was kept. To run it "
                                f"again, delete that result's line and --resume, or resume with the input as a "
                                "file: then changed lines run again by themselves")
            yield lineno, raw
        if n > SHOW_IDS:
            log(f"flashgen: warning: {n} lines in all changed since their results were written; old results kept")


def check_writable(path: str, what: str) -> None:
    """FatalError unless `path` can be written: an existing file is opened for appending (and left as it was),
    a new one needs a writable directory. Read-only file systems and permissions are found here, in a second."""
    p = Path(path)
    if p.is_dir():
        raise FatalError(f"{what} {path} is a directory; give a file name such as {p / 'out.jsonl'}")
    if not p.parent.is_dir():
        raise FatalError(f"{what} {path}: the directory {p.parent} does not exist; create it first")
    try:
        if p.exists():
            open(p, "ab").close()
        elif not os.access(p.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied (the directory is not writable or is read-only)")
    except OSError as e:
        raise FatalError(f"cannot write {what} {path}: {e.strerror or e}; choose a writable path") from None


def plan_output(output: str | None, input_path: str | None, *, overwrite: bool, resume: bool,
                fingerprint: str = "", shard: Shard | None = None) -> OutputPlan:
    """Decide what happens to the output before the model loads, so a refusal costs nothing. A file output is
    locked here for the job's lifetime: the caller must `release()` the plan however the job ends. With a
    `shard`, resume compares the output with the shard's input lines only: the other shards' lines are neither
    its stale results nor its missing ones, and a result of a line of another shard is foreign."""
    if output in (None, "-"):
        if resume:
            raise FatalError("--resume needs an output file (-o FILE): results on stdout cannot be read back")
        return OutputPlan(None)
    if resume and overwrite:
        raise FatalError(f"--resume keeps {output} and appends to it, --overwrite replaces it; choose one")
    if resume and compression_of(output):
        raise FatalError(f"--resume cannot continue the compressed output {output}: resuming drops old error "
                         "records and a torn last line in place and appends, which a compressed file cannot take "
                         "safely. Decompress it to a plain .jsonl file and resume into that, or --overwrite it "
                         "(write a plain output when a job may need resuming, and compress it afterwards)")
    check_supported(output)
    check_writable(output, "output")  # before the lock and the model: a read-only path costs a second
    path = Path(output)
    in_file = input_path if input_path not in (None, "-") else None  # None: stdin
    if in_file is not None and path.exists() and os.path.samefile(in_file, path):
        raise FatalError(f"output {output} is the input file; write the results to another file")
    lock = OutputLock(path, output).acquire()  # before anything reads, truncates or compacts the file
    try:
        recovered = False
        if resume:
            try:
                recovered = compact.recover(path)
            except OSError as e:
                raise FatalError(f"cannot finish the interrupted --resume compaction of {output} (journal "
                                 f"{compact.journal_path(path)}): {e.strerror or e}; {_fix(e)}") from None
            _remove_old_temp(path)
        has_data = path.is_file() and path.stat().st_size > 0
        if resume and has_data:
            plan = _scan(path, in_file, fingerprint, shard)
        elif has_data and not overwrite:
            raise FatalError(
                f"output file {output} already exists; pass --resume to finish an interrupted job into it, "
                "or --overwrite to replace it"
            )
        else:
            plan = OutputPlan(path)
        plan.recovered, plan.fingerprint, plan.lock = recovered, fingerprint, lock
        if recovered:
            plan.notes.insert(0, f"flashgen: finished the interrupted compaction of {output} from its journal")
        return plan
    except BaseException:
        lock.release()
        raise


def _scan(path: Path, input_path: str | None, fingerprint: str, shard: Shard | None = None) -> OutputPlan:
    """Read an earlier run's output: ids with a result are done; error records, stale results and a torn tail
    are dropped (see OutputPlan.verdict)."""
    plan = OutputPlan(path, resume=True, fingerprint=fingerprint)
    if input_path is not None:
        plan.input_hashes = _prescan(input_path, fingerprint, shard)
    else:
        plan.done = KeyHashMap()  # with each done id its record's hash, for the warnings of `watch`
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                plan.torn = True
                break
            rec, key = read_record(raw)
            if key is None:
                raise FatalError(
                    f"cannot resume: {path}, line {lineno} is not a flashgen output record{input_line_hint(rec)}"
                    + ", so the file is not this job's output (or was edited); fix or delete that line, or pass "
                    "--overwrite instead"
                )
            verdict = plan.verdict(rec, key)
            if verdict == "keep":
                if isinstance(plan.done, KeyHashMap):
                    plan.done.put_first(key, hash_value(rec.get("request_hash")))
                else:
                    plan.done.add(key)
                plan.n_done += 1
                if plan.input_hashes is not None and key not in plan.input_hashes:
                    plan.n_foreign += 1
                    if len(plan.foreign_ids) < SHOW_IDS:
                        plan.foreign_ids.append(key)
            else:
                if not (plan.n_errors or plan.n_stale):
                    plan.first_drop = plan.good_bytes
                if verdict == "error":
                    plan.n_errors += 1
                else:
                    plan.n_stale += 1
                    if len(plan.stale_ids) < SHOW_IDS:
                        plan.stale_ids.append(key)
            plan.good_bytes += len(raw)
    if plan.n_stale:
        plan.notes.append(f"flashgen: {plan.n_stale:,} results were made from input lines or settings that changed "
                          f"since (ids {_ids(plan.stale_ids, plan.n_stale)}): dropped, those lines run again")
    if plan.n_foreign:
        where = f"shard {shard.spec} of {input_path}" if shard else input_path
        plan.notes.append(f"flashgen: {plan.n_foreign:,} results in {path} have ids that are not in {where} "
                          f"(ids {_ids(plan.foreign_ids, plan.n_foreign)}): kept")
    return plan


def _prescan(input_path: str, fingerprint: str, shard: Shard | None = None) -> KeyHashMap:
    """key -> request hash of every line of the input file (of the shard's lines only, with a shard): JSON and id
    only, no tokenization; memory 16-32 bytes a line. A line that cannot be read has no hash (0); a stand-in id
    (the line number of a line without a readable id) is not the line's own, so it is left out."""
    head, hashes = _head_parser().head, KeyHashMap()
    try:
        with open_read(input_path) as f:
            lines = read_lines(f)
            for lineno, raw in (lines if shard is None else shard.select(lines)):
                line = head(lineno, raw)
                if line.own_id:
                    value = 0 if line.error else hash_value(request_hash(line.obj, fingerprint))
                    hashes.put_first(line.key, value)
    except (OSError, EOFError) as e:
        raise FatalError(f"cannot read input file {input_path}: {getattr(e, 'strerror', None) or e}") from None
    return hashes


def _head_parser() -> LineParser:
    """A parser for phase 1 only (the id): it needs no tokenizer."""
    return LineParser(SimpleNamespace(vocab_size=0), 0, {})


def _ids(ids: list, n: int) -> str:
    return ", ".join(ids) + (", ..." if n > len(ids) else "")


def _remove_old_temp(path: Path) -> None:
    """Older versions rewrote the output through a temporary copy, which a crash could leave behind."""
    try:
        path.with_name(f".{path.name}.resume-tmp").unlink()
    except OSError:
        pass


def _fix(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space, then run again with --resume"
    return "fix the cause, then run again with --resume"


def open_output(plan: OutputPlan, stdout: BinaryIO | None = None) -> BinaryIO:
    """Open the output for the run; on resume, first drop old error records, stale results and a torn tail, in
    place; otherwise (empty file or --overwrite) truncate it, with the lock held."""
    if plan.path is None:
        return stdout if stdout is not None else sys.stdout.buffer
    try:
        if plan.resume and (plan.n_errors or plan.n_stale):
            compact.compact(plan.path, plan.keep, start=plan.first_drop)
        elif plan.resume and plan.torn:
            os.truncate(plan.path, plan.good_bytes)
        elif not plan.resume:
            compact.discard(plan.path)
    except OSError as e:
        raise FatalError(f"cannot drop old records from {plan.path} for --resume: {e.strerror or e}; {_fix(e)} "
                         f"(it first finishes this compaction from {compact.journal_path(plan.path)})") from None
    plan.input_hashes = None  # no longer needed: free its memory
    try:
        if compression_of(plan.path):  # never on resume (plan_output refuses it)
            return open_write(plan.path)
        # Unbuffered: every record reaches the OS in the write that carries it.
        return open(plan.path, "ab" if plan.resume else "wb", buffering=0)
    except OSError as e:
        raise FatalError(f"cannot open output file {plan.path}: {e.strerror or e}") from None


class OrderedWriter:
    """Writes records in input order (a reorder buffer holds the ones that finish early) or as they finish.
    `pending` counts lines reserved but not written: the runner bounds it, which bounds memory.

    With `path` (a file, not stdout), a write that fails (ENOSPC, EIO) cuts the file back to the end of its last
    whole record and raises FatalError naming the file, the error and the fix; nothing more is written."""

    def __init__(self, stream: BinaryIO, order: str = "input", path: Path | None = None):
        self.stream = stream
        self.in_order = order == "input"
        self.path = path
        self.reserved = 0
        self.written = 0
        self._next = 0                       # the seq to write next, in input order
        self._ready: dict[int, bytes] = {}
        self._good = _size(stream) if path is not None else 0   # end of the last whole record in the file
        self._failed: FatalError | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "stdout"

    @property
    def pending(self) -> int:
        return self.reserved - self.written

    def reserve(self) -> int:
        self.reserved += 1
        return self.reserved - 1

    def put(self, seq: int, record: dict) -> None:
        self.put_encoded(seq, encode(record))

    def put_encoded(self, seq: int, data: bytes) -> None:
        """`put` of a record encoded already (by `encode`, e.g. in a Ray actor: flashgen.ray)."""
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
        if self._failed is not None:
            raise self._failed
        view = memoryview(data)
        try:
            while view:  # a raw file may take part of a large write; the rest follows in the same record
                n = self.stream.write(view)
                view = view[n if n is not None else 0:]
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            if self.path is None:
                raise
            self._failed = self._fail(e)
            raise self._failed from None
        self._good += len(data)
        self.written += 1

    def _fail(self, e: OSError) -> FatalError:
        """The write of a record failed, perhaps half done: cut the file back to its last whole line."""
        try:
            if compression_of(self.path):  # the offsets are of the uncompressed records: nothing to cut at
                raise ValueError("compressed")
            os.ftruncate(self.stream.fileno(), self._good)
            cut = "it was cut back to its last whole line"
        except (OSError, ValueError, AttributeError):
            cut = ("the compressed file may end in a partial record" if compression_of(self.path) else
                   "its last line may be partial (--resume drops it)")
        why = e.strerror or str(e)
        return FatalError(f"cannot write the output file {self.path}: {why}; {cut}, and the {self.written:,} "
                          f"records this run wrote before are kept; {_fix(e)}")


def encode(record: dict) -> bytes:
    """One output line. backslashreplace: a lone surrogate becomes a \\udXXX escape, which is still valid JSON."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def _size(stream: BinaryIO) -> int:
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        return 0
