"""flashgen: offline batch generation for LLMs.

The public names load on first use (PEP 562), so `flashgen --help` and the CLI's signal handlers do not wait for
torch to import: a scheduler's SIGTERM during start-up is answered like any other (exit 130).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "EngineConfig"]
__version__ = "0.1.0"

_WHERE = {"LLM": "flashgen.llm", "SamplingParams": "flashgen.sampling_params", "RequestOutput": "flashgen.outputs",
          "EngineConfig": "flashgen.config", "StructuredOutputsParams": "flashgen.sampling_params"}

if TYPE_CHECKING:
    from flashgen.config import EngineConfig
    from flashgen.llm import LLM
    from flashgen.outputs import RequestOutput
    from flashgen.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashgen' has no attribute {name!r}")
