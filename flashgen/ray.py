"""Ray Data: flashgen over a Ray cluster, one engine per actor (`pip install 'flashgen[ray]'`).

Two ways in:

- `FlashgenPredictor`, a callable class for `ray.data.Dataset.map_batches`: each actor loads one engine and answers
  a batch of rows with one output row each, through the same line parser and run loop as `flashgen generate`
  (flashgen.jobs.runner), so a bad row becomes its error record, never an exception.

      ds.map_batches(FlashgenPredictor, fn_constructor_kwargs={"model": "DIR", "sampling": {"max_tokens": 64}},
                     compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=1024,
                     batch_format="pyarrow")

- `flashgen generate in.jsonl -o out.jsonl --ray auto` (`run_on_ray`): the whole job, with the output of a
  single-process run, line for line. The driver reads the input twice and holds none of it: a first pass screens
  every line (its id: duplicates, --resume) and cuts the file into chunks of whole lines; the actors read their
  chunks from the file themselves (it must be at the same path on every node); a second pass writes every line's
  record in input order through the job's ordered writer: the records the actors made, and the driver's own for
  lines screened out (unreadable lines, duplicate ids).

Ray is imported only here, and only when used: flashgen runs without it.
"""
from __future__ import annotations

import io
import json
import logging
import math
import signal
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flashgen.jobs.errors import FatalError, Interrupted
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import Line, LineError, LineParser, LongLine, read_lines
from flashgen.jobs.progress import JobProgress, JobStats
from flashgen.jobs.records import error_record, record_key
from flashgen.jobs.runner import SKIP, LineScreen, Runner
from flashgen.jobs.settings import SCHEMA, Settings, check_value
from flashgen.jobs.signals import SignalGuard
from flashgen.jobs.writer import OrderedWriter, encode, open_output

INSTALL = "pip install 'flashgen[ray]'"
# The [job] options a FlashgenPredictor takes: the ones that change what a line becomes. The others (the output,
# resume, order, signals) belong to a whole job: `flashgen generate --ray` has them.
PREDICTOR_JOB_KEYS = ("template", "field", "chat", "system", "return_token_ids", "max_in_flight")
# The columns of FlashgenPredictor's output: fixed types, so batches of any records concatenate.
COLUMNS = ("lineno", "key", "error", "record", "prompt_tokens", "completion_tokens")
CPUS_PER_ACTOR = 4  # a cluster without GPUs: one engine per this many CPUs, when --ray-actors is not given


def import_ray():
    """The ray module, or a FatalError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Ray Data extra, not only the core
    except ImportError as e:
        raise FatalError(f"--ray needs Ray Data, which cannot be imported ({e}); install it: {INSTALL}") from None
    return ray


def output_schema():
    import pyarrow as pa

    return pa.schema([("lineno", pa.int64()), ("key", pa.string()), ("error", pa.string()), ("record", pa.string()),
                      ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])


# ---- the actor ---------------------------------------------------------------------------------------------------
def predictor_settings(model: str | None, engine: dict | None, sampling: dict | None, job: dict | None) -> Settings:
    """Built-in defaults < the given options, each checked as a flashgen.toml key is (same names, same checks)."""
    given = {"engine": dict(engine or {}), "sampling": dict(sampling or {}), "job": dict(job or {})}
    if model is not None:
        given["engine"]["model"] = model
    values = {s: {k: (list(o.default) if isinstance(o.default, list) else o.default) for k, o in opts.items()}
              for s, opts in SCHEMA.items()}
    for section, table in given.items():
        allowed = PREDICTOR_JOB_KEYS if section == "job" else tuple(SCHEMA[section])
        for key, value in table.items():
            if key not in allowed:
                extra = (" (FlashgenPredictor takes the [job] options that change what a line becomes; the others "
                         "are of a whole job: flashgen generate --ray)" if key in SCHEMA["job"] else "")
                raise FatalError(f"FlashgenPredictor: unknown {section} option {key!r}{extra}; known: "
                                 + ", ".join(allowed))
            values[section][key] = check_value(section, key, value, "FlashgenPredictor")
    sources = {f"{s}.{k}": ("FlashgenPredictor" if k in given[s] else "default")
               for s, opts in SCHEMA.items() for k in opts}
    return Settings(values["engine"], values["sampling"], values["job"], sources)


class _RowStats(JobStats):
    """JobStats that also keep what the last line added: the Runner counts a line, then writes its record."""

    last: tuple[str | None, int, int] = (None, 0, 0)

    def add_error(self, code: str) -> None:
        super().add_error(code)
        self.last = (code, 0, 0)

    def add_ok(self, n_prompt: int, n_gen: int) -> None:
        super().add_ok(n_prompt, n_gen)
        self.last = (None, n_prompt, n_gen)


class _Rows(OrderedWriter):
    """The Runner's writer in an actor: keeps each line's record (encoded as the output file holds it), its key and
    its counts, by the line's place in the batch."""

    def __init__(self, stats: _RowStats):
        super().__init__(io.BytesIO())
        self.stats = stats
        self.rows: dict[int, tuple[str | None, str | None, str, int, int]] = {}   # COLUMNS but the lineno

    def put(self, seq: int, record: dict) -> None:
        code, n_prompt, n_gen = self.stats.last
        self.rows[seq] = (record_key(record), code, encode(record)[:-1].decode("utf-8"), n_prompt, n_gen)
        self.written += 1


