"""The run loop: feed lines to the engine's incremental API with a bounded window, write results as they come.

The window (`max_in_flight`) counts lines read but not yet written, including finished ones waiting in the
reorder buffer, so memory stays bounded by the window, never by the input's size. Errors count against the
window too, which keeps output in input order without holding more than the window.
"""
from __future__ import annotations

import signal
import traceback
from collections.abc import Callable, Iterator

from flashgen.jobs.errors import FatalError, Interrupted
from flashgen.jobs.fingerprint import KeyHashMap
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import Line, LineError, LineParser, LineRequest, LongLine
from flashgen.jobs.openai_batch import completion_tokens
from flashgen.jobs.progress import JobProgress, JobStats
from flashgen.jobs.records import error_record, result_record
from flashgen.jobs.signals import SignalGuard
from flashgen.jobs.source import EMPTY, EOF, InputError, LineSource
from flashgen.jobs.writer import OrderedWriter

SKIP = object()  # a line whose id already has a result in the output (--resume)


class LineScreen:
    """Phase 1 of a line against the lines before it: the line's own error, a duplicate id, or SKIP (done already,
    --resume); else the line itself, to build. It must see a job's lines in input order: the Runner's do, and so
    do the Ray driver's (flashgen.ray), which screens the whole input before the actors build the rest."""

    def __init__(self, parser: LineParser, done: IdSet | KeyHashMap | None = None):
        self.parser = parser
        self.seen = IdSet()
        self.done: IdSet | KeyHashMap = done if done is not None else IdSet()

    def __call__(self, line: Line) -> Line | LineError | object:
        first = self.seen.add(line.key) if line.own_id else True
        if line.error:
            return line.error
        if not first:
            return self.parser.duplicate(line)
        if line.key in self.done:
            return SKIP
        return line


