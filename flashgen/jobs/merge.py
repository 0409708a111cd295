"""`flashgen merge`: the outputs of a sharded job (`generate --shard K/N`) back into one output, in input order.

The input gives the order: its lines are read again and each line's key is found as the job finds it
(`LineParser.head`: the id, custom_id for OpenAI batch lines, the line number for a line without an id, the
recognizable id or the line number of a line that cannot be read). Nothing else could: results carry no line
number, and --resume appends the lines it reruns at the end of a shard's output, so a shard's output is not in
input order and interleaving the shards would be wrong. Without --input merge refuses.

Every input line must have exactly one record among the shard outputs, and every record must answer an input line.
Lines without a record (a shard missing, cut off, or with a torn last line), keys with more records than input
lines (a shard given twice, shards of two different splits) and records of no input line (another input, another
job) are reported with their counts, the first ids and the files; the exit code is then 4 (ExitCode.INCOMPLETE)
and nothing is written. --allow-missing writes the lines that have a record when the only problem is missing lines
(still exit 4: the output is not complete); it never papers over duplicates or foreign records.

Records are copied byte for byte, error records too (they are their lines' answers), so merged shards equal the
output of one job over the whole input. One exception makes that hold: an id on two input lines that sharding put
in different shards ran in both, where one job answers the later line with a duplicate_id error record; merge writes
that record (the job's own text) for the later line. When a key has several input lines, error records go to the
line they name ("line N: ..."), and results to the line of their own shard (the shard label KK-of-NN in the file
names); if the names have no labels, which result is which line's cannot be told, and merge refuses.

Memory: an index of the input's keys and of the records' offsets (some 200 bytes a line), not the records, which are
read again from plain files while writing; a compressed shard output is held decompressed in memory.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from flashgen.jobs import compact
from flashgen.jobs.compress import SUFFIXES, check_supported, compression_of, open_read, open_write
from flashgen.jobs.errors import ExitCode, FatalError, Interrupted
from flashgen.jobs.inputs import DEFAULT_MAX_LINE_BYTES, Line, LongLine, read_lines
from flashgen.jobs.lock import OutputLock
from flashgen.jobs.records import error_record, input_line_hint, is_error, read_record
from flashgen.jobs.shard import Shard, label_of
from flashgen.jobs.writer import SHOW_IDS, _head_parser, _ids, encode

_LINE = re.compile(r"line (\d+): ")   # how every error record's message starts (LineParser.error)


@dataclass(frozen=True, slots=True)
class Ref:
    """Where one record is: a file of `sources`, its byte offset and length, its line in that file, and for an
    error record the input line number its message names (0 for a result)."""
    file: int
    offset: int
    size: int
    line: int
    names: int


@dataclass
class Source:
    path: Path
    name: str                     # as the user wrote it (or as the glob / directory gave it)
    shard: Shard | None           # the label in its name, if any
    data: bytes | None = None     # a compressed file, decompressed
    fd: int | None = None         # a plain file, read again by offset while writing
    torn: bool = False


@dataclass
class Problems:
    n_missing: int = 0
    missing: list[str] = field(default_factory=list)
    missing_shards: set[int] = field(default_factory=set)
    n_dup: int = 0
    dups: list[str] = field(default_factory=list)
    n_foreign: int = 0
    foreign: list[str] = field(default_factory=list)
    foreign_files: set[str] = field(default_factory=set)
    n_ambiguous: int = 0
    ambiguous: list[str] = field(default_factory=list)

    @property
    def fatal(self) -> bool:
        """Problems --allow-missing does not allow."""
        return bool(self.n_dup or self.n_foreign or self.n_ambiguous)


def run_merge(sources: list[str], output: str | None, input_path: str | None, *, allow_missing: bool = False,
              overwrite: bool = False, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, quiet: bool = False) -> int:
    """Merge shard outputs; return the exit code (see the module docstring and ExitCode)."""
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    try:
        return int(_merge(sources, output, input_path, allow_missing, overwrite, max_line_bytes,
                          (lambda s: None) if quiet else log, log))
    except FatalError as e:
        log(f"flashgen: error: {e}")
        return int(ExitCode.FATAL)
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"flashgen: {e or 'SIGINT'}: stopped; nothing was written")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.PIPE_CLOSED)


def _merge(names: list[str], output: str | None, input_path: str | None, allow_missing: bool, overwrite: bool,
           max_line_bytes: int, note: Callable[[str], None], warn: Callable[[str], None]) -> ExitCode:
    if not input_path:
        raise FatalError("merge needs --input FILE, the input the shards read: only the input gives the order "
                         "(results carry no line numbers, and --resume appends the lines it reruns at the end of a "
                         "shard's output) and tells which lines are missing; e.g. flashgen merge 'out.*-of-08.jsonl' "
                         "--input prompts.jsonl -o out.jsonl")
    if input_path == "-" or not Path(input_path).is_file():
        raise FatalError(f"--input {input_path} is not a file; merge reads the input twice, so give the input file "
                         "the shards read (stdin cannot be read twice)")
    out = None if output is None or output == "-" else Path(output)
    if out is not None:
        check_supported(out)
        if out.is_dir():
            raise FatalError(f"output {output} is a directory; give a file name such as {out / 'out.jsonl'}")
        if not out.parent.is_dir():
            raise FatalError(f"output {output}: the directory {out.parent} does not exist; create it first")
        if out.exists() and not overwrite:
            raise FatalError(f"output file {output} already exists; pass --overwrite to replace it")
    sources = _expand(names, [p for p in (out, Path(input_path)) if p is not None])
    locks: list[OutputLock] = []
    try:
        for s in sources:
            if compact.journal_path(s.path).exists():
                raise FatalError(f"{s.name} has an unfinished --resume compaction (journal "
                                 f"{compact.journal_path(s.path)}); run its shard again with --resume first")
            if os.access(s.path.parent, os.W_OK):  # a running shard holds its output's lock: do not merge it
                locks.append(OutputLock(s.path, s.name).acquire())
        index = _index(sources, warn)
        occurrences = _read_input(input_path, max_line_bytes)
        problems, assigned = _check(occurrences, index, sources)
        n_lines = sum(len(v) for v in occurrences.values())
        _report(problems, sources, n_lines, input_path, warn)
        if problems.fatal or (problems.n_missing and not allow_missing):
            warn(f"flashgen: merge: nothing written{f' to {output}' if out is not None else ''}"
                 + ("; --allow-missing writes the lines that have a record" if problems.n_missing
                    and not problems.fatal else ""))
            return ExitCode.INCOMPLETE
        written, n_errors, n_dup_ids = _write(out, sources, input_path, max_line_bytes, index, assigned)
        note(f"flashgen: merged {written:,} of {n_lines:,} lines ({n_errors:,} error records) from "
             f"{len(sources)} files into {output if out is not None else 'stdout'}"
             + (f"; {n_dup_ids:,} line{'s' if n_dup_ids > 1 else ''} whose id an earlier line in another shard "
                "has got the duplicate_id error record one job writes" if n_dup_ids else ""))
        return ExitCode.INCOMPLETE if problems.n_missing else ExitCode.OK
    finally:
        for lock in locks:
            lock.release()
        for s in sources:
            if s.fd is not None:
                os.close(s.fd)


def _expand(names: list[str], exclude: list[Path]) -> list[Source]:
    """Files, globs (expanded here when the shell did not: quoted) and directories (their JSONL files, plain or
    compressed), each file once, in name order within a glob or directory; the output and the input are left out."""
    paths: list[tuple[Path, str]] = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and any(q.name.endswith(".jsonl" + s) for s in ("", *SUFFIXES)))
            if not found:
                raise FatalError(f"directory {name} has no .jsonl files (plain, {', '.join(SUFFIXES)}); give the "
                                 "shard outputs")
            paths += [(q, str(q)) for q in found]
        elif p.is_file():
            paths.append((p, name))
        elif glob.has_magic(name):
            found = sorted(Path(q) for q in glob.glob(name) if Path(q).is_file())
            if not found:
                raise FatalError(f"{name} matches no file; check the pattern (the shard outputs of "
                                 "-o out.{shard}.jsonl with --shard K/8 are out.*-of-08.jsonl)")
            paths += [(q, str(q)) for q in found]
        else:
            raise FatalError(f"shard output {name} does not exist" if not p.exists() else
                             f"shard output {name} is not a file or a directory")
    seen: set[str] = set()
    skip = {os.path.realpath(e) for e in exclude}
    sources = []
    for p, name in paths:
        real = os.path.realpath(p)
        if real in seen or real in skip:
            continue
        seen.add(real)
        check_supported(p)
        sources.append(Source(p, name, label_of(name)))
    if not sources:
        raise FatalError("no shard outputs to merge (only the output or the input itself was named)")
    return sources


def _index(sources: list[Source], warn: Callable[[str], None]) -> dict[str, Ref | list[Ref]]:
    """key -> where its record is (a list when there are several) for every record of every shard output."""
    index: dict[str, Ref | list[Ref]] = {}
    for i, s in enumerate(sources):
        try:
            if compression_of(s.path):
                with open_read(s.path) as f:
                    s.data = f.read()
                stream: BinaryIO = io.BytesIO(s.data)
            else:
                s.fd = os.open(s.path, os.O_RDONLY)
                stream = open(s.path, "rb")
        except (OSError, EOFError, ValueError) as e:
            raise FatalError(f"cannot read shard output {s.name}: {getattr(e, 'strerror', None) or e}") from None
        offset = 0
        with stream:
            for lineno, raw in enumerate(stream, 1):
                if not raw.endswith(b"\n"):
                    s.torn = True  # the job was killed mid-write: that line counts as missing
                    break
                if raw.strip():
                    key, ref = _ref(i, s, raw, offset, lineno)
                    old = index.setdefault(key, ref)
                    if isinstance(old, list):
                        old.append(ref)
                    elif old is not ref:
                        index[key] = [old, ref]
                offset += len(raw)
        if s.torn:
            warn(f"flashgen: merge: {s.name} ends in a torn line (its job was killed mid-write): that line counts as "
                 "missing; run its shard again with --resume")
    return index


def _ref(i: int, s: Source, raw: bytes, offset: int, lineno: int) -> tuple[str, Ref]:
    rec, key = read_record(raw)
    if key is None:
        raise FatalError(f"{s.name}, line {lineno} is not a flashgen output record{input_line_hint(rec)}; give only "
                         "the outputs of `flashgen generate --shard`")
    names = 0
    if is_error(rec):
        m = _LINE.match(str((rec.get("error") or {}).get("message", "")))
        names = int(m.group(1)) if m else 0
    return key, Ref(i, offset, len(raw), lineno, names)


@dataclass(frozen=True, slots=True)
class Occurrence:
    index: int   # 0-based among the input's lines (as a shard counts them)
    lineno: int  # the file's line number


def _read_input(input_path: str, max_line_bytes: int) -> dict[str, list[Occurrence]]:
    """key -> the input lines with that key, in input order; keys in the order of their first line."""
    head = _head_parser().head
    keys: dict[str, list[Occurrence]] = {}
    for index, line in _input_lines(input_path, max_line_bytes, head):
        keys.setdefault(line.key, []).append(Occurrence(index, line.lineno))
    return keys


def _input_lines(input_path: str, max_line_bytes: int,
                 head: Callable[[int, bytes | LongLine], Line]) -> Iterator[tuple[int, Line]]:
    try:
        with open_read(input_path) as f:
            for index, (lineno, raw) in enumerate(read_lines(f, max_line_bytes)):
                yield index, head(lineno, raw)
    except (OSError, EOFError, ValueError) as e:
        raise FatalError(f"cannot read input file {input_path}: {getattr(e, 'strerror', None) or e}") from None


def _check(occurrences: dict[str, list[Occurrence]], index: dict[str, Ref | list[Ref]],
           sources: list[Source]) -> tuple[Problems, dict[str, list[Ref | None]]]:
    """Count every key's records against its input lines; for keys on several lines, which record is whose."""
    p = Problems()
    n = _common_n(sources)
    assigned: dict[str, list[Ref | None]] = {}
    for key, occ in occurrences.items():
        got = index.get(key)
        refs = [] if got is None else got if isinstance(got, list) else [got]
        if len(refs) > len(occ):
            p.n_dup += len(refs) - len(occ)
            if len(p.dups) < SHOW_IDS:
                where = ", ".join(f"{sources[r.file].name} line {r.line}" for r in refs)
                p.dups.append(f"{key} ({len(refs)} records for {len(occ)} input line{'s' if len(occ) > 1 else ''}: "
                              f"{where})")
            continue
        if len(refs) < len(occ):
            p.n_missing += len(occ) - len(refs)
            if len(p.missing) < SHOW_IDS:
                p.missing.append(key)
        if len(occ) > 1:
            mapping = _assign(occ, refs, sources, n)
            if mapping is None:
                p.n_ambiguous += 1
                if len(p.ambiguous) < SHOW_IDS:
                    p.ambiguous.append(key)
                continue
            assigned[key] = mapping
        if len(refs) < len(occ) and n is not None:  # every file has a label (_common_n)
            have = {sources[r.file].shard.k for r in refs}  # type: ignore[union-attr]
            p.missing_shards.update(o.index % n for o in occ if o.index % n not in have)
    for key, got in index.items():
        if key not in occurrences:
            refs = got if isinstance(got, list) else [got]
            p.n_foreign += len(refs)
            p.foreign_files.update(sources[r.file].name for r in refs)
            if len(p.foreign) < SHOW_IDS:
                p.foreign.append(key)
    return p, assigned


