"""Engine configuration: one frozen dataclass, validated where it is built.

The CLI and the TOML loader (``flashgen.jobs.settings``) fill it; the engine only reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the dtypes flashgen runs in; models.spec.DTYPES maps them
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # EngineConfig.dtype's choices: auto picks one of DTYPE_NAMES
DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "torch", "cuda")
KV_CACHE_DTYPES = ("auto", "fp8", "int8k")  # auto = the model's dtype; fp8 = float8 e4m3 with per-layer scales;
# int8k = int8 K and e4m3 V with a scale per token and kv head (models.spec.kv_dtype_of maps them)
QUANTIZATIONS = ("auto", "fp8")  # auto = as the checkpoint is (FP8 or not); fp8 = quantize the weights at load


def _opt(default: Any, help: str) -> Any:
    """A field with its help as metadata: flashgen.jobs.settings shows it in flashgen.toml (no second copy)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: str = dataclasses.field(
        metadata={"help": 'model directory or known model name; "" = the embedded default model'})
    dtype: str = _opt("auto", "auto = the checkpoint's dtype (float32 on CPU for fp16 checkpoints)")
    device: str = _opt("auto", "auto = cuda when available, else cpu; or cuda, cuda:N, cpu")
    backend: str = _opt("auto", "ops backend: auto = CUDA kernels on a GPU, torch reference elsewhere")
    # 64: +2.5% nanovllm over 16 (BENCHMARKS.md)
    block_size: int = _opt(64, "tokens per KV-cache page (power of two, 16..256)")
    max_num_seqs: int = _opt(512, "sequences in one decode batch")
    max_num_batched_tokens: int = _opt(16384, "tokens in one prefill batch (longer prompts are chunked)")
    max_model_len: int = _opt(0, "0 = the model's max_position_embeddings, capped by the KV cache")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory for weights + activations + KV cache")
    kv_cache_gb: float = _opt(0.0, "0 = auto (GPU: free memory; CPU: 2 GiB, at most what max_num_seqs need)")
    kv_cache_dtype: str = _opt("auto", "auto = the model's dtype; fp8 = float8 e4m3 with a scale per layer for K "
                               "and for V (from the checkpoint, else measured at start-up): twice the tokens fit; "
                               "int8k = K in int8 and V in e4m3, each with a scale per token and kv head: nearly "
                               "twice the tokens, closer to the model's own accuracy than fp8 (needs FP8: compute "
                               "capability 8.9+)")
    quantization: str = _opt("auto", "weights: auto = as the checkpoint is (an FP8 checkpoint runs FP8); fp8 = "
                             "quantize a bf16/fp16/fp32 checkpoint's linear layers to float8 e4m3 at load, a scale "
                             "per output channel: half the weight memory of bf16 (needs FP8: compute capability 8.9+)")
    enable_prefix_caching: bool = _opt(True, "reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool = _opt(False, "true = no CUDA graphs")
    # in the Python API: seeds the requests that carry no seed of their own
    seed: int = _opt(0, "base of the per-line seeds when [sampling] seed is -1")
    tensor_parallel_size: int = _opt(1, "GPUs to split the model over")
    load_format: str = _opt("auto", "auto = the checkpoint's safetensors; dummy = random weights (benchmarks)")

    def __post_init__(self) -> None:
        def bad(field: str, value, fix: str) -> ValueError:
            return ValueError(f"engine config: {field}={value!r} is invalid; {fix}")

        if not self.model:
            raise bad("model", self.model, "give a model directory or a known model name")
        if self.dtype not in DTYPE_CHOICES:
            raise bad("dtype", self.dtype, f"use one of {', '.join(DTYPE_CHOICES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise bad("device", self.device, "use auto, cuda, cuda:N or cpu")
        if self.backend not in BACKENDS:
            raise bad("backend", self.backend, f"use one of {', '.join(BACKENDS)}")
        bs = self.block_size
        if not (16 <= bs <= 256 and bs & (bs - 1) == 0):
            raise bad("block_size", bs, "use a power of two from 16 to 256")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", self.max_num_seqs, "use a positive integer")
        if self.max_num_batched_tokens < self.block_size:
            raise bad("max_num_batched_tokens", self.max_num_batched_tokens, f"use at least block_size={bs}")
        if self.max_model_len < 0:
            raise bad("max_model_len", self.max_model_len, "use 0 (auto) or a positive length")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", self.gpu_memory_utilization, "use a fraction in [0.05, 1]")
        if self.kv_cache_gb < 0:
            raise bad("kv_cache_gb", self.kv_cache_gb, "use 0 (auto) or a positive size in GiB")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", self.kv_cache_dtype, "use auto (the model's dtype), fp8 or int8k")
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", self.quantization, "use auto (as the checkpoint is) or fp8 (FP8 weights)")
        if self.load_format not in ("auto", "dummy"):
            raise bad("load_format", self.load_format, "use auto (read the weights) or dummy (random weights)")
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, "use a positive integer")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
