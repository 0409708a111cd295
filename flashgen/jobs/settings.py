"""Job settings: the schema of every option, TOML loading, and precedence.

Precedence, highest first: command-line flag > ``--config FILE`` > ``./flashgen.toml`` > built-in default.
The schema below is the single source of truth ([engine] is EngineConfig's fields, each carrying its default and
help): the repo's ``flashgen.toml`` is generated from it (``python -m flashgen.jobs.settings > flashgen.toml``) and
a test keeps the two equal.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashgen.config import BACKENDS, DTYPE_CHOICES, KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig
from flashgen.jobs.errors import FatalError
from flashgen.jobs.inputs import DEFAULT_MAX_LINE_BYTES
from flashgen.jobs.params import FIELDS, Field, FieldError, check_field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - py3.10 falls back to the tomli backport
    import tomli as tomllib


@dataclass(frozen=True)
class Option:
    default: Any
    help: str                       # the option's comment in flashgen.toml
    kind: str = ""                  # int | float | str | bool | list[str] | list[int]; "" derives it from default
    choices: tuple[str, ...] = ()
    range: Field | None = None      # allowed values of a number (floats must be finite in any case)

    @property
    def type(self) -> str:
        if self.kind:
            return self.kind
        return {bool: "bool", int: "int", float: "float", str: "str"}[type(self.default)]


ENGINE_CHOICES = {"dtype": DTYPE_CHOICES, "backend": BACKENDS, "kv_cache_dtype": KV_CACHE_DTYPES,
                  "quantization": QUANTIZATIONS}


def _engine_options() -> dict[str, Option]:
    """EngineConfig's fields as options: the default and the help come from each field itself, so neither drifts."""
    return {f.name: Option("" if f.name == "model" else f.default, f.metadata["help"],
                           choices=ENGINE_CHOICES.get(f.name, ())) for f in dataclasses.fields(EngineConfig)}


SAMPLING = {
    "max_tokens": Option(256, "most tokens generated per line"),
    "min_tokens": Option(0, "EOS and stop tokens are ignored until this many tokens exist"),
    "temperature": Option(1.0, "0 = greedy"),
    "top_p": Option(1.0, "nucleus sampling: smallest set of tokens whose probability reaches top_p"),
    "top_k": Option(-1, "-1 = all tokens"),
    "min_p": Option(0.0, "drop tokens with p < min_p * p_max"),
    "seed": Option(-1, "-1 = [engine] seed; a line's seed is made from this and its id: same text on resume"),
    "stop": Option([], "stop strings (left out of the text)", kind="list[str]"),
    "stop_token_ids": Option([], "token ids that end a line, besides EOS", kind="list[int]"),
    "ignore_eos": Option(False, "keep generating after EOS, up to max_tokens"),
    "repetition_penalty": Option(1.0, "> 1 discourages tokens already in the prompt or output"),
    "presence_penalty": Option(0.0, "subtracted once from tokens already in the output, in [-2, 2]"),
    "frequency_penalty": Option(0.0, "subtracted per occurrence in the output, in [-2, 2]"),
    "skip_special_tokens": Option(True, "leave special tokens out of the text"),
    # structured outputs: at most one of the four; a line's response_format / structured_outputs / guided_* wins
    "json_schema": Option("", "JSON schema file: every line's output is JSON matching it (a line's "
                          "response_format overrides); \"\" = none"),
    "regex": Option("", "every line's output matches this regular expression; \"\" = none"),
    "choice": Option([], "every line's output is exactly one of these strings", kind="list[str]"),
    "grammar": Option("", "Lark or GBNF grammar file every line's output follows; \"\" = none. At most one of "
                      "json_schema, regex, choice, grammar"),
}

JOB = {
    "order": Option("input", "input = output lines in input order; completion = as they finish",
                    choices=("input", "completion")),
    "max_errors": Option(0, "stop after this many bad lines (exit code 3); 0 = no limit", range=Field("int", 0)),
    "max_in_flight": Option(0, "most lines read but not yet written; 0 = 4 x max_num_seqs", range=Field("int", 0)),
    "max_line_bytes": Option(DEFAULT_MAX_LINE_BYTES, "a longer input line gets a line_too_long error record, unread; "
                             "0 = no limit", range=Field("int", 0)),
    "return_token_ids": Option(False, "add the generated token ids to each output line"),
    "template": Option("", "Jinja template file that renders each line's prompt from its fields"),
    "field": Option("", "take the prompt text from this JSONL field instead of \"prompt\""),
    "chat": Option(False, "wrap text prompts as one user message in the model's chat template"),
    "system": Option("", "system message put first in every chat prompt (messages lines; text prompts with chat); "
                     "a line whose messages start with a system message keeps its own; \"\" = none"),
    "resume": Option(False, "skip ids already in the output file and append the rest"),
    "shard": Option("", "K/N = run only the input lines whose 0-based index (blank lines not counted) % N == K; "
                    "auto = from a Slurm job array's SLURM_ARRAY_TASK_* variables; \"\" = every line"),
    "progress": Option("auto", "auto = progress bar when stderr is a terminal; on; off", choices=("auto", "on", "off")),
    "stats_json": Option("", "write the final summary as JSON to this file"),
    "quiet": Option(False, "no summary or notes on stderr (errors still go there)"),
    "drain": Option(False, "on SIGINT/SIGTERM/SIGHUP finish the lines in flight first; false = drop them at "
                    "once (--resume reruns them)"),
    "data_parallel": Option("1", "engine processes fed by this job, one per GPU (auto = one per visible GPU)"),
    "prepare_workers": Option("auto", "processes that check, template and tokenize lines ahead of the engine; 0 = a "
                              "thread of the job's process; auto = 0 for now (measured: BENCHMARKS.md)"),
    "ray": Option("", "run the job over a Ray cluster with Ray Data: auto = the running cluster, local = start one "
                  "here, or the cluster's address; \"\" = no Ray (needs flashgen[ray])"),
    "ray_actors": Option(0, "engines (Ray actors) of a --ray job; 0 = one per GPU of the cluster (tensor_parallel_size "
                         "GPUs each), or on a cluster without GPUs one per 4 CPUs", range=Field("int", 0)),
}