class FlashgenPredictor:
    """One engine per Ray actor, for `Dataset.map_batches(FlashgenPredictor, fn_constructor_kwargs=...)`.

    Constructor: `model` (as --model) and the options of flashgen.toml's sections as dicts: `engine` (device, dtype,
    max_num_seqs, ...), `sampling` (the defaults a line's own fields override: max_tokens, temperature, ...), `job`
    (template, field, chat, system, return_token_ids, max_in_flight). Names, values and checks are those of
    flashgen.toml; files (model, template, json_schema, grammar) are read on the actor's node.

    Rows in: either a column `line` with the text (or bytes) of a JSONL line, or the fields of a line as columns
    (native or OpenAI batch lines; a null is a missing field, since a column cannot tell them apart). A `lineno`
    column gives the line numbers that error messages name and that stand in for a missing id; without it rows are
    numbered from 1 in each batch. Use batch_format="pyarrow": the numpy and pandas formats turn integer columns
    with nulls into floats. Duplicate ids are found within a batch only (`flashgen generate --ray` finds them over
    the whole input).

    Rows out, one per row in, in order: `lineno`, `key` (the id, or custom_id, as JSON text: 7 and "7" differ),
    `error` (the error code, null for a result), `record` (the output line exactly as `flashgen generate` writes it,
    without the newline), `prompt_tokens` and `completion_tokens`. Fixed column types, so batches of results and
    error records, of native and OpenAI lines, with or without logprobs, all concatenate.
    """

    def __init__(self, model: str | None = None, *, engine: dict | None = None, sampling: dict | None = None,
                 job: dict | None = None):
        from flashgen.jobs.generate import _load_model, make_parser, prepare

        settings = predictor_settings(model, engine, sampling, job)
        setup = prepare(settings)
        self.llm = _load_model(setup.model, setup.engine)
        self.parser: LineParser = make_parser(self.llm, setup, settings.job)
        self.window = settings.job["max_in_flight"] or 4 * setup.engine["max_num_seqs"]
        self.return_token_ids = settings.job["return_token_ids"]

    def __call__(self, batch):
        import pyarrow as pa

        lines = _lines_of(batch)
        stats = _RowStats()
        rows = _Rows(stats)
        runner = Runner(self.llm, self.parser, rows, stats, max_in_flight=self.window,
                        return_token_ids=self.return_token_ids, signals=SignalGuard())
        runner.run(iter(lines), IdSet())  # an engine failure raises: that is not one row's fault
        assert len(rows.rows) == len(lines), "the run loop answers every line"
        out = [(lineno, *rows.rows[i]) for i, (lineno, _) in enumerate(lines)]
        columns: list[Any] = list(zip(*out, strict=True)) if out else [[] for _ in COLUMNS]
        return pa.table(dict(zip(COLUMNS, columns, strict=True)), schema=output_schema())


