"""The run loop: feed lines to the engine's incremental API with a bounded window, write results as they come.

The window (`max_in_flight`) counts lines read but not yet written, including finished ones waiting in the
reorder buffer, so memory stays bounded by the window, never by the input's size. Errors count against the
window too, which keeps output in input order without holding more than the window.

Lines are prepared (parsed, screened, checked, templated, tokenized) ahead of the engine on a thread of their own
(flashgen.jobs.source.Prepared), in input order, at most `ahead` of them (at most the window) prepared and not yet
admitted; the loop here only admits prepared lines and steps the engine. A line is counted, reserved in the output
and written only once admitted: lines prepared but not admitted when the job stops are dropped, and run again with
--resume.

Admission is paced: while the engine holds at least half a window of unfinished requests (by default twice
max_num_seqs: a batch's worth queued beyond those it runs), one pass of the loop admits at most ADMIT_PACE lines as
requests before stepping the engine (lines skipped on --resume and error records are not counted: they cost the
engine's thread next to nothing, and a resumed job's done lines pass at once). Each admission is host work on the
engine's thread (~60-100 us), and when a wave of a fixed-length job ends a quarter of the window opens at once:
admitting all of it between two steps (~250 lines, 15-25 ms) can hold back the launch of the next prefill step past
the end of the one the GPU is running (what the extract job's idle between prefill steps looks like). Measured
together with the scheduler's held places on an H100 (BENCHMARKS.md, twelfth session): at half the extract job's
lines the idle at the waves' ends fell from 1.10-1.28 s to 0.08-0.17 s, while the idle between decode steps rose by
about as much (admissions paced between them); the whole job was level. The lines admitted later are not needed
sooner: a batch's worth is still queued.
"""
from __future__ import annotations

import signal
import traceback
from collections.abc import Callable, Iterator

from flashgen.engine.launch_gate import LaunchGate
from flashgen.jobs.errors import FatalError, Interrupted
from flashgen.jobs.fingerprint import KeyHashMap
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import Line, LineError, LineParser, LineRequest, LongLine, key_of
from flashgen.jobs.openai_batch import completion_tokens
from flashgen.jobs.prepare_pool import PreparePool, is_broken, result_or_none
from flashgen.jobs.progress import JobProgress, JobStats
from flashgen.jobs.records import error_record, result_record
from flashgen.jobs.signals import SignalGuard
from flashgen.jobs.source import EMPTY, EOF, InputError, LineSource, Prepared, PrepareError
from flashgen.jobs.writer import OrderedWriter

SKIP = object()  # a line whose id already has a result in the output (--resume)
PREPARE_GROUP = 32  # lines prepared together: their prompts are tokenized in one encode_batch call
ADMIT_PACE = 32     # requests admitted per pass of the run loop while half the window is in flight (module docstring)


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


def unexpected_error(parser: LineParser, lineno: int, line: Line | LineRequest | None, e: Exception) -> LineError:
    """The error record of a line whose preparation raised what no check expects (a bug, or a tokenizer fault):
    that line fails, the job goes on."""
    message = (f"preparing this line failed: {type(e).__name__}: {e}; the job went on without it (this is a "
               "bug: please report it with the line)")
    if line is None:  # head() itself failed: the line is known by its number, like an unreadable line
        return LineError(lineno, lineno, key_of(lineno), False, "internal_error", f"line {lineno}: {message}")
    return parser.error(line, "internal_error", message)


def build_lines(parser: LineParser, lines: list[tuple[int, Line]], pause: Callable[[], None] | None = None
                ) -> list[object]:
    """Phase 2 of screened lines (LineParser.build with defer, then encode_pending: their prompts tokenized
    together): each line's request or error record, an exception no check expects being that line's
    internal_error record. Runs on the preparation thread, or in a PreparePool's worker.

    `pause`: called between lines (on the preparation thread: the engine's LaunchGate.pause, or a plain yield of
    the GIL). Building a line is pure Python (~0.1-0.5 ms), and the engine's thread drops the GIL in torch calls:
    one that finds this thread holding it can wait up to the interpreter's switch interval (5 ms) before its next
    launch. A yield per line bounds that to about one line's work, and the gate keeps this thread off the GIL for
    the rest of a launch (flashgen.engine.launch_gate)."""
    items: list[object] = []
    for lineno, line in lines:
        try:
            items.append(parser.build(line, defer=True))
        except MemoryError:
            raise
        except Exception as e:
            items.append(unexpected_error(parser, lineno, line, e))
        if pause is not None:
            pause()  # the docstring
    try:
        return parser.encode_pending(items)
    except MemoryError:
        raise
    except Exception:  # one text the tokenizer cannot take: find it, the others still run
        out: list[object] = []
        for (lineno, _), item in zip(lines, items, strict=True):
            try:
                out += parser.encode_pending([item])
            except MemoryError:
                raise
            except Exception as e:
                assert isinstance(item, LineRequest), "only requests are encoded"
                out.append(unexpected_error(parser, lineno, item, e))
        return out


