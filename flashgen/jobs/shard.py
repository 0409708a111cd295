"""Shards: one job of N that takes every N-th input line (`flashgen generate --shard K/N`), for job arrays.

Shard K of N takes the input lines whose index satisfies index % N == K. The index is 0-based and counts the
lines `read_lines` yields, in file order: blank lines are not lines, and nothing else is skipped (a line that
will become an error record has an index like any other). It depends on the input file only, never on
`--resume` or on which lines are already done, so every shard and every rerun of a shard agrees on it. The
line numbers in error records, and the stand-in id of a line without one, stay the file's own line numbers, so
a shard writes exactly the records one job over the whole input writes for those lines.

Why round-robin (index % N) rather than N contiguous ranges: it needs no line count first, so it works on stdin
and starts at once on a huge file; and it balances the work when the input is sorted or grouped (by length, by
source, by difficulty), where contiguous ranges would give one shard all the long prompts. The output order of
the shards is restored by `flashgen merge --input`, which reads the input itself (see flashgen.jobs.merge).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from flashgen.jobs.errors import FatalError
from flashgen.jobs.inputs import read_lines

PLACEHOLDER = "{shard}"
SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
_SPEC = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")
LABEL = re.compile(r"(\d+)-of-(\d+)")  # a shard's label in a file name, as `label` writes it

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    k: int  # this shard, 0 <= k < n
    n: int  # shards in all

    @property
    def spec(self) -> str:
        """"K/N", as --shard takes it (and the stats JSON records it)."""
        return f"{self.k}/{self.n}"

    @property
    def label(self) -> str:
        """"KK-of-NN" for file names: K and N with the same number of digits, at least two, so the names of
        all shards sort in shard order and one glob (`out.*-of-08.jsonl`) matches them all."""
        width = max(2, len(str(self.n)))
        return f"{self.k:0{width}d}-of-{self.n:0{width}d}"

    def select(self, lines: Iterator[T]) -> Iterator[T]:
        """The shard's items of `lines` (the (lineno, raw) pairs of read_lines): the others are passed over
        unparsed, which costs reading them and nothing more."""
        k, n = self.k, self.n
        for index, item in enumerate(lines):
            if index % n == k:
                yield item


def parse_shard(value: str, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard --shard (or [job] shard) asks for: None for "" (the whole input), "auto" from a Slurm job array's
    variables, else "K/N". A bad value is a FatalError naming it and the fix, raised before the model loads."""
    value = value.strip()
    if not value:
        return None
    if value == "auto":
        return _from_slurm(os.environ if env is None else env)
    m = _SPEC.fullmatch(value)
    if not m:
        raise FatalError(f"--shard {value!r} is not a shard; use K/N (shard K of N, 0 <= K < N, e.g. 0/8), or "
                         "auto in a Slurm job array")
    return _checked(int(m.group(1)), int(m.group(2)), f"--shard {value}")


def _checked(k: int, n: int, where: str) -> Shard:
    if n < 1:
        raise FatalError(f"{where}: N is {n}, but there must be at least 1 shard; use K/N with N >= 1, e.g. 0/8")
    if not 0 <= k < n:
        raise FatalError(f"{where}: K is {k}, but shards of {n} are numbered 0 to {n - 1}; use K/N with "
                         f"0 <= K < N (the first shard is 0/{n}, the last {n - 1}/{n})")
    return Shard(k, n)


def _from_slurm(env: Mapping[str, str]) -> Shard:
    """K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN (divided by SLURM_ARRAY_TASK_STEP), N =
    SLURM_ARRAY_TASK_COUNT: so `--array=0-7` and `--array=1-8` both make shards 0/8 .. 7/8. The task ids must be
    one evenly spaced range (a list such as 1,3,7 is refused: its ids do not number the shards)."""
    fix = ("run it as a task of a Slurm job array (sbatch --array=0-7, which sets them), or give the shard "
           "yourself with --shard K/N")
    missing = [v for v in SLURM_VARS[:2] if not env.get(v, "").strip()]
    if missing:
        raise FatalError(f"--shard auto reads {', '.join(SLURM_VARS)} (and SLURM_ARRAY_TASK_STEP), but "
                         f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; {fix}")

    def number(name: str, default: int | None = None) -> int:
        text = env.get(name, "").strip()
        if not text and default is not None:
            return default
        try:
            return int(text)
        except ValueError:
            raise FatalError(f"--shard auto: {name} is {text!r}, not an integer; {fix}") from None

    task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
    low, step = number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1)
    where = (f"--shard auto (SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={low}, "
             f"SLURM_ARRAY_TASK_COUNT={count}" + (f", SLURM_ARRAY_TASK_STEP={step}" if step != 1 else "") + ")")
    high = env.get("SLURM_ARRAY_TASK_MAX", "").strip()
    if step < 1 or (task - low) % step or (high.lstrip("-").isdigit() and int(high) - low != (count - 1) * step):
        raise FatalError(f"{where}: the array's task ids are not one evenly spaced range, so they do not number "
                         "the shards; use --array=0-N (or 1-N), or give the shard yourself with --shard K/N")
    return _checked((task - low) // step, count, where)


def expand(path: str, shard: Shard | None, what: str) -> str:
    """`path` with {shard} replaced by the shard's label (out.{shard}.jsonl -> out.03-of-08.jsonl)."""
    if PLACEHOLDER not in path:
        return path
    if shard is None:
        raise FatalError(f"{what} {path} has {PLACEHOLDER}, which is the shard's label, but no --shard was given; "
                         "add --shard K/N (or --shard auto in a Slurm job array), or remove it from the name")
    return path.replace(PLACEHOLDER, shard.label)


def count_lines(stream, shard: Shard, max_line_bytes: int) -> int:
    """The shard's lines in `stream`: the same lines, counted the same way, as the job reads (for the progress
    bar's total)."""
    n = sum(1 for _ in read_lines(stream, max_line_bytes))
    return len(range(shard.k, n, shard.n))


def label_of(name: str) -> Shard | None:
    """The shard a file name carries (its last KK-of-NN), or None."""
    found = LABEL.findall(os.path.basename(name))
    if not found:
        return None
    k, n = (int(x) for x in found[-1])
    return Shard(k, n) if 0 <= k < n else None