def _lines_of(batch) -> list[tuple[int, bytes]]:
    """(line number, raw JSONL line) of each row of a batch: a pyarrow Table, a pandas DataFrame or a dict of
    columns (numpy arrays or lists)."""
    if hasattr(batch, "to_pylist"):  # pyarrow
        names, n = list(batch.column_names), batch.num_rows
        columns = {k: batch.column(k).to_pylist() for k in names}
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        names, n = list(batch.columns), len(batch)
        columns = {k: [_plain(v) for v in batch[k].tolist()] for k in names}
    else:
        names = list(batch)
        columns = {k: [_plain(v) for v in batch[k]] for k in names}
        n = len(columns[names[0]]) if names else 0
    linenos = columns.pop("lineno", None) or list(range(1, n + 1))
    if "line" in columns:
        raws = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v or b"")
                for v in columns["line"]]
    else:
        raws = [json.dumps({k: v for k, v in zip(columns, values, strict=True) if v is not None},
                           ensure_ascii=False).encode("utf-8", "surrogatepass")
                for values in zip(*columns.values(), strict=True)] if columns else [b"{}"] * n
    return [(int(lineno), raw) for lineno, raw in zip(linenos, raws, strict=True)]


def _plain(v: Any) -> Any:
    """A numpy or pandas value as plain JSON-able Python (a float NaN, pandas' missing value, as None)."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # numpy arrays and scalars
        v = v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# ---- the job: flashgen generate --ray ----------------------------------------------------------------------------
def check_ray_job(settings: Settings, input_path: str | None) -> None:
    """Refuse, before the output is locked, what a --ray job cannot do."""
    import_ray()
    job = settings.job
    if input_path in (None, "-"):
        raise FatalError("--ray needs the input as a file that every node of the cluster can read (the actors read "
                         "their lines from it); save stdin to a file on a shared filesystem and give its path")
    from flashgen.jobs.compress import compression_of

    if compression_of(input_path):
        raise FatalError(f"--ray cannot read the compressed input {input_path}: the actors read byte ranges of the "
                         "file; decompress it to a plain .jsonl file first")
    if job.get("shard"):
        raise FatalError("--ray and --shard both split the input; use one (--ray spreads one job over a cluster)")
    if job["data_parallel"] != "1":
        raise FatalError("--ray and --data-parallel both start several engines; use --ray-actors with --ray")


def _head_parser() -> LineParser:
    """A parser for phase 1 only (the id), as in flashgen.jobs.writer: the driver loads no tokenizer."""
    return LineParser(SimpleNamespace(vocab_size=0), 0, {})


def plan_chunks(path: str, max_line_bytes: int, screen: LineScreen, lines_per_chunk: int) -> tuple[list[dict], int]:
    """The driver's first pass: screen every line and cut the file into chunks of whole lines, each with
    `lines_per_chunk` lines for the actors (fewer in the last) and the numbers of the lines in its range that the
    driver answers itself (screened out). Returns the chunks and the count of non-blank lines. Memory: a few
    bytes per chunk and 8 per screened-out line, never the lines."""
    head = _head_parser().head
    chunks: list[dict] = []
    exclude, n_run, start, first, n_lines = array("q"), 0, 0, 1, 0
    with open(path, "rb") as f:
        for lineno, raw in read_lines(f, max_line_bytes):
            n_lines += 1
            if isinstance(screen(head(lineno, raw)), Line):
                n_run += 1
            else:
                exclude.append(lineno)
            if n_run == lines_per_chunk:
                end = f.tell()
                chunks.append({"path": path, "start": start, "end": end, "first": first, "lines": n_run,
                               "exclude": exclude.tobytes(), "max_line_bytes": max_line_bytes})
                exclude, n_run, start, first = array("q"), 0, end, lineno + 1
        if n_run:
            chunks.append({"path": path, "start": start, "end": f.tell(), "first": first, "lines": n_run,
                           "exclude": exclude.tobytes(), "max_line_bytes": max_line_bytes})
    return chunks, n_lines


class _Range(io.RawIOBase):
    """`n` bytes of a file from its current position: a chunk, as a stream read_lines can take."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(b)[:n]) or 0
        self.left -= got
        return got