class PendingGroup:
    """A group of lines whose screened lines a PreparePool's worker builds: `result` gives the group's items in
    order once it has (None while it has not, within `timeout`). If the pool broke, the lines are built here."""

    def __init__(self, parser: LineParser, pool: PreparePool, items: list[object], todo: list[int],
                 lines: list[tuple[int, Line]], fut, pause: Callable[[], None]):
        self.parser, self.pool, self.items, self.todo, self.lines, self.fut = parser, pool, items, todo, lines, fut
        self.pause = pause

    def result(self, timeout: float | None) -> list[object] | None:
        try:
            built = result_or_none(self.fut, timeout)
        except Exception as e:  # noqa: BLE001 - a worker died (BrokenProcessPool) or could not take the lines
            if not is_broken(e):
                raise
            self.pool.fail(e)
            built = build_lines(self.parser, self.lines, pause=self.pause)
        if built is None:
            return None
        assert len(built) == len(self.todo), "one item per line"
        for i, item in zip(self.todo, built, strict=True):
            self.items[i] = item
        return self.items


class Runner:
    def __init__(self, llm, parser: LineParser, writer: OrderedWriter, stats: JobStats, *, max_in_flight: int,
                 max_errors: int = 0, return_token_ids: bool = False, progress: JobProgress | None = None,
                 signals: SignalGuard | None = None, drain: bool = False,
                 log: Callable[[str], None] = lambda s: None, prepare_ahead: bool = True,
                 prepare_workers: int = 0):
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
        # False: each line is prepared on this thread when its turn comes (classify), as before Prepared existed
        self.prepare_ahead = prepare_ahead
        self.ahead = min(self.max_in_flight, 1024)                  # lines prepared and not yet admitted, at most
        self.prepared: Prepared | None = None                       # the preparation thread of the current run
        # processes that build lines for the preparation thread (flashgen.jobs.prepare_pool); 0: that thread does
        self.prepare_workers = prepare_workers if prepare_ahead else 0
        self.pool: PreparePool | None = None                        # the current run's
        self.pool_groups = 0                                        # groups its workers built (the last run)
        self._source: LineSource | None = None
        # the preparation thread's yield point between lines: the engine's launch gate where it has one (an engine
        # in this process), else one that is never closed (a plain yield of the GIL)
        gate = getattr(getattr(llm, "engine", None), "launch_gate", None)
        self.pause: Callable[[], None] = (gate if isinstance(gate, LaunchGate) else LaunchGate(False)).pause

    def classify(self, lineno: int, raw: bytes | LongLine) -> object:
        """A request, an error record, or SKIP. The first line with an id owns it; a later line with the same id
        gets a duplicate_id error record (carrying that id) and does not run. An unreadable line's stand-in id
        (its line number) claims nothing, so it cannot make a good line with that id a duplicate. An exception no
        check expects is that line's internal_error record (build_lines)."""
        item = self._screened(lineno, raw)
        return build_lines(self.parser, [(lineno, item)])[0] if isinstance(item, Line) else item

    def _screened(self, lineno: int, raw: bytes | LongLine) -> object:
        """Phase 1 of a line (LineParser.head, then LineScreen): its error record, SKIP, or the Line to build."""
        line = None
        try:
            line = self.parser.head(lineno, raw)
            return self._screen(line)
        except MemoryError:
            raise
        except Exception as e:
            return unexpected_error(self.parser, lineno, line, e)

    def prepare(self, group: list[tuple[int, bytes | LongLine]]) -> list[object] | PendingGroup:
        """classify() of each line of a group, in order (the same items), for the preparation thread: each line
        screened here; the lines to build, on this thread (build_lines), or where a PreparePool is up, in its
        worker processes (a PendingGroup: its items once a worker has built them)."""
        items = []
        for lineno, raw in group:
            items.append(self._screened(lineno, raw))
            self.pause()  # a line's JSON holds the GIL (build_lines)
        todo = [i for i, item in enumerate(items) if isinstance(item, Line)]
        lines = [(group[i][0], item) for i in todo if isinstance(item := items[i], Line)]
        pool = self.pool
        if todo and pool is not None and pool.ready():
            try:
                fut = pool.submit([group[i] for i in todo])
            except Exception as e:  # noqa: BLE001 - the pool broke since ready(): build here
                pool.fail(e)
            else:
                return PendingGroup(self.parser, pool, items, todo, lines, fut, self.pause)
        built = build_lines(self.parser, lines, pause=self.pause)
        for i, item in zip(todo, built, strict=True):
            items[i] = item
        return items

    def run(self, lines: Iterator[tuple[int, bytes | LongLine]], done: IdSet | KeyHashMap) -> str:
        """Run every line; return the status: ok | line_errors | max_errors | interrupted."""
        self._screen.done = done
        # the reader need not run far ahead of the preparation thread, which holds up to `ahead` lines itself
        source = self._source = LineSource(lines, maxsize=min(self.max_in_flight, 2 * PREPARE_GROUP
                                                              if self.prepare_ahead else 1024))
        if self.prepare_workers > 0:  # started in the background; a start that fails leaves the lines to the thread
            self.pool = PreparePool(self.parser, self.prepare_workers, self.log)
        feed = self.prepared = Prepared(source, self.prepare, self.ahead, PREPARE_GROUP) if self.prepare_ahead \
            else None
        exhausted, stop = False, None
        self.signals.graceful = True
        try:
            while True:
                stop = self._check_signal() or stop  # a signal outranks --max-errors: exit code 130
                if stop == "interrupted" and not self.drain:
                    break  # lines in flight are dropped: --resume runs them again
                admitted = 0
                while stop is None and not exhausted and self.writer.pending < self.max_in_flight and (
                        admitted < ADMIT_PACE or 2 * self.llm.num_unfinished_requests() < self.max_in_flight):
                    # Wait for input only when the engine has nothing to do.
                    got = self._take(wait=not self.llm.has_unfinished_requests())
                    if got is EMPTY:
                        break
                    # only requests are paced: a line skipped on --resume or answered with an error record
                    # costs the engine's thread next to nothing
                    admitted += isinstance(got, LineRequest)
                    if got is EOF:
                        exhausted = True
                    elif self._admit(got) and self.max_errors and self.stats.errors >= self.max_errors:
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
                exhausted = self._take(wait=True) is EOF
        except Interrupted:
            self.writer.flush_finished()
            return "interrupted"
        except (FatalError, BrokenPipeError):
            raise
        except InputError as e:  # re-raised from the reader thread
            self.writer.flush_finished()
            raise FatalError(f"cannot read the input: {e}; finished lines are saved, run again with --resume") from e
        except PrepareError as e:  # re-raised from the preparation thread: not one line's fault
            self.writer.flush_finished()
            raise FatalError(f"preparing the input failed: {e}; finished lines are saved, run again with "
                             "--resume") from e
        except OSError as e:  # writing the output failed (a file's writer says so itself: this is stdout)
            raise FatalError(f"cannot write the output {getattr(self.writer, 'name', '')}: {e.strerror or e}; "
                             "run again with --resume once it is fixed") from None
        except Exception as e:  # the engine failed mid-run (e.g. out of memory): keep what is done
            self.writer.flush_finished()
            traceback.print_exc()
            raise FatalError(f"the engine failed: {type(e).__name__}: {e}; finished lines are saved, run again "
                             "with --resume") from e
        finally:
            if feed is not None:
                feed.close()
            else:
                source.close()
            if self.pool is not None:
                self.pool_groups = self.pool.groups
                self.pool.close()
                self.pool = None
            self.signals.graceful = False
            self._report()
        if stop == "interrupted" and exhausted and not self._meta and not self.writer.pending:
            stop = None  # the signal came when every line was already answered: nothing is left to resume
        if stop:
            return stop
        return "line_errors" if self.stats.errors else "ok"

    def _take(self, wait: bool) -> object:
        """The next line's item (a request, an error record or SKIP), EOF, or EMPTY (none ready; waited at most
        0.1 s when `wait`). With preparation ahead this only takes what the preparation thread made."""
        if self.prepared is not None:
            return self.prepared.get(wait)
        assert self._source is not None, "only while running"
        got = self._source.get(wait)
        return got if got is EOF or got is EMPTY else self.classify(*got)

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
