"""`flashgen generate`: settings -> checks -> model -> run -> summary -> exit code.

Everything that can be refused (config, flags, files, template) is checked before the model loads, so a typo
costs a second, not a model load. stdout carries results only: while a job writes to stdout, anything else that
prints to sys.stdout (a library's notice, say) is sent to stderr.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from flashgen.engine.gc_heap import freeze_startup_heap, thaw_heap
from flashgen.jobs.compress import compression_of, open_read
from flashgen.jobs.errors import ExitCode, FatalError, Interrupted
from flashgen.jobs.fingerprint import job_fingerprint
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.prepare_pool import auto_workers
from flashgen.jobs.progress import JobProgress, JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.settings import Settings, load_settings, render_toml
from flashgen.jobs.shard import Shard, count_lines, expand, parse_shard
from flashgen.jobs.signals import SignalGuard
from flashgen.jobs.writer import OrderedWriter, check_writable, open_output, plan_output
from flashgen.tokenizer import job_tokenizer_threads

STATUS_CODES = {"ok": ExitCode.OK, "line_errors": ExitCode.LINE_ERRORS, "max_errors": ExitCode.MAX_ERRORS,
                "interrupted": ExitCode.INTERRUPTED, "fatal": ExitCode.FATAL, "pipe_closed": ExitCode.PIPE_CLOSED}


def run_generate(input_path: str | None, output_path: str | None, config_file: str | None,
                 flags: dict[str, dict[str, Any]], *, overwrite: bool = False, show_config: bool = False) -> int:
    """Run one job; return its exit code (see flashgen.jobs.errors.ExitCode)."""
    job_tokenizer_threads()  # before anything in this process tokenizes a batch
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    stats = JobStats(input=input_path or "stdin", output=output_path or "stdout")
    results = sys.stdout.buffer  # taken before stdout is redirected to stderr below
    job: dict[str, Any] = {}
    with SignalGuard() as signals, contextlib.redirect_stdout(sys.stderr):
        try:
            settings = load_settings(config_file, flags, os.getcwd())
            job = settings.job
            if show_config:
                results.write(render_toml(settings).encode())
                results.flush()
                return ExitCode.OK
            shard = parse_shard(job["shard"])  # a bad --shard (or a missing Slurm variable) costs a second
            if shard is not None and job.get("ray"):
                raise FatalError(f"--shard {job['shard']} and --ray both spread one job over machines; use one: "
                                 "--ray for a Ray cluster, --shard for a job array (one job per shard)")
            if output_path not in (None, "-"):
                output_path = stats.output = expand(output_path, shard, "output")
            if job["stats_json"]:
                job["stats_json"] = expand(job["stats_json"], shard, "--stats-json")
            stats.shard = shard.spec if shard else ""
            stats.status = _run(settings, input_path, output_path, overwrite, stats, signals, results, console,
                                shard)
        except FatalError as e:
            console.print(f"flashgen: error: {e}", markup=False)
            stats.status = "fatal"
        except Interrupted as e:
            console.print(f"flashgen: {e}: stopped", markup=False)
            stats.status = "interrupted"
        except KeyboardInterrupt:  # SIGINT outside the main thread, where no handler could be installed
            stats.status = "interrupted"
        except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): nobody takes more results
            with contextlib.suppress(OSError, ValueError):  # so the exit-time flush of stdout cannot fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), results.fileno())
            stats.status = "pipe_closed"  # a normal end for a pipeline: exit 141 (128 + SIGPIPE), no message
        except Exception as e:  # a bug: show where, but still exit with the documented fatal code
            traceback.print_exc()
            console.print(f"flashgen: error: unexpected {type(e).__name__}: {e}", markup=False)
            stats.status = "fatal"
        stats.exit_code = int(STATUS_CODES[stats.status])
        stats.finish()
        if stats.started and not job.get("quiet") and stats.status != "pipe_closed":
            console.print(stats.summary(), markup=False)
        # A scheduler reads the stats file even when the settings themselves were refused: take the flag then.
        stats_json = job.get("stats_json") if job else flags.get("job", {}).get("stats_json")
        if stats_json:
            try:
                stats.write_json(stats_json)
            except OSError as e:
                console.print(f"flashgen: error: cannot write --stats-json {stats_json}: {e}", markup=False)
                stats.exit_code = int(ExitCode.FATAL)
    return stats.exit_code


def _run(settings: Settings, input_path, output_path, overwrite, stats: JobStats, signals: SignalGuard,
         results, console: Console, shard: Shard | None = None) -> str:
    job = settings.job
    log = (lambda s: None) if job["quiet"] else (lambda s: console.print(s, markup=False))
    setup = prepare(settings)
    model, engine = setup.model, setup.engine
    if job["ray"]:  # before the output is locked: a job that cannot run on Ray costs a second
        from flashgen.ray import check_ray_job

        check_ray_job(settings, input_path)
    if job["stats_json"]:
        check_writable(job["stats_json"], "--stats-json")  # now, not after the whole job (the output: plan_output)
    in_stream, total = _open_input(input_path, shard, job["max_line_bytes"])
    # What changes a line's result besides the line itself: stored with each result, checked by --resume. Not the
    # shard: a line's result does not depend on which shard ran it, so merged shards equal one job's output and a
    # re-sharded job resumes from the same results.
    fingerprint = setup.fingerprint
    plan = plan_output(output_path, input_path, overwrite=overwrite, resume=job["resume"],
                       fingerprint=fingerprint, shard=shard)
    llm, frozen = None, 0
    try:  # the output file stays locked until the job ends, however it ends
        if plan.resume:
            log(f"flashgen: resuming {plan.name}: {plan.n_done:,} lines already done"
                + (f"; {plan.n_errors:,} error records dropped to run those lines again" if plan.n_errors else "")
                + ("; a torn last line dropped" if plan.torn else ""))
        for note in plan.notes:
            log(note)
        if shard is not None:
            log(f"flashgen: shard {shard.spec}: input lines {shard.k}, {shard.k + shard.n}, {shard.k + 2 * shard.n}, "
                "... (0-based, blank lines not counted)" + (f", {total:,} lines" if total is not None else ""))
        if job["ray"]:  # the actors read the input file themselves (flashgen.ray)
            in_stream.close()
            from flashgen.ray import run_on_ray

            stats.model = model or ""
            return run_on_ray(settings, setup, str(input_path), plan, results, stats, signals, console, log, total)
        llm = _load_model(model, engine, job["data_parallel"])
        frozen = freeze_startup_heap()  # the job's thread is not paused by the collector walking start-up's objects
        if hasattr(llm, "describe"):
            log(f"flashgen: {llm.describe()}")
        stats.model = getattr(llm, "model_name", model or "")
        parser = make_parser(llm, setup, job)
        writer = OrderedWriter(open_output(plan, results), job["order"], path=plan.path)
        show = job["progress"] == "on" or (job["progress"] == "auto" and sys.stderr.isatty())
        progress = JobProgress(show and not job["quiet"], total, console)
        runner = Runner(llm, parser, writer, stats,
                        max_in_flight=job["max_in_flight"] or 4 * engine["max_num_seqs"],
                        max_errors=job["max_errors"], return_token_ids=job["return_token_ids"], progress=progress,
                        signals=signals, drain=job["drain"], log=log, prepare_workers=setup.prepare_workers)
        stats.started = True
        lines = read_lines(in_stream, job["max_line_bytes"])
        if shard is not None:
            lines = shard.select(lines)
        try:
            return runner.run(plan.watch(lines, log), plan.done)
        finally:
            progress.stop()
            if plan.path is not None:
                writer.stream.close()
            if total is not None:  # a file; stdin is left alone, the reader thread may still be blocked on it
                in_stream.close()
    finally:
        try:  # the engine's worker processes (data or tensor parallel) end with the job, however it ends
            if llm is not None:
                llm.close()
        finally:
            if frozen:
                thaw_heap()
            plan.release()


@dataclass
class JobSetup:
    """What a job's settings resolve to before any model loads: shared by `flashgen generate` and the Ray actors
    (flashgen.ray), so both check the same things and parse lines the same way."""
    model: str | None         # None: the embedded default model
    engine: dict[str, Any]    # EngineConfig's keyword arguments, model left out
    defaults: dict[str, Any]  # SamplingParams keyword arguments: the sampling defaults every line starts from
    template: Any             # the compiled --template, or None
    fingerprint: str          # what changes a line's result besides the line (flashgen.jobs.fingerprint)
    prepare_workers: int = 0  # processes building lines for the preparation thread (auto resolved)


def prepare(settings: Settings) -> JobSetup:
    """Check the sampling defaults, engine options and template, and resolve them; FatalError naming the fix."""
    job, engine = settings.job, dict(settings.engine)
    where = settings.sources.get("job.prepare_workers", "settings")
    workers = prepare_workers(job["prepare_workers"], "command line" if where == "flag" else where)
    defaults = defaults_from_settings(settings.sampling, settings.sources)  # reads --json-schema / --grammar
    if defaults["seed"] is None:  # every line gets its own seed (see params.line_seed): none depends on batching
        defaults["seed"] = settings.engine["seed"]
    _check_sampling(defaults, settings)
    model = engine.pop("model") or None
    _check_engine(model, engine, settings)
    template = None
    if job["template"] and job["field"]:
        raise FatalError("--template and --field both say where the prompt comes from; use one")
    if job["template"]:
        from flashgen.jobs.templates import load_template

        template = load_template(job["template"])
    fingerprint = job_fingerprint(defaults, job["template"], job["field"], job["chat"], job["system"])
    return JobSetup(model, engine, defaults, template, fingerprint, auto_workers() if workers is None else workers)


MAX_PREPARE_WORKERS = 64


def prepare_workers(value: Any, where: str = "settings") -> int | None:
    """[job] prepare_workers as a count (None: auto); FatalError naming the option, value and fix."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_PREPARE_WORKERS:
        raise FatalError(f"{where}: job.prepare_workers = {value!r} is invalid; use auto, 0 (a thread of the job's "
                         f"process) or a number of processes up to {MAX_PREPARE_WORKERS}")
    return n