def read_chunks(batch):
    """Ray Data map_batches function: the chunks of a batch (see plan_chunks) -> rows (lineno, line) of the lines
    the actors run, read from the input file on this node."""
    import pyarrow as pa

    linenos: list[int] = []
    lines: list[bytes] = []
    for c in batch.to_pylist():
        skip = set(array("q", c["exclude"]))
        with open(c["path"], "rb", buffering=0) as f:
            f.seek(c["start"])
            stream = io.BufferedReader(_Range(f, c["end"] - c["start"]))
            n = 0
            for lineno, raw in read_lines(stream, c["max_line_bytes"], start=c["first"]):
                if lineno in skip:
                    continue
                if isinstance(raw, LongLine):
                    raise RuntimeError(f"{c['path']}, line {lineno} changed since the driver read it")
                linenos.append(lineno)
                lines.append(raw)
                n += 1
        if n != c["lines"]:
            raise RuntimeError(f"{c['path']} changed since the driver read it: bytes {c['start']}-{c['end']} hold "
                               f"{n} lines to run, not {c['lines']}")
    return pa.table({"lineno": pa.array(linenos, pa.int64()), "line": pa.array(lines, pa.binary())})


def _actors(ray, job: dict, engine: dict) -> tuple[int, dict[str, float]]:
    """(number of actors, Ray resources of each): a GPU cluster gets one engine per tensor_parallel_size GPUs;
    a cluster without GPUs (or --device cpu) one per CPUS_PER_ACTOR CPUs, one CPU left for reading the input."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus and engine["device"] != "cpu":
        tp = engine["tensor_parallel_size"]
        return job["ray_actors"] or max(1, gpus // tp), {"num_gpus": tp}
    n = job["ray_actors"] or max(1, (cpus - 1) // CPUS_PER_ACTOR)
    return n, {"num_cpus": max(1, (cpus - 1) // n)}


def _absolute(value: str) -> str:
    """A path the driver can see, made absolute: the actors do not run in the driver's directory."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def _connect(ray, address: str, quiet: bool) -> bool:
    """Join (or start) the cluster; True when this call did, so the job disconnects at its end. ray.init installs
    its own SIGTERM handler: the job's is put back, so a scheduler's SIGTERM still stops the job cleanly."""
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    kw: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "WARNING" if quiet else "INFO"}
    if address == "local":
        kw["include_dashboard"] = False
    try:
        ray.init(address=address, **kw)
    except Exception as e:
        raise FatalError(f"--ray {address}: cannot connect to the Ray cluster: {type(e).__name__}: {e}") from None
    finally:
        if main and old is not None:
            signal.signal(signal.SIGTERM, old)
    return True


def _dataset(ray, settings: Settings, setup, chunks: list[dict], batch: int):
    job, engine = settings.job, settings.engine
    n, resources = _actors(ray, job, engine)
    sampling = dict(settings.sampling)
    for key in ("json_schema", "grammar"):
        sampling[key] = _absolute(sampling[key])
    kwargs = {"model": _absolute(setup.model or ""),
              "engine": {k: v for k, v in engine.items() if k != "model"}, "sampling": sampling,
              "job": {**{k: job[k] for k in PREDICTOR_JOB_KEYS}, "template": _absolute(job["template"])}}
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(read_chunks, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    return ds.map_batches(FlashgenPredictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=n),
                          batch_size=batch, batch_format="pyarrow", **resources), n


class _Results:
    """The actors' rows by line number, pulled from the dataset as the driver's second pass asks for them. Ray Data
    keeps input order (preserve_order), so rows that come early are few; they are held until asked for.

    Waiting for the cluster can take minutes, so a signal there stops the job at once (Interrupted): only the wait
    is cut short, never a write."""

    def __init__(self, batches: Iterator, signals: SignalGuard):
        self.batches, self.signals = batches, signals
        self.rows: dict[int, tuple] = {}

    def _next(self):
        self.signals.graceful = False
        try:
            if self.signals.requested is not None:
                raise Interrupted(self.signals.requested)
            return next(self.batches, None)
        finally:
            self.signals.graceful = True

    def get(self, lineno: int) -> tuple:
        while lineno not in self.rows:
            table = self._next()
            if table is None:
                raise FatalError(f"the Ray job gave no result for input line {lineno}; run again with --resume")
            for row in zip(*(table.column(c).to_pylist() for c in COLUMNS), strict=True):
                self.rows[row[0]] = row
        return self.rows.pop(lineno)


