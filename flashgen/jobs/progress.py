"""Progress bar and final summary, both on stderr: stdout carries results only."""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


@dataclass
class JobStats:
    status: str = "fatal"          # ok | line_errors | max_errors | interrupted | fatal
    started: bool = False          # the model loaded and lines were being read
    exit_code: int = 2
    model: str = ""
    input: str = ""
    output: str = ""
    shard: str = ""                # "K/N" of a sharded job (--shard); left out of the JSON when not sharded
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
        if not d["shard"]:
            d.pop("shard")
        return d

    def summary(self) -> str:
        parts = [f"{_count(self.lines, 'line')}: {self.ok:,} ok, {_count(self.errors, 'error')}"]
        if self.skipped:
            parts[0] += f", {self.skipped:,} already done"
        if self.error_codes:
            parts[0] += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.error_codes.items())) + ")"
        parts.append(f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} generated tokens")
        parts.append(f"{self.wall_seconds:.1f} s")
        parts.append(f"{_show_rate(self.tok_s, self.completion_tokens)} tok/s (prefill "
                     f"{_show_rate(self.prefill_tok_s, self.prompt_tokens)}, decode "
                     f"{_show_rate(self.decode_tok_s, self.completion_tokens)})")
        return f"flashgen: {self.status} (exit {self.exit_code}): " + " | ".join(parts)

    def write_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _count(n: int, noun: str) -> str:
    """1 line, 2 lines, 0 lines."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _show_rate(rate: float, tokens: int) -> str:
    """A tok/s figure for the summary: "0" only when no tokens were made. Work done in less time than the clock
    can tell gives no rate ("n/a"), never 0; a slow rate keeps a decimal (0.4, not 0)."""
    if rate <= 0:
        return "n/a" if tokens > 0 else "0"
    return f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"


def eta_seconds(lines_left: int | None, lines_finished: int, tokens_finished: int, tok_rate: float,
                tokens_in_flight: int = 0) -> float | None:
    """Seconds left, from tokens rather than lines: the lines left times the mean generated tokens of a finished
    line, less the tokens already generated for lines still running, over the recent generation rate (tok/s).
    None when it cannot be told honestly: the total is unknown (stdin), no line has finished yet, or there is no
    rate yet. Error records count as finished lines with no tokens: the mean is over lines that produced a result."""
    if lines_left is None:
        return None
    if lines_left <= 0:
        return 0.0
    if lines_finished <= 0 or tokens_finished <= 0 or tok_rate <= 0:
        return None
    remaining = lines_left * tokens_finished / lines_finished - max(0, tokens_in_flight)
    return max(0.0, remaining) / tok_rate


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TokenRate:
    """Generated tokens per second over the last `window` seconds (the whole run until that much has passed)."""

    def __init__(self, window: float = 30.0):
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, tokens: int) -> float:
        """Record the running total of generated tokens at time t; return the recent rate (0.0: none yet)."""
        self._samples.append((t, tokens))
        while len(self._samples) > 2 and self._samples[1][0] <= t - self.window:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (tokens - n0) / (t - t0) if t > t0 and tokens > n0 else 0.0


def _si(x: float) -> str:
    """1234567 -> 1.2M: rates stay short enough for an 80-column terminal."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


class JobProgress:
    """A rich progress bar on stderr: lines done / total (when known), prefill and decode tok/s, ETA. Fits 80
    columns. No-op when off. The ETA comes from tokens (see eta_seconds), not from lines per second: lines finish
    in bursts and differ in length, so a line rate swings from seconds to hours."""

    def __init__(self, enabled: bool, total: int | None, console: Console):
        self._bar = None
        self._total = total
        self._rate = TokenRate()
        if not enabled:
            return
        self._bar = Progress(
            BarColumn(bar_width=12), MofNCompleteColumn(), TextColumn("lines"), TextColumn("{task.fields[rates]}"),
            TextColumn("ETA {task.fields[eta]}"), console=console, transient=False, refresh_per_second=4,
        )
        self._task = self._bar.add_task("generate", total=total, rates="", eta=_clock(None))
        self._bar.start()

    def update(self, done: int, stats: JobStats, generated: int | None = None) -> None:
        """`generated`: tokens generated so far by the engine, running lines included (None: only finished
        lines' tokens are known)."""
        if self._bar is not None:
            rates = f"prefill {_si(stats.prefill_tok_s)} decode {_si(stats.decode_tok_s)} tok/s"
            total_gen = max(generated or 0, stats.completion_tokens)
            rate = self._rate.add(time.monotonic(), total_gen)
            left = None if self._total is None else self._total - done
            eta = eta_seconds(left, stats.ok, stats.completion_tokens, rate, total_gen - stats.completion_tokens)
            self._bar.update(self._task, completed=done, rates=rates, eta=_clock(eta))

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
