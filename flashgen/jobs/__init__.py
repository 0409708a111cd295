"""Batch jobs: JSONL in, JSONL out, driven through the engine's incremental API (`flashgen generate`)."""
from flashgen.jobs.errors import ExitCode, FatalError

__all__ = ["ExitCode", "FatalError", "run_generate"]


def run_generate(*args, **kwargs) -> int:
    # Imported on call so `import flashgen.jobs` stays light for the CLI's --help.
    from flashgen.jobs.generate import run_generate as run

    return run(*args, **kwargs)