def run_on_ray(settings: Settings, setup, input_path: str, plan, results, stats: JobStats, signals: SignalGuard,
               console, log: Callable[[str], None], total: int | None) -> str:
    """`flashgen generate --ray`: the job over a Ray cluster; returns the status as Runner.run does."""
    ray = import_ray()
    job, engine = settings.job, settings.engine
    batch = job["max_in_flight"] or 4 * engine["max_num_seqs"]
    chunks, n_lines = plan_chunks(input_path, job["max_line_bytes"], LineScreen(_head_parser(), plan.done), batch)
    writer = OrderedWriter(open_output(plan, results), "input", path=plan.path)
    show = job["progress"] == "on" or (job["progress"] == "auto" and sys.stderr.isatty())
    progress = JobProgress(show and not job["quiet"], n_lines if total is not None else None, console)
    joined, context, saved = False, None, None
    quiet = [logging.getLogger(name) for name in ("ray", "ray.data")] if job["quiet"] else []
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # --quiet: Ray's notes too (its warnings and errors still show)
        logger.setLevel(logging.WARNING)
    stats.started = True
    signals.graceful = True
    try:
        rows = _Results(iter(()), signals)
        if chunks:  # else every line is done already or answered by the driver: no cluster needed
            joined = _connect(ray, job["ray"], job["quiet"])
            from ray.data import DataContext

            context = DataContext.get_current()
            saved = (context.execution_options.preserve_order, context.enable_progress_bars)
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False
            ds, n = _dataset(ray, settings, setup, chunks, batch)
            log(f"flashgen: Ray: {n} engines on {len(chunks):,} chunks of up to {batch:,} lines")
            rows = _Results(iter(ds.iter_batches(batch_format="pyarrow", batch_size=None)), signals)
        return _write_all(input_path, job, plan.done, rows, writer, stats, progress, signals, log)
    except (FatalError, BrokenPipeError):
        raise
    except Exception as e:  # the cluster failed (an actor died, a node went away): keep what is written
        lines = [s for s in str(e).splitlines() if s.strip()]
        raise FatalError(f"the Ray job failed: {type(e).__name__}: {lines[-1] if lines else e}; finished lines are "
                         "saved, run again with --resume") from None
    finally:
        signals.graceful = False
        progress.stop()
        if plan.path is not None:
            writer.stream.close()
        if context is not None and saved is not None:
            context.execution_options.preserve_order, context.enable_progress_bars = saved
        if joined:
            ray.shutdown()
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def _write_all(input_path: str, job: dict, done, rows: _Results, writer: OrderedWriter, stats: JobStats,
               progress: JobProgress, signals: SignalGuard, log: Callable[[str], None]) -> str:
    """The driver's second pass: every line's record in input order, the actors' or the driver's own."""
    parser = _head_parser()
    screen = LineScreen(parser, done)  # the first pass's decisions again: same lines, same order, same done ids
    with open(input_path, "rb") as f:
        for lineno, raw in read_lines(f, job["max_line_bytes"]):
            if signals.requested is not None:
                log(f"flashgen: {signal.Signals(signals.requested).name}: stopped; the lines not yet written run "
                    "again with --resume")
                return "interrupted"
            item = screen(parser.head(lineno, raw))
            if item is SKIP:
                stats.skipped += 1
                continue
            seq = writer.reserve()
            if isinstance(item, LineError):
                stats.add_error(item.code)
                writer.put(seq, error_record(item))
            else:
                _, _, code, record, n_prompt, n_gen = rows.get(lineno)
                if code is None:
                    stats.add_ok(n_prompt, n_gen)
                else:
                    stats.add_error(code)
                writer.put_encoded(seq, (record + "\n").encode("utf-8"))
            if job["max_errors"] and stats.errors >= job["max_errors"]:
                log(f"flashgen: {stats.errors} bad lines (--max-errors {job['max_errors']}): stopped; the lines not "
                    "yet written run again with --resume")
                return "max_errors"
            if stats.lines % 64 == 0:
                progress.update(stats.lines + stats.skipped, stats)
    progress.update(stats.lines + stats.skipped, stats)
    return "line_errors" if stats.errors else "ok"
