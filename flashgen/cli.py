"""The `flashgen` command line. It maps options onto settings and calls flashgen.jobs; the logic lives there.

Every option defaults to None here, meaning "not given", so that precedence (flag > --config > ./flashgen.toml >
built-in default) is decided in one place: flashgen.jobs.settings.
"""
from __future__ import annotations

import logging
import sys

import typer
from typer.core import TyperCommand, TyperOption

from flashgen.log import log_to_stderr

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Offline batch generation for LLMs: JSONL prompts in, JSONL results out.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

ENGINE = "Engine"
SAMPLING = "Sampling defaults (a line's own fields override them)"
JOB = "Job"

EXIT_CODES = """Exit codes: 0 every line succeeded; 1 finished, but some lines got error records; 2 fatal error
(bad flags, config, model, input/output file, engine failure); 3 stopped by --max-errors; 130 interrupted
(SIGINT/SIGTERM/SIGHUP): run again with --resume; 141 the reader of stdout went away (| head)."""


def _print_version(value: bool) -> None:
    if value:
        from flashgen import __version__

        typer.echo(f"flashgen {__version__}")
        raise typer.Exit(0)


@app.callback()
def _logging(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the flashgen version and exit."),
) -> None:
    # (A comment: a docstring would replace the app's help.) Every command sends the library's log records, INFO
    # and up, to stderr; `generate --quiet` keeps warnings only.
    log_to_stderr(logging.INFO)


class _ShowDefaults(TyperCommand):
    """`generate --help` shows each option's built-in default. The options themselves default to None ("not
    given", see the module docstring), so the defaults are read from the settings schema, only when help is shown
    (the schema's imports would slow every start)."""

    def format_help(self, ctx, formatter) -> None:
        from flashgen.jobs.settings import SCHEMA

        for param in self.params:
            if not isinstance(param, TyperOption) or isinstance(param.show_default, str) or param.name is None:
                continue
            opt = next((SCHEMA[s][param.name] for s in ("sampling", "job", "engine") if param.name in SCHEMA[s]),
                       None)
            if opt is None or opt.default in ("", []):
                continue
            value = opt.default
            if isinstance(value, bool) and param.secondary_opts:  # --chat/--no-chat: the flag that is the default
                param.show_default = (param.opts if value else param.secondary_opts)[0].lstrip("-")
            elif not isinstance(value, bool):
                param.show_default = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        super().format_help(ctx, formatter)


