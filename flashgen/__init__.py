"""flashgen: offline batch generation for LLMs."""
from flashgen.config import EngineConfig
from flashgen.llm import LLM
from flashgen.outputs import RequestOutput
from flashgen.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig"]
__version__ = "0.1.0"