SCHEMA: dict[str, dict[str, Option]] = {"engine": _engine_options(), "sampling": SAMPLING, "job": JOB}
# overwrite is deliberately a flag only (--overwrite): a config file must never make a job clobber results.
CONFIG_NAME = "flashgen.toml"


@dataclass
class Settings:
    engine: dict[str, Any]
    sampling: dict[str, Any]
    job: dict[str, Any]
    sources: dict[str, str]      # "section.key" -> where its value came from, for messages and --show-config

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name)


def check_value(section: str, key: str, value: Any, where: str) -> Any:
    """Return `value` coerced to the option's type, or raise FatalError naming the option, value and source."""
    opt = SCHEMA[section][key]
    t = opt.type

    def bad(expected: str) -> FatalError:
        return FatalError(f"{where}: {section}.{key} = {value!r} is invalid; use {expected}")

    def check(spec: Field, v: Any) -> Any:
        try:
            return check_field(key, v, spec)
        except FieldError as e:
            raise bad(e.fix[4:] + e.detail) from None

    if t == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif t == "str":
        if not isinstance(value, str):
            raise bad("a string")
        if opt.choices and value not in opt.choices:
            raise bad("one of " + ", ".join(map(repr, opt.choices)))
    elif t.startswith("list["):
        elem = str if t == "list[str]" else int
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, elem) for v in value):
            raise bad(f"a list of {'strings' if elem is str else 'integers'}")
        value = list(value)
    if section == "sampling" and key in FIELDS:  # the same table and checks as a line's fields (TOML: -1 / [])
        spec = FIELDS[key]
        if key == "seed" and value == -1:
            return value
        if t == "int" and spec.kind == "int|null":
            spec = dataclasses.replace(spec, kind="int", note="")
        value = check(spec, value)
    elif opt.range is not None:
        value = check(opt.range, value)
    elif t == "float":
        value = check(Field("number"), value)
    return value


def _unknown(kind: str, name: str, known, where: str) -> FatalError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return FatalError(f"{where}: unknown {kind} {name!r}; {hint}known: {', '.join(known)}")


def read_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate one config file; every problem names the file and the key."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FatalError(f"config file {path} does not exist; check the --config path") from None
    except OSError as e:
        raise FatalError(f"cannot read config file {path}: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (some editors add one): not part of the TOML
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FatalError(f"config file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                         "save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FatalError(f"config file {path} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in SCHEMA:
            raise _unknown("section", section, list(SCHEMA), str(path))
        if not isinstance(table, dict):
            raise FatalError(f"{path}: {section} must be a [{section}] table of options")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise _unknown(f"key in [{section}]", key, SCHEMA[section], str(path))
            out.setdefault(section, {})[key] = check_value(section, key, value, str(path))
    return out


def load_settings(
    config_file: str | Path | None, flags: dict[str, dict[str, Any]], cwd: str | Path | None = None
) -> Settings:
    """Merge built-in defaults < ./flashgen.toml < --config FILE < flags (only flags that were given)."""
    values = {s: {k: _copy(o.default) for k, o in opts.items()} for s, opts in SCHEMA.items()}
    sources = {f"{s}.{k}": "default" for s, opts in SCHEMA.items() for k in opts}
    layers: list[tuple[str, dict]] = []
    local = Path(cwd or ".") / CONFIG_NAME
    explicit = Path(config_file) if config_file else None
    if local.is_file() and not (explicit and explicit.resolve() == local.resolve()):
        layers.append((f"./{CONFIG_NAME}", read_toml(local)))
    if explicit:
        layers.append((str(explicit), read_toml(explicit)))
    given = {}
    for section, table in flags.items():
        given[section] = {k: check_value(section, k, v, "command line") for k, v in table.items() if v is not None}
    layers.append(("flag", given))
    for where, layer in layers:
        for section, table in layer.items():
            for key, value in table.items():
                values[section][key] = value
                sources[f"{section}.{key}"] = where
    return Settings(values["engine"], values["sampling"], values["job"], sources)


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v, ensure_ascii=False)  # strings, ints and lists of them are valid TOML in JSON syntax


def render_toml(settings: Settings | None = None) -> str:
    """The config file text: every option with its value and a one-line comment (the value's source with
    `settings`, so `--show-config` explains where each value came from)."""
    lines = [
        "# flashgen configuration: every option with its built-in default.",
        "# Precedence: command-line flag > --config FILE > ./flashgen.toml > built-in default.",
        "# Unknown keys are an error. `overwrite` is a flag only (--overwrite), so no config file can clobber results.",
    ]
    for section, opts in SCHEMA.items():
        lines += ["", f"[{section}]"]
        rows = []
        for key, opt in opts.items():
            value = settings.section(section)[key] if settings else opt.default
            comment = f"from {settings.sources[f'{section}.{key}']}" if settings else opt.help
            rows.append((f"{key} = {_toml_value(value)}", comment))
        width = max(len(r[0]) for r in rows) + 2
        lines += [f"{left:<{width}}# {comment}" for left, comment in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # regenerate the repo's flashgen.toml
    print(render_toml(), end="")