class Runner:
    def __init__(self, llm, parser: LineParser, writer: OrderedWriter, stats: JobStats, *, max_in_flight: int,
                 max_errors: int = 0, return_token_ids: bool = False, progress: JobProgress | None = None,
                 signals: SignalGuard | None = None, drain: bool = False,
                 log: Callable[[str], None] = lambda s: None):
        self.llm, self.parser, self.writer, self.stats = llm, parser, writer, stats
        self.max_in_flight = max(1, max_in_flight)
        self.max_errors = max_errors
        self.return_token_ids = return_token_ids
        self.progress = progress
        self.signals = signals or SignalGuard()
        self.drain = drain  # on a first signal, finish the lines in flight (True) or drop them (False)
        self.log = log
        self.model_name = getattr(llm, "model_name", "")
        self._meta: dict[str, tuple[int, LineRequest, int]] = {}   # engine request id -> (seq, request, n_prompt)
        self._screen = LineScreen(parser)
        self._signal_handled = False
        self.max_seen_in_flight = 0                                 # for tests: the window really bounds reading

    def classify(self, lineno: int, raw: bytes | LongLine) -> object:
        """A request, an error record, or SKIP. The first line with an id owns it; a later line with the same id
        gets a duplicate_id error record (carrying that id) and does not run. An unreadable line's stand-in id
        (its line number) claims nothing, so it cannot make a good line with that id a duplicate."""
        item = self._screen(self.parser.head(lineno, raw))
        return self.parser.build(item) if isinstance(item, Line) else item

    def run(self, lines: Iterator[tuple[int, bytes | LongLine]], done: IdSet | KeyHashMap) -> str:
        """Run every line; return the status: ok | line_errors | max_errors | interrupted."""
        self._screen.done = done
        source = LineSource(lines, maxsize=min(self.max_in_flight, 1024))
        exhausted, stop = False, None
        self.signals.graceful = True
        try:
            while True:
                stop = self._check_signal() or stop  # a signal outranks --max-errors: exit code 130
                if stop == "interrupted" and not self.drain:
                    break  # lines in flight are dropped: --resume runs them again
                while stop is None and not exhausted and self.writer.pending < self.max_in_flight:
                    # Wait for input only when the engine has nothing to do.
                    got = source.get(wait=not self.llm.has_unfinished_requests())
                    if got is EMPTY:
                        break
                    if got is EOF:
                        exhausted = True
                    elif self._admit(self.classify(*got)) and self.max_errors and self.stats.errors >= self.max_errors:
                        stop = "max_errors"
                        self.log(f"flashgen: {self.stats.errors} bad lines (--max-errors {self.max_errors}): "
                                 f"stopped reading input; finishing {len(self._meta)} lines in flight")
                self.max_seen_in_flight = max(self.max_seen_in_flight, self.writer.pending)
                if self.signals.abort:
                    assert self.signals.requested is not None, "abort is a second signal"
                    raise Interrupted(self.signals.requested)
                if not self.llm.has_unfinished_requests():
                    if exhausted or stop:
                        break
                    continue  # waiting for input
                for out in self.llm.step():
                    self._finish(out)
                self._report()
            if stop == "interrupted" and not exhausted and not self._meta:
                # every line read before the signal is answered: if the input had no more, the job is complete
                exhausted = source.get(wait=True) is EOF
        except Interrupted:
            self.writer.flush_finished()
            return "interrupted"
        except (FatalError, BrokenPipeError):
            raise
        except InputError as e:  # re-raised from the reader thread
            self.writer.flush_finished()
            raise FatalError(f"cannot read the input: {e}; finished lines are saved, run again with --resume") from e
        except OSError as e:  # writing the output failed (a file's writer says so itself: this is stdout)
            raise FatalError(f"cannot write the output {getattr(self.writer, 'name', '')}: {e.strerror or e}; "
                             "run again with --resume once it is fixed") from None
        except Exception as e:  # the engine failed mid-run (e.g. out of memory): keep what is done
            self.writer.flush_finished()
            traceback.print_exc()
            raise FatalError(f"the engine failed: {type(e).__name__}: {e}; finished lines are saved, run again "
                             "with --resume") from e
        finally:
            source.close()
            self.signals.graceful = False
            self._report()
        if stop == "interrupted" and exhausted and not self._meta and not self.writer.pending:
            stop = None  # the signal came when every line was already answered: nothing is left to resume
        if stop:
            return stop
        return "line_errors" if self.stats.errors else "ok"

    def _check_signal(self) -> str | None:
        """After a first SIGINT/SIGTERM: take no more work, write what is finished, say so (once)."""
        if self.signals.requested is None or self._signal_handled:
            return None
        self._signal_handled = True
        self.writer.flush_finished()
        name = signal.Signals(self.signals.requested).name
        if self.drain:
            self.log(f"flashgen: {name}: stopped reading input; finishing {len(self._meta)} lines in flight "
                     "(signal again to stop now)")
        elif self._meta:
            self.log(f"flashgen: {name}: stopped; {len(self._meta)} lines in flight were dropped and run again "
                     "with --resume (--drain finishes them first)")
        return "interrupted"

    def _admit(self, item) -> bool:
        """Start one line; True when it became an error record."""
        if item is SKIP:
            self.stats.skipped += 1
            return False
        seq = self.writer.reserve()
        if isinstance(item, LineRequest):
            rid = str(seq)
            ids = item.prompt_ids
            assert ids is not None, "dropped only once the engine has them"
            try:
                self.llm.add_request(rid, ids, item.params)
            except ValueError as e:  # the engine's own checks (e.g. context length): this line's error
                item = self.parser.error(item, "invalid_request", str(e))
            except Exception as e:  # anything else raised for this one request is still only this line's
                item = self.parser.error(item, "engine_error", f"the engine refused this request: "
                                         f"{type(e).__name__}: {e}")
            else:
                n_prompt = len(ids)
                item.prompt_ids = None  # the engine has them; do not hold them twice
                self._meta[rid] = (seq, item, n_prompt)
                return False
        assert isinstance(item, LineError)
        self.stats.add_error(item.code)
        self.writer.put(seq, error_record(item))
        return True

    def _finish(self, out) -> None:
        seq, req, n_prompt = self._meta.pop(out.request_id)
        if out.finish_reason == "error":  # the engine isolated a fault of this request (see Engine._resolve)
            err = self.parser.error(req, out.error_code or "engine_error", out.error or "the engine failed")
            self.stats.add_error(err.code)
            self.writer.put(seq, error_record(err))
            return
        self.stats.add_ok(n_prompt, completion_tokens(out))  # every sample's tokens (n > 1)
        self.writer.put(seq, result_record(req, out, n_prompt, self.model_name, self.return_token_ids))

    def _report(self) -> None:
        self.stats.read_engine(getattr(self.llm, "stats", None))
        if self.progress is not None:
            engine = getattr(self.llm, "stats", None)
            generated = getattr(engine, "generated_tokens", None)
            self.progress.update(self.stats.lines + self.stats.skipped, self.stats,
                                 generated if isinstance(generated, int) else None)