@app.command(epilog=EXIT_CODES, cls=_ShowDefaults)
def generate(
    input: str | None = typer.Argument(None, metavar="INPUT", help="JSONL input file; - or nothing for stdin.",
                                        show_default=False),
    output: str | None = typer.Option(None, "--output", "-o", help="JSONL output file; - or nothing for stdout."),
    model: str | None = typer.Option(None, "--model", "-m", rich_help_panel=ENGINE,
                                     help="Model directory, .gguf file, known name or Hub id org/name[@revision]."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file (see flashgen.toml)."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the merged settings as TOML and exit."),
    # sampling defaults
    max_tokens: int | None = typer.Option(None, help="Most tokens generated per line.", rich_help_panel=SAMPLING),
    min_tokens: int | None = typer.Option(None, help="No EOS/stop before this many tokens.",
                                          rich_help_panel=SAMPLING),
    temperature: float | None = typer.Option(None, help="0 = greedy.", rich_help_panel=SAMPLING),
    top_p: float | None = typer.Option(None, help="Nucleus sampling threshold.", rich_help_panel=SAMPLING),
    top_k: int | None = typer.Option(None, help="-1 = all tokens.", rich_help_panel=SAMPLING),
    min_p: float | None = typer.Option(None, help="Drop tokens with p < min_p * p_max.", rich_help_panel=SAMPLING),
    seed: int | None = typer.Option(None, help="Base of per-line seeds (seed + line id): same text on resume.",
                                    rich_help_panel=SAMPLING),
    stop: list[str] | None = typer.Option(  # noqa: B008 - typer's declaration of the option, never mutated
        None, help="Stop string (repeatable).", rich_help_panel=SAMPLING),
    ignore_eos: bool | None = typer.Option(None, "--ignore-eos/--no-ignore-eos", help="Generate past EOS.",
                                           rich_help_panel=SAMPLING, show_default=False),
    repetition_penalty: float | None = typer.Option(None, help="> 1 discourages repeats.",
                                                    rich_help_panel=SAMPLING),
    presence_penalty: float | None = typer.Option(None, help="In [-2, 2].", rich_help_panel=SAMPLING),
    frequency_penalty: float | None = typer.Option(None, help="In [-2, 2].", rich_help_panel=SAMPLING),
    json_schema: str | None = typer.Option(None, rich_help_panel=SAMPLING,
                                           help="JSON schema file: every line's output is JSON matching it."),
    regex: str | None = typer.Option(None, rich_help_panel=SAMPLING,
                                     help="Every line's output matches this regular expression."),
    choice: list[str] | None = typer.Option(  # noqa: B008 - typer's declaration of the option, never mutated
        None, help="Every line's output is one of these strings (repeatable: one choice each).",
        rich_help_panel=SAMPLING),
    grammar: str | None = typer.Option(None, rich_help_panel=SAMPLING,
                                       help="Lark or GBNF grammar file every line's output follows. At most one of "
                                            "--json-schema, --regex, --choice, --grammar; a line's response_format / "
                                            "structured_outputs / guided_* fields override it."),
    # engine
    dtype: str | None = typer.Option(None, help="auto, bfloat16, float16 or float32.", rich_help_panel=ENGINE),
    device: str | None = typer.Option(None, help="cuda, cuda:N or cpu (default: cuda when available).",
                                      rich_help_panel=ENGINE),
    backend: str | None = typer.Option(None, help="Ops backend: auto, torch or cuda.", rich_help_panel=ENGINE),
    max_num_seqs: int | None = typer.Option(None, help="Sequences in one decode batch.", rich_help_panel=ENGINE),
    max_num_batched_tokens: int | None = typer.Option(None, help="Tokens in one prefill batch.",
                                                      rich_help_panel=ENGINE),
    block_size: int | None = typer.Option(None, help="Tokens per KV-cache page.", rich_help_panel=ENGINE),
    max_model_len: int | None = typer.Option(None, help="Context length (0 = the model's).",
                                             rich_help_panel=ENGINE),
    kv_cache_gb: float | None = typer.Option(None, help="KV cache size in GiB (0 = auto).", rich_help_panel=ENGINE),
    kv_cache_dtype: str | None = typer.Option(None, help="auto (the model's dtype); fp8 (e4m3, a scale per layer): "
                                              "twice the tokens fit; int8k (int8 K, e4m3 V, a scale per token): "
                                              "nearly twice, more accurate.",
                                              rich_help_panel=ENGINE),
    quantization: str | None = typer.Option(None, help="Weights: auto (as the checkpoint is; FP8 checkpoints run "
                                            "FP8) or fp8 (quantize the linear layers at load).",
                                            rich_help_panel=ENGINE),
    gpu_memory_utilization: float | None = typer.Option(None, help="Fraction of GPU memory to use.",
                                                        rich_help_panel=ENGINE),
    enable_prefix_caching: bool | None = typer.Option(None, "--enable-prefix-caching/--no-enable-prefix-caching",
                                                      help="Reuse shared prompt prefixes.", show_default=False,
                                                      rich_help_panel=ENGINE),
    enforce_eager: bool | None = typer.Option(None, "--enforce-eager/--no-enforce-eager", help="No CUDA graphs.",
                                              show_default=False, rich_help_panel=ENGINE),
    tensor_parallel_size: int | None = typer.Option(None, help="GPUs to split the model over.",
                                                    rich_help_panel=ENGINE),
    load_format: str | None = typer.Option(None, help="auto, or dummy: random weights (benchmarks).",
                                           rich_help_panel=ENGINE),
    # job
    resume: bool | None = typer.Option(None, "--resume/--no-resume", show_default=False, rich_help_panel=JOB,
                                       help="Skip ids already in the output file; append the rest."),
    shard: str | None = typer.Option(None, "--shard", metavar="K/N", rich_help_panel=JOB,
                                     help="Run shard K of N: the input lines whose 0-based index (blank lines not "
                                          "counted) % N == K; auto = from a Slurm job array. {shard} in -o becomes "
                                          "KK-of-NN; flashgen merge joins the outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file.", rich_help_panel=JOB),
    order: str | None = typer.Option(None, help="input (default) or completion.", rich_help_panel=JOB),
    template: str | None = typer.Option(None, help="Jinja file rendering each prompt from the line's fields.",
                                        rich_help_panel=JOB),
    field: str | None = typer.Option(None, help="Take the prompt text from this JSONL field.",
                                     rich_help_panel=JOB),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", show_default=False, rich_help_panel=JOB,
                                     help="Wrap text prompts in the model's chat template."),
    system: str | None = typer.Option(None, "--system", metavar="TEXT", rich_help_panel=JOB,
                                      help="System message for every chat prompt (messages lines, and text prompts "
                                           "with --chat); a line's own system message wins."),
    return_token_ids: bool | None = typer.Option(None, "--return-token-ids/--no-return-token-ids",
                                                 show_default=False, help="Add generated token ids to each line.",
                                                 rich_help_panel=JOB),
    max_errors: int | None = typer.Option(None, help="Stop after this many bad lines (0 = no limit).",
                                          rich_help_panel=JOB),
    max_in_flight: int | None = typer.Option(None, help="Lines read but not yet written (0 = 4 x max-num-seqs).",
                                             rich_help_panel=JOB),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", show_default=False,
                                         help="Progress bar on stderr (default: when it is a terminal).",
                                         rich_help_panel=JOB),
    stats_json: str | None = typer.Option(None, help="Write the final summary as JSON here.", rich_help_panel=JOB),
    quiet: bool | None = typer.Option(None, "--quiet/--no-quiet", "-q", show_default=False, rich_help_panel=JOB,
                                      help="No summary or notes on stderr (errors still)."),
    data_parallel: str | None = typer.Option(None, help="Engine processes, one per GPU; auto = one per GPU.",
                                             rich_help_panel=JOB),
    prepare_workers: str | None = typer.Option(None, metavar="N", rich_help_panel=JOB,
                                               help="Processes that check, template and tokenize lines ahead of the "
                                                    "engine (0 = a thread of this process; auto = 0 for now)."),
    ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", rich_help_panel=JOB,
                                   help="Run the job over a Ray cluster (pip install 'flashgen[ray]'): auto = the "
                                        "running cluster, local = start one here, or the cluster's address."),
    ray_actors: int | None = typer.Option(None, rich_help_panel=JOB,
                                          help="Engines (Ray actors) of a --ray job (0 = one per GPU of the cluster)."),
    max_line_bytes: int | None = typer.Option(None, help="Longer input lines get a line_too_long error record "
                                              "(default 64 MiB; 0 = no limit).", rich_help_panel=JOB),
    drain: bool | None = typer.Option(None, "--drain/--no-drain", show_default=False, rich_help_panel=JOB,
                                      help="On SIGINT/SIGTERM/SIGHUP finish the lines in flight before exiting "
                                           "(default: drop them; --resume reruns them)."),
) -> None:
    """Generate a completion for every JSONL line of INPUT."""
    from flashgen.jobs import run_generate

    flags = {
        "engine": dict(model=model, dtype=dtype, device=device, backend=backend, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                       max_model_len=max_model_len, kv_cache_gb=kv_cache_gb, kv_cache_dtype=kv_cache_dtype,
                       quantization=quantization,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                       enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                       load_format=load_format),
        "sampling": dict(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, min_p=min_p, seed=seed, stop=stop or None, ignore_eos=ignore_eos,
                         repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, json_schema=json_schema, regex=regex,
                         choice=choice or None, grammar=grammar),
        "job": dict(resume=resume, order=order, template=template, field=field, chat=chat, system=system,
                    return_token_ids=return_token_ids, max_errors=max_errors, max_in_flight=max_in_flight, shard=shard,
                    progress=None if progress is None else ("on" if progress else "off"), stats_json=stats_json,
                    quiet=quiet, data_parallel=data_parallel, prepare_workers=prepare_workers,
                    max_line_bytes=max_line_bytes, drain=drain,
                    ray=ray, ray_actors=ray_actors),
    }
    if _quiet(config, flags):
        log_to_stderr(logging.WARNING)
    code = run_generate(input, output, config, flags, overwrite=overwrite, show_config=show_config)
    raise typer.Exit(code)