def make_parser(llm, setup: JobSetup, job: dict[str, Any]) -> LineParser:
    """The line parser of a job, over a loaded model's tokenizer."""
    return LineParser(llm.tokenizer, llm.max_model_len, setup.defaults, template=setup.template,
                      template_name=job["template"], field=job["field"], chat=job["chat"],
                      fingerprint=setup.fingerprint, system=job["system"])


def _check_sampling(defaults: dict, settings: Settings) -> None:
    from flashgen.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except ValueError as e:
        where = ", ".join(sorted({v for k, v in settings.sources.items() if k.startswith("sampling.")} - {"default"}))
        raise FatalError(f"{e} (sampling defaults set by {where or 'defaults'})") from None


def _check_engine(model: str | None, engine: dict, settings: Settings) -> None:
    from flashgen.config import EngineConfig

    try:
        EngineConfig(model=model or "default", **engine)
    except ValueError as e:
        key = next((k for k in engine if f" {k}=" in f" {e}".replace(":", " ")), None)
        where = settings.sources.get(f"engine.{key}", "") if key else ""
        raise FatalError(f"{e}" + (f" (set by {where})" if where else "")) from None


def _open_input(input_path: str | None, shard: Shard | None = None, max_line_bytes: int = 0):
    """The input stream and its line count (None for stdin: counting would mean reading it all first); with a
    shard, the count of the shard's lines."""
    if input_path in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise FatalError("no input: give a JSONL file, or pipe JSONL lines into stdin")
        try:  # a private handle: the reader thread may sit in a read of it at exit, holding only its own lock
            return os.fdopen(os.dup(sys.stdin.fileno()), "rb"), None
        except (AttributeError, OSError, ValueError):  # a stdin without a file descriptor (tests)
            return sys.stdin.buffer, None
    p = Path(input_path)
    if not p.is_file():
        raise FatalError(f"input file {input_path} does not exist" if not p.exists() else
                         f"input {input_path} is not a file; give a JSONL file or - for stdin")
    total = _count_lines(p) if p.stat().st_size else 0  # a compressed file that is not one fails here, at once
    try:
        f = open_read(p)
    except OSError as e:
        raise FatalError(f"cannot read input file {input_path}: {e.strerror}") from None
    if shard is not None and total:
        try:  # the lines the shard's index counts (blank lines are not lines), not newlines: one more pass
            with open_read(p) as g:
                total = count_lines(g, shard, max_line_bytes)
        except (OSError, EOFError, ValueError) as e:
            f.close()
            raise FatalError(f"cannot read input file {input_path}: {getattr(e, 'strerror', None) or e}") from None
    return f, total