def _common_n(sources: list[Source]) -> int | None:
    """N when every file's name carries a shard label of the same N, else None."""
    ns = {s.shard.n if s.shard is not None else None for s in sources}
    return ns.pop() if len(ns) == 1 else None


def _assign(occ: list[Occurrence], refs: list[Ref], sources: list[Source], n: int | None) -> list[Ref | None] | None:
    """The record of each input line of one key (None: missing), or None when that cannot be told. An error record
    names its line; a result belongs to the line of its file's shard."""
    out: list[Ref | None] = [None] * len(occ)
    left = list(refs)
    for i, o in enumerate(occ):
        r = next((r for r in left if r.names == o.lineno), None)
        if r is not None:
            out[i] = r
            left.remove(r)
    open_lines = [i for i in range(len(occ)) if out[i] is None]
    if n is None:  # no labels: only one way to pair them, or none that can be told
        if len(open_lines) > 1 and left:
            return None
        if left:
            out[open_lines[0]] = left[0]
        return out
    for i in open_lines:  # a result goes to the line of its own shard, never to another shard's line
        r = next((r for r in left if sources[r.file].shard.k == occ[i].index % n), None)  # type: ignore[union-attr]
        if r is not None:
            out[i] = r
            left.remove(r)
    return None if left else out


def _report(p: Problems, sources: list[Source], n_lines: int, input_path: str, warn: Callable[[str], None]) -> None:
    n = _common_n(sources)
    if n is not None:
        absent = sorted(set(range(n)) - {s.shard.k for s in sources if s.shard is not None})
        if absent:
            warn(f"flashgen: merge: no file for shard{'s' if len(absent) > 1 else ''} "
                 f"{', '.join(f'{k}/{n}' for k in absent[:SHOW_IDS])}{', ...' if len(absent) > SHOW_IDS else ''} "
                 f"(the files are named for {n} shards)")
    if p.n_missing:
        shards = sorted(p.missing_shards)
        warn(f"flashgen: merge: {p.n_missing:,} of {n_lines:,} input lines of {input_path} have no record (ids "
             f"{_ids(p.missing, p.n_missing)})"
             + (f", in shard{'s' if len(shards) > 1 else ''} {', '.join(f'{k}/{n}' for k in shards[:SHOW_IDS])}"
                f"{', ...' if len(shards) > SHOW_IDS else ''}" if shards and n is not None else "")
             + "; run the shards that have them again with --resume (flashgen generate ... --shard K/N -o SAME "
             "--resume), then merge again")
    if p.n_dup:
        warn(f"flashgen: merge: {p.n_dup:,} records more than there are input lines for their ids (a shard output "
             f"given twice, or outputs of two different splits): " + "; ".join(p.dups)
             + ("; ..." if len(p.dups) < p.n_dup else "") + "; give each shard's output once")
    if p.n_foreign:
        files = sorted(p.foreign_files)
        more = ", ..." if len(files) > SHOW_IDS else ""
        warn(f"flashgen: merge: {p.n_foreign:,} records have ids that no line of {input_path} has (ids "
             f"{_ids(p.foreign, p.n_foreign)}), in {', '.join(files[:SHOW_IDS])}{more}; give the input those shards "
             "read, and only their outputs")
    if p.n_ambiguous:
        warn(f"flashgen: merge: {p.n_ambiguous:,} ids are on several input lines that ran in different shards (ids "
             f"{_ids(p.ambiguous, p.n_ambiguous)}), and the file names carry no shard label (KK-of-NN), so which "
             "result is which line's cannot be told; name the outputs with -o out.{shard}.jsonl, or give each input "
             "line a unique id")