MERGE_EXIT_CODES = """Exit codes: 0 every input line's record was written; 2 fatal error (bad arguments, unreadable
files, no --input); 4 incomplete: input lines without a record, ids with more records than input lines, or records
of no input line (nothing is written; with --allow-missing the lines that have a record are written, and missing
lines still exit 4)."""


@app.command(epilog=MERGE_EXIT_CODES)
def merge(
    shard_outputs: list[str] = typer.Argument(  # noqa: B008 - typer's declaration of the argument, never mutated
        ..., metavar="SHARD_OUTPUT", show_default=False,
        help="The shards' output files, globs (quote them: 'out.*-of-08.jsonl') or directories (their .jsonl files)."),
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="Merged JSONL file (.gz, .bz2, .zst: compressed); - or nothing for stdout."),
    input: str | None = typer.Option(None, "--input", "-i", metavar="FILE",
                                     help="The input file the shards read: it gives the order, and the lines every "
                                          "record is checked against (required)."),
    allow_missing: bool = typer.Option(False, "--allow-missing",
                                       help="Write the lines that have a record even if some have none (exit 4)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    max_line_bytes: int | None = typer.Option(None, help="The job's --max-line-bytes, if it set one (ids of overlong "
                                              "lines are found as the job found them)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr (problems still)."),
) -> None:
    """Join the outputs of `generate --shard K/N` into one output in input order, checking that every input line
    has exactly one record."""
    from flashgen.jobs.inputs import DEFAULT_MAX_LINE_BYTES
    from flashgen.jobs.merge import run_merge

    code = run_merge(shard_outputs, output, input, allow_missing=allow_missing, overwrite=overwrite,
                     max_line_bytes=DEFAULT_MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes,
                     quiet=quiet)
    raise typer.Exit(code)


