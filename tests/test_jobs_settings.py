"""Config: every option in flashgen.toml, precedence flag > --config > ./flashgen.toml > default, strict keys."""
from __future__ import annotations

import inspect

from flashgen.config import EngineConfig
from flashgen.jobs.errors import ExitCode
from flashgen.jobs.settings import SCHEMA, read_toml, render_toml
from test_cli_support import REPO, cli, gen, tiny_model


def test_repo_flashgen_toml_lists_every_option_with_its_default():
    text = (REPO / "flashgen.toml").read_text()
    assert text == render_toml(), "regenerate it: python -m flashgen.jobs.settings > flashgen.toml"
    parsed = read_toml(REPO / "flashgen.toml")
    for section, opts in SCHEMA.items():
        for key, opt in opts.items():
            assert parsed[section][key] == opt.default and opt.help, (section, key)
    assert set(SCHEMA["engine"]) == set(EngineConfig.field_names())


def test_every_option_and_flag_has_help_from_its_own_definition():
    import dataclasses

    import typer

    from flashgen.cli import app

    for f in dataclasses.fields(EngineConfig):  # [engine] help is the field's metadata, shown as is
        assert f.metadata.get("help") and SCHEMA["engine"][f.name].help == f.metadata["help"], f.name
    assert all(opt.help.strip() for opts in SCHEMA.values() for opt in opts.values())
    groups, seen = [typer.main.get_command(app)], set()
    while groups:
        for command in groups.pop().commands.values():
            if hasattr(command, "commands"):
                groups.append(command)
                continue
            assert command.help, command.name
            for param in command.params:
                assert param.help and param.help.strip(), (command.name, param.name)
                seen.add((command.name, param.name))
    assert {("generate", "input"), ("generate", "drain"), ("throughput", "workload")} <= seen  # bench's too


def test_every_option_has_a_flag_except_config_only_ones():
    from flashgen.cli import generate

    params = set(inspect.signature(generate).parameters)
    config_only = {"engine.seed", "sampling.stop_token_ids", "sampling.skip_special_tokens"}
    missing = {f"{s}.{k}" for s, opts in SCHEMA.items() for k in opts if k not in params} - config_only
    assert not missing


def show(tmp_path, *args):
    r = cli(["generate", "--show-config", *args], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    return r.stdout


def test_precedence_flag_over_config_over_local_over_default(tmp_path):
    assert "max_tokens = 256" in show(tmp_path) and "from default" in show(tmp_path)
    (tmp_path / "flashgen.toml").write_text("[sampling]\nmax_tokens = 5\ntop_k = 7\n[job]\norder = 'completion'\n")
    out = show(tmp_path)
    assert "max_tokens = 5" in out and "from ./flashgen.toml" in out
    (tmp_path / "job.toml").write_text("[sampling]\nmax_tokens = 3\n")
    out = show(tmp_path, "--config", "job.toml")
    assert "max_tokens = 3" in out and "top_k = 7" in out and 'order = "completion"' in out
    out = show(tmp_path, "--config", "job.toml", "--max-tokens", "2", "--order", "input")
    assert "max_tokens = 2" in out and 'order = "input"' in out and "top_k = 7" in out


def test_precedence_is_what_the_job_runs_with(tmp_path):
    (tmp_path / "flashgen.toml").write_text("[sampling]\nmax_tokens = 5\nignore_eos = true\n")
    (tmp_path / "job.toml").write_text("[sampling]\nmax_tokens = 3\n")
    line = [{"id": 1, "prompt": "hello"}]
    lengths = []
    for args in ([], ["--config", "job.toml"], ["--config", "job.toml", "--max-tokens", "2"]):
        src = tmp_path / "in.jsonl"
        src.write_text('{"id": 1, "prompt": "hello"}\n')
        r = cli(["generate", src, "--model", tiny_model(), "--device", "cpu", "--temperature", "0", *args],
                cwd=tmp_path)
        assert r.exit_code == 0, r.stderr
        lengths.append(eval_usage(r.stdout))
    assert lengths == [5, 3, 2] and line


def eval_usage(stdout: str) -> int:
    import json

    return json.loads(stdout.splitlines()[0])["usage"]["completion_tokens"]


def test_unknown_keys_and_bad_values_are_errors_naming_them(tmp_path):
    cases = [
        ("[sampling]\ntemprature = 0.5\n", ["temprature", "did you mean 'temperature'"]),
        ("[engines]\nmodel = 'x'\n", ["engines", "unknown section"]),
        ("max_tokens = 5\n", ["max_tokens"]),
        ("[sampling]\nmax_tokens = 'many'\n", ["sampling.max_tokens", "'many'", "an integer"]),
        ("[job]\norder = 'random'\n", ["job.order", "'input', 'completion'"]),
        ("[job\n", ["not valid TOML"]),
    ]
    for text, parts in cases:
        (tmp_path / "bad.toml").write_text(text)
        r = cli(["generate", "--show-config", "--config", "bad.toml"], cwd=tmp_path)
        assert r.exit_code == ExitCode.FATAL, text
        assert "bad.toml" in r.stderr, r.stderr
        for part in parts:
            assert part in r.stderr, (part, r.stderr)
    (tmp_path / "flashgen.toml").write_text("[job]\nbogus = 1\n")
    r = cli(["generate", "--show-config"], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "flashgen.toml" in r.stderr and "bogus" in r.stderr
    r = cli(["generate", "--show-config", "--config", "nope.toml"], cwd=tmp_path / "..")
    assert r.exit_code == ExitCode.FATAL and "nope.toml does not exist" in r.stderr


def test_bad_flags_model_and_files_are_fatal(tmp_path):
    ok = [{"id": 1, "prompt": "hi"}]
    for args, part in [
        (["--order", "sideways"], "job.order"),
        (["--block-size", "7"], "block_size"),
        (["--temperature", "-1"], "temperature"),
        (["--dtype", "float8"], "dtype"),
        (["--max-tokens", "many"], "Usage"),  # click's own usage error, same exit code
    ]:
        r, _ = gen(tmp_path, ok, *args)
        assert r.exit_code == ExitCode.FATAL, (args, r.stderr)
        assert part in r.stderr, (args, r.stderr)
    r, _ = gen(tmp_path, ok, model=str(tmp_path / "no-such-model"))
    assert r.exit_code == ExitCode.FATAL and "no-such-model" in r.stderr
    r = cli(["generate", tmp_path / "missing.jsonl", "--model", tiny_model()], cwd=tmp_path)
    assert r.exit_code == ExitCode.FATAL and "missing.jsonl does not exist" in r.stderr