def _write(out: Path | None, sources: list[Source], input_path: str, max_line_bytes: int,
           index: dict[str, Ref | list[Ref]], assigned: dict[str, list[Ref | None]]) -> tuple[int, int, int]:
    """Write the records in input order (atomically: a temporary file renamed over `out`); (lines written, error
    records among them, duplicate_id records written for ids that ran in two shards)."""
    parser = _head_parser()
    tmp = None if out is None else out.with_name(f".merge-{os.getpid()}-{out.name}")  # keeps the suffix
    stream: BinaryIO
    try:
        if tmp is None:
            stream = sys.stdout.buffer
        else:
            stream = open_write(tmp) if compression_of(out) else open(tmp, "wb")
    except OSError as e:
        raise FatalError(f"cannot write {tmp}: {e.strerror or e}; the output's directory must be writable") from None
    written = n_errors = n_dup_ids = 0
    claimed: set[str] = set()
    cursor: dict[str, int] = {}
    try:
        for _, line in _input_lines(input_path, max_line_bytes, parser.head):
            key = line.key
            duplicate = False
            if line.own_id:  # as the runner does: the first line with an id owns it, a later good line is a dup
                duplicate = key in claimed and line.error is None
                claimed.add(key)
            if key in assigned:
                i = cursor.get(key, 0)
                cursor[key] = i + 1
                ref = assigned[key][i]
            else:
                got = index.get(key)
                ref = got if isinstance(got, Ref) else None
            if ref is None:
                continue  # missing (--allow-missing)
            data = _read(sources[ref.file], ref)
            if duplicate and ref.names != line.lineno:  # it ran in another shard than the line that owns the id
                data = encode(error_record(parser.duplicate(line)))
                n_dup_ids += 1
            stream.write(data)
            written += 1
            n_errors += ref.names != 0 or duplicate
        stream.flush()
        if tmp is not None:
            if not compression_of(out):
                os.fsync(stream.fileno())
            stream.close()
            os.replace(tmp, out)  # type: ignore[arg-type]
            tmp = None
    except OSError as e:
        if out is None:
            raise
        raise FatalError(f"cannot write the merged output {out}: {e.strerror or e}; nothing was written to "
                         "it") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                stream.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
    return written, n_errors, n_dup_ids


def _read(s: Source, ref: Ref) -> bytes:
    if s.data is not None:
        return s.data[ref.offset:ref.offset + ref.size]
    assert s.fd is not None
    return os.pread(s.fd, ref.size, ref.offset)