@app.command()
def info(
    model: str = typer.Argument(..., help="Model directory, .gguf file, known name or Hub id org/name[@revision]."),
    memory_gb: float | None = typer.Option(None, help="Memory budget in GiB: how much KV cache fits."),
    dtype: str | None = typer.Option(None, help="Size weights and KV cache for this dtype."),
    quantization: str | None = typer.Option(None, help="fp8: size the weights as --quantization fp8 runs them."),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Describe a model: shape, parameters, memory for weights and KV cache."""
    import json

    from flashgen.info import describe_model, format_info
    from flashgen.models.default_model import resolve_model

    try:
        d = describe_model(resolve_model(model), dtype=dtype, memory_gb=memory_gb, quantization=quantization)
    except (OSError, ValueError) as e:
        _fail(f"cannot describe model {model}: {e}")
    typer.echo(json.dumps(d, indent=2) if json_out else format_info(d))


@app.command()
def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """What will run here: GPU, driver, CUDA, torch, CuPy, NVRTC, the backend auto picks, the kernel cache."""
    import json

    from flashgen.doctor import diagnose, format_doctor

    d = diagnose()
    typer.echo(json.dumps(d, indent=2) if json_out else format_doctor(d))


@app.command("convert-gguf")
def convert_gguf(
    gguf_file: str = typer.Argument(..., help="The .gguf file."),
    out_dir: str = typer.Argument(..., help="The HF checkpoint directory to create (must not exist or be empty)."),
    dtype: str = typer.Option("bfloat16", "--dtype",
                              help="dtype of the written weights: bfloat16, float16 or float32 (4x the size of a "
                                   "4-bit GGUF, 2x bfloat16)."),
) -> None:
    """Convert a GGUF file into a HuggingFace checkpoint directory flashgen can load."""
    from flashgen.gguf_convert import convert_gguf as convert

    try:
        path = convert(gguf_file, out_dir, dtype=dtype)
    except ImportError as e:
        _fail(f"converting GGUF needs the gguf package: pip install 'flashgen[gguf]' ({e})")
    except (OSError, ValueError) as e:
        _fail(f"cannot convert {gguf_file}: {e}")
    typer.echo(f"flashgen: wrote {path}", err=True)


@app.command()
def models(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the known model names and the models in the Hugging Face Hub cache (HF_HOME / HF_HUB_CACHE)."""
    import json

    from flashgen.models.default_model import DEFAULT_MODEL, KNOWN_MODELS
    from flashgen.models.hub import HubModelError, cached_models, hub_cache_dir

    try:
        cached, cache = cached_models(), hub_cache_dir()
    except HubModelError as e:
        _fail(str(e))
    except (OSError, ValueError) as e:  # an unreadable or corrupted cache
        _fail(f"cannot read the Hugging Face Hub cache: {e}")
    if json_out:
        typer.echo(json.dumps({
            "known": [{"name": n, "default": n == DEFAULT_MODEL, "package": k.requirement}
                      for n, k in sorted(KNOWN_MODELS.items())],
            "hub_cache": cache,
            "cached": [{"repo_id": m.repo_id, "revision": m.revision, "commit": m.commit, "size": m.size,
                        "path": m.path, "safetensors": m.has_safetensors, "tokenizer_json": m.has_tokenizer,
                        "loadable": m.loadable} for m in cached],
        }, indent=2))
        return
    typer.echo("Known names:")
    for name, known in sorted(KNOWN_MODELS.items()):
        typer.echo(f"  {name}{' (default)' if name == DEFAULT_MODEL else ''}  [package {known.requirement}]")
    typer.echo(f"Hugging Face Hub cache ({cache}):")
    if not cached:
        typer.echo("  (no models; --model org/name fetches one)")
    width = max((len(m.repo_id) for m in cached), default=0)
    for m in cached:
        missing = [f for f, ok in (("config.json", m.has_config), ("*.safetensors", m.has_safetensors),
                                   ("tokenizer.json", m.has_tokenizer)) if not ok]
        state = "ready" if not missing else "not loadable: no " + ", ".join(missing)
        typer.echo(f"  {m.repo_id:<{width}}  {m.revision:<12}  {m.size:>9}  {state}")


bench_app = typer.Typer(help="Benchmarks on a CUDA GPU: figures next to ceilings and peers measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("kernels")
def bench_kernels(out_dir: str | None = typer.Option(None, help="Write kernels.json here."),
                  only: str | None = typer.Option(None, help="Only these steps, comma-separated: decode, "
                                                  "decode_ragged, prefill, elementwise, linear_fp8, "
                                                  "moe_layer.")) -> None:
    """Each kernel next to torch SDPA (FLASH, CUDNN), cuBLASLt's FP8 GEMM and the copy-bandwidth ceiling."""
    from flashgen.bench.kernels import main as run

    raise typer.Exit(run(out_dir, only))


@bench_app.command("throughput")
def bench_throughput(
    workload: str = typer.Option("nanovllm",
                                 help="nanovllm, fixed512, sharedprefix, latency8b, longctx, trtllm128, trtllm1000, "
                                      "trtllm5000, moe30b, gemma4b, structured, logprobs, prompt_logprobs or "
                                      "samples."),
    compare: str | None = typer.Option(None, help="hf: also measure HF transformers generate in this run."),
    hf_max_tokens: int = typer.Option(512, help="New tokens per prompt for the HF peer."),
    out_dir: str | None = typer.Option(None, help="Write throughput_WORKLOAD.json here."),
    enforce_eager: bool = typer.Option(False, help="No CUDA graphs."),
    tokenizer: str | None = typer.Option(None, help="structured: a tokenizer directory (default: the embedded "
                                                    "model's)."),
) -> None:
    """Output tok/s of a standard workload next to its physical floor on this GPU."""
    from flashgen.bench.throughput import main as run

    run(workload, compare, hf_max_tokens, out_dir, tokenizer=tokenizer, enforce_eager=enforce_eager)


@bench_app.command("jobs")
def bench_jobs(
    workload: str = typer.Option("extract", help="extract, synth or summarize."),
    scale: float = typer.Option(1.0, help="Fraction of the workload's lines (e.g. 0.01 for a smoke run)."),
    tokenizer: str | None = typer.Option(None, help="A tokenizer directory (default: the embedded model's)."),
    shape: str = typer.Option("qwen3-0.6b", help="Model shape (random weights): qwen3-0.6b or llama-3.1-8b."),
    out_dir: str | None = typer.Option(None, help="Write jobs_WORKLOAD.json here."),
    enforce_eager: bool = typer.Option(False, help="No CUDA graphs."),
    lengths: str = typer.Option("fixed", help="fixed: every line generates the workload's max_tokens; spread: each "
                                "line its own, from an eighth of it to all of it (as EOS would end them)."),
    prepare_workers: str = typer.Option("auto", help="The job's --prepare-workers (0: a thread of its process)."),
) -> None:
    """A realistic JSONL job through `flashgen generate`'s path, start-up included, next to its floor on this GPU."""
    from flashgen.bench.jobs import main as run

    run(workload, scale, tokenizer, out_dir, shape, lengths, prepare_workers, enforce_eager=enforce_eager)


def _quiet(config: str | None, flags: dict) -> bool:
    """job.quiet as the job merges it (a flag, --config or ./flashgen.toml), so a quiet config hides INFO logs too.
    Settings the job will refuse: the flag alone (the job reports the error)."""
    from flashgen.jobs.errors import FatalError
    from flashgen.jobs.settings import load_settings

    try:
        return load_settings(config, flags).job["quiet"]
    except FatalError:
        return bool(flags["job"]["quiet"])


def _fail(message: str) -> None:
    typer.echo(f"flashgen: error: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    from flashgen.jobs.errors import ExitCode, Interrupted
    from flashgen.jobs.signals import install_startup_handlers

    install_startup_handlers()  # (again, for callers of this function): a SIGTERM while torch imports is 130
    try:
        if not sys.stderr.isatty():
            # Logs of cron and batch jobs: plain usage errors, not boxes drawn for a terminal.
            app.rich_markup_mode = None
        app(prog_name="flashgen")
    except Interrupted as e:
        sys.stderr.write(f"flashgen: {e}: stopped before the job started; nothing was written\n")
        sys.exit(int(ExitCode.INTERRUPTED))


if __name__ == "__main__":
    main()
