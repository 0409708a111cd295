"""Models by Hugging Face Hub id: `--model org/name[@revision]` becomes a snapshot directory in the Hub cache.

huggingface_hub does the work, so its environment applies: HF_HOME / HF_HUB_CACHE (where the cache is),
HF_TOKEN (private and gated repositories), HF_HUB_OFFLINE (cache only, no network). Only the files flashgen
reads are fetched; huggingface_hub's progress bars go to stderr, so stdout stays free for JSONL.

    parse_hub_id("Qwen/Qwen3-0.6B")        -> ("Qwen/Qwen3-0.6B", None)
    parse_hub_id("Qwen/Qwen3-0.6B@v1.0")   -> ("Qwen/Qwen3-0.6B", "v1.0")
    parse_hub_id("./some/dir")             -> None (not a Hub id)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["ALLOW_PATTERNS", "CachedModel", "HubModelError", "cached_models", "download_hub_model", "hub_cache_dir",
           "parse_hub_id"]

ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]

# The Hub's own rule (huggingface_hub.utils.validate_repo_id) for each half of `org/name`: letters, digits, '-',
# '_' and '.', not starting or ending with '-' or '.'; the whole id at most 96 characters, no '--' or '..', no
# '.git' ending.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?")


class HubModelError(ModelLoadError):
    """A Hub model that cannot be had; the message is one line that says what to do."""


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `value` reads as `org/name[@revision]`, else None."""
    m = _HUB_ID.fullmatch(value)
    if m is None:
        return None
    repo = m["repo"]
    if len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    return repo, m["revision"]


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps its cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubModelError(f"models by Hub id need the huggingface_hub package ({e}); pip install huggingface_hub") \
            from None
    return huggingface_hub


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def download_hub_model(repo_id: str, revision: str | None = None) -> str:
    """The snapshot directory of `repo_id` at `revision` (default: main), fetched into the Hub cache unless it is
    there already. Raises HubModelError with a one-line reason and fix."""
    hub = _import_hub()
    from huggingface_hub import constants, errors

    what = repo_id + (f"@{revision}" if revision else "")
    cache = hub_cache_dir()
    # (an older huggingface_hub has no IncompleteSnapshotError: `except ()` matches nothing)
    incomplete = getattr(errors, "IncompleteSnapshotError", ())
    try:
        path = hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except incomplete:
        raise HubModelError(f"the cached snapshot of {what} in {cache} is incomplete; run once online (without "
                            "HF_HUB_OFFLINE) to complete it") from None
    except errors.LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubModelError(f"HF_HUB_OFFLINE is set and {what} is not in the cache at {cache}; run once online "
                                "or unset it") from None
        raise HubModelError(f"cannot reach the Hub for {what} and it is not in the cache at {cache} "
                            f"({_first_line(e.__cause__ or e)}); check the network connection") from None
    except errors.GatedRepoError:
        raise HubModelError(f"{what} is a gated repository: accept its terms on https://huggingface.co/{repo_id} and "
                            "set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise HubModelError(f"{repo_id}: not a local directory, and no such repository on the Hub (or it is private: "
                            "set HF_TOKEN to a token that can read it)") from None
    except errors.RevisionNotFoundError:
        raise HubModelError(f"{repo_id} has no revision {revision or 'main'!r}; give a branch, tag or commit hash "
                            "that exists") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "check HF_TOKEN" if status in (401, 403) else "try again later"
        raise HubModelError(f"the Hub refused {what} ({_first_line(e)}); {hint}") from None
    except (OSError, ValueError) as e:  # disk full, unwritable cache, invalid id the Hub rejects
        raise HubModelError(f"cannot fetch {what} into {cache}: {_first_line(e)}") from None
    snapshot = Path(str(path))
    if not (snapshot / "config.json").is_file():
        raise HubModelError(f"{what} has no config.json (snapshot {snapshot}); flashgen loads HuggingFace "
                            "transformers checkpoints")
    if not any(snapshot.glob("*.safetensors")):
        raise HubModelError(f"{what} has no .safetensors weights (snapshot {snapshot}); flashgen loads safetensors "
                            "only: pick a repository that has them, or a revision that does")
    return str(snapshot)


@dataclass
class CachedModel:
    """One revision of a model repository in the Hub cache."""

    repo_id: str
    revision: str  # its refs (e.g. "main"), else the commit hash
    commit: str
    size: str
    path: str
    has_safetensors: bool
    has_tokenizer: bool
    has_config: bool

    @property
    def loadable(self) -> bool:
        return self.has_safetensors and self.has_tokenizer and self.has_config


def cached_models() -> list[CachedModel]:
    """Every model revision in the Hub cache (none when there is no cache), by repo id then revision."""
    hub = _import_hub()
    from huggingface_hub.utils import CacheNotFound

    try:
        info = hub.scan_cache_dir()
    except CacheNotFound:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name for f in rev.files}
            out.append(CachedModel(
                repo_id=repo.repo_id, revision=",".join(sorted(rev.refs)) or rev.commit_hash,
                commit=rev.commit_hash, size=rev.size_on_disk_str, path=str(rev.snapshot_path),
                has_safetensors=any(n.endswith(".safetensors") for n in names),
                has_tokenizer="tokenizer.json" in names, has_config="config.json" in names,
            ))
    return sorted(out, key=lambda m: (m.repo_id.lower(), m.revision))