def _count_lines(path: Path) -> int:
    """Lines in a regular file: cheap (one pass of counting newlines, ~1 s per GB), and it gives the bar a total.
    A compressed file (.gz, .bz2, .zst) is counted decompressed."""
    n, last = 0, b"\n"
    try:
        with open_read(path) as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, EOFError, ValueError) as e:
        kind = compression_of(path)
        what = f"a valid .{kind} file" if kind else "readable"
        raise FatalError(f"cannot read input file {path}: {getattr(e, 'strerror', None) or e}"
                         + (f" (it is named .{kind} but is not {what})" if kind else "")) from None
    return n + (last != b"\n")


def _load_model(model: str | None, engine: dict, data_parallel: str = "1"):
    try:
        from flashgen.llm import LLM
    except ImportError as e:
        raise FatalError(f"the engine cannot be imported ({e}); check the flashgen installation") from None
    try:
        from flashgen.config import EngineConfig
        from flashgen.engine.data_parallel import DataParallelLLM, resolve_data_parallel
        from flashgen.llm import resolve_model_name

        config = EngineConfig(model=resolve_model_name(model), **engine)
        try:
            n = resolve_data_parallel(data_parallel, config)
        except ValueError as e:
            raise FatalError(f"job.{e}") from None
        if n > 1:
            return DataParallelLLM(config, n)
        return LLM(config=config)
    except (Interrupted, FatalError):
        raise
    except Exception as e:
        from flashgen.models.errors import ModelLoadError

        # a ModelLoadError names the file, what is wrong and the fix already: its type name would add nothing
        why = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
        raise FatalError(f"cannot load model {model or '(embedded default)'}: {why}") from None
