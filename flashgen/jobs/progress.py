"""Progress bar and final summary, both on stderr: stdout carries results only."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@dataclass
class JobStats:
    status: str = "fatal"          # ok | line_errors | max_errors | interrupted | fatal
    started: bool = False          # the model loaded and lines were being read
    exit_code: int = 2
    model: str = ""
    input: str = ""
    output: str = ""
    lines: int = 0                 # lines answered in this run (results + error records)
    ok: int = 0
    errors: int = 0
    skipped: int = 0               # already done in the output (--resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    tok_s: float = 0.0             # generated tokens per wall-clock second, everything included
    error_codes: dict[str, int] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def add_error(self, code: str) -> None:
        self.errors += 1
        self.lines += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def add_ok(self, n_prompt: int, n_gen: int) -> None:
        self.ok += 1
        self.lines += 1
        self.prompt_tokens += n_prompt
        self.completion_tokens += n_gen

    def read_engine(self, engine_stats) -> None:
        """Engine timings: the prefill/decode split only the engine can measure."""
        if engine_stats is None:
            return
        self.prefill_seconds = float(getattr(engine_stats, "prefill_seconds", 0.0))
        self.decode_seconds = float(getattr(engine_stats, "decode_seconds", 0.0))
        self.prefill_tok_s = _rate(getattr(engine_stats, "prompt_tokens", 0), self.prefill_seconds)
        self.decode_tok_s = _rate(getattr(engine_stats, "generated_tokens", 0), self.decode_seconds)

    def finish(self) -> None:
        self.wall_seconds = time.monotonic() - self._t0
        self.tok_s = _rate(self.completion_tokens, self.wall_seconds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_t0")
        return d

    def summary(self) -> str:
        parts = [f"{self.lines:,} lines: {self.ok:,} ok, {self.errors:,} errors"]
        if self.skipped:
            parts[0] += f", {self.skipped:,} already done"
        if self.error_codes:
            parts[0] += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.error_codes.items())) + ")"
        parts.append(f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} generated tokens")
        parts.append(f"{self.wall_seconds:.1f} s")
        parts.append(f"{self.tok_s:,.0f} tok/s (prefill {self.prefill_tok_s:,.0f}, decode {self.decode_tok_s:,.0f})")
        return f"flashgen: {self.status} (exit {self.exit_code}): " + " | ".join(parts)

    def write_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _si(x: float) -> str:
    """1234567 -> 1.2M: rates stay short enough for an 80-column terminal."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


class JobProgress:
    """A rich progress bar on stderr: lines done / total (when known), prefill and decode tok/s, ETA. Fits 80
    columns. No-op when off."""

    def __init__(self, enabled: bool, total: int | None, console: Console):
        self._bar = None
        if not enabled:
            return
        self._bar = Progress(
            BarColumn(bar_width=12), MofNCompleteColumn(), TextColumn("lines"), TextColumn("{task.fields[rates]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False, refresh_per_second=4,
        )
        self._task = self._bar.add_task("generate", total=total, rates="")
        self._bar.start()

    def update(self, done: int, stats: JobStats) -> None:
        if self._bar is not None:
            rates = f"prefill {_si(stats.prefill_tok_s)} decode {_si(stats.decode_tok_s)} tok/s"
            self._bar.update(self._task, completed=done, rates=rates)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
