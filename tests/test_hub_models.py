"""`--model org/name[@revision]` through huggingface_hub, and `flashgen models`, with no network: each test writes a
Hub cache in huggingface_hub's layout (models--org--name/{refs,snapshots,blobs}) and runs with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashgen.jobs.errors import ExitCode
from test_cli_support import FAST, proc_env, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(root: Path, repo_id: str, checkpoint: str | Path, commit: str = COMMIT,
                   skip: tuple[str, ...] = ()) -> Path:
    """Put the files of `checkpoint` into `root` as huggingface_hub stores a downloaded snapshot: content-addressed
    blobs, a snapshot directory of symlinks to them, and refs/main naming the commit. Returns the snapshot dir."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(checkpoint).iterdir()):
        if not f.is_file() or f.name in skip:
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run(args: list, tmp: Path, hub: Path, input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m flashgen ARGS` in a process whose huggingface_hub sees only `hub`, offline."""
    env = proc_env()
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        env.pop(k, None)
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "flashgen", *map(str, args)], cwd=tmp, env=env,
                          capture_output=True, text=True, input=input, timeout=300)


LINES = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["The quick brown fox", "hello"]))


def _records(p: subprocess.CompletedProcess) -> list[dict]:
    assert p.returncode == ExitCode.OK, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]  # stdout: JSONL only, no progress or notes


def test_generate_by_hub_id_from_the_offline_cache(tmp_path):
    hub = tmp_path / "hub"
    make_hub_cache(hub, "tiny-org/tiny-llama", tiny_model())
    expected = _records(run(["generate", "-", "--model", tiny_model(), *FAST], tmp_path, hub, input=LINES))
    assert [r["id"] for r in expected] == [0, 1]
    for model in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@main", f"tiny-org/tiny-llama@{COMMIT}"):
        got = _records(run(["generate", "-", "--model", model, *FAST], tmp_path, hub, input=LINES))
        assert [(r["id"], r["text"]) for r in got] == [(r["id"], r["text"]) for r in expected], model


def test_offline_miss_is_one_clear_fatal_line(tmp_path):
    hub = tmp_path / "hub"
    make_hub_cache(hub, "tiny-org/tiny-llama", tiny_model())
    for model in ("Qwen/X", "tiny-org/tiny-llama@v9"):
        p = run(["generate", "-", "--model", model, *FAST], tmp_path, hub, input=LINES)
        assert p.returncode == ExitCode.FATAL == 2, p.stderr
        assert p.stdout == ""
        assert f"HF_HUB_OFFLINE is set and {model} is not in the cache at {hub.resolve()}; run once online or " \
               "unset it" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    p = run(["info", "Qwen/X"], tmp_path, hub)
    assert p.returncode == 2 and "HF_HUB_OFFLINE is set and Qwen/X is not in the cache" in p.stderr, p.stderr


def test_info_by_hub_id(tmp_path):
    hub = tmp_path / "hub"
    make_hub_cache(hub, "tiny-org/tiny-llama", tiny_model())
    p = run(["info", "tiny-org/tiny-llama", "--json"], tmp_path, hub)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["num_layers"] == 1


def test_cached_snapshot_without_weights_is_named(tmp_path):
    hub = tmp_path / "hub"
    make_hub_cache(hub, "tiny-org/no-weights", tiny_model(), skip=("model.safetensors",))
    p = run(["generate", "-", "--model", "tiny-org/no-weights", *FAST], tmp_path, hub, input=LINES)
    assert p.returncode == 2 and "tiny-org/no-weights has no .safetensors weights" in p.stderr, p.stderr


def test_models_lists_known_names_and_the_cache(tmp_path):
    hub = tmp_path / "hub"
    p = run(["models"], tmp_path, hub)  # no cache directory at all
    assert p.returncode == 0, p.stderr
    assert "smollm2-135m-instruct (default)" in p.stdout and "(no models" in p.stdout
    make_hub_cache(hub, "tiny-org/tiny-llama", tiny_model())
    make_hub_cache(hub, "tiny-org/no-tokenizer", tiny_model(), skip=("tokenizer.json",))
    p = run(["models"], tmp_path, hub)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.strip().startswith("tiny-org/")}
    assert set(rows) == {"tiny-org/tiny-llama", "tiny-org/no-tokenizer"}
    assert "main" in rows["tiny-org/tiny-llama"] and rows["tiny-org/tiny-llama"].endswith("ready")
    assert "not loadable: no tokenizer.json" in rows["tiny-org/no-tokenizer"]
    d = json.loads(run(["models", "--json"], tmp_path, hub).stdout)
    assert d["known"][0]["name"] == "smollm2-135m-instruct" and d["hub_cache"] == str(hub)
    [m] = [m for m in d["cached"] if m["repo_id"] == "tiny-org/tiny-llama"]
    assert m["commit"] == COMMIT and m["loadable"] and m["safetensors"] and m["tokenizer_json"]


@pytest.mark.parametrize("value, parsed", [
    ("Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B", None)),
    ("Qwen/Qwen3-0.6B@main", ("Qwen/Qwen3-0.6B", "main")),
    ("meta-llama/Llama-3.2-1B@refs/pr/1", ("meta-llama/Llama-3.2-1B", "refs/pr/1")),
    (f"a_b/c.d@{COMMIT}", ("a_b/c.d", COMMIT)),
    ("gpt2", None), ("a/b/c", None), ("./a/b", None), ("/abs/path", None), ("a--b/c", None), ("a/b..c", None),
    ("a/-b", None), ("a/b.git", None), ("a/b@", None), ("a/b@x y", None), ("a/b@c@d", None), ("a/b.gguf@x@", None),
    ("x" * 50 + "/" + "y" * 50, None),
])
def test_parse_hub_id(value, parsed):
    from flashgen.models.hub import parse_hub_id

    assert parse_hub_id(value) == parsed


def test_local_directory_wins_and_non_ids_keep_the_not_found_error(tmp_path, monkeypatch):
    from flashgen.models import hub
    from flashgen.models.default_model import resolve_model

    def no_download(*a, **k):
        raise AssertionError("must not reach the Hub")

    monkeypatch.setattr(hub, "download_hub_model", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == "org/name"
    with pytest.raises(ValueError, match=r"the directory does not exist, and not a known model name .* or Hugging "
                                         r"Face Hub id \(org/name\[@revision\]\)"):
        resolve_model("no-such-thing")
    (tmp_path / "org" / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a checkpoint directory"):
        resolve_model("org/file")


def test_hub_errors_become_one_line_messages(monkeypatch):
    """What the Hub answers, as flashgen says it: repository not found / gated mention HF_TOKEN; a bad revision
    is named."""
    from types import SimpleNamespace

    from huggingface_hub import errors

    from flashgen.models import hub

    def response(status: int):  # what the errors read of an HTTP response (their HTTP library varies by version)
        return SimpleNamespace(status_code=status, headers={}, request=None)

    cases = [
        (errors.GatedRepoError("gated", response=response(403)), "o/n@v2 is a gated repository.*HF_TOKEN"),
        (errors.RepositoryNotFoundError("404", response=response(404)), "no such repository.*HF_TOKEN"),
        (errors.RevisionNotFoundError("404", response=response(404)), "o/n has no revision 'v2'"),
        (errors.HfHubHTTPError("401 Unauthorized\nmore", response=response(401)), r"refused o/n@v2 .*check HF_TOKEN"),
    ]
    for exc, pattern in cases:
        def fail(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
        with pytest.raises(hub.HubModelError, match=pattern) as info:
            hub.download_hub_model("o/n", "v2")
        assert "\n" not in str(info.value)
