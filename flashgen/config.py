"""Engine configuration: one frozen dataclass, validated where it is built.

The CLI and the TOML loader (``flashgen.jobs.settings``) fill it; the engine only reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "torch", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"                    # auto: the checkpoint's torch_dtype (float32 on CPU for fp16 checkpoints)
    device: str = "auto"                   # auto: cuda when available, else cpu
    backend: str = "auto"                  # ops backend; auto: cuda kernels on a GPU, torch reference elsewhere
    block_size: int = 64                   # tokens per KV-cache page (64: +2.5% nanovllm over 16, BENCHMARKS.md)
    max_num_seqs: int = 256                # sequences in one decode batch
    max_num_batched_tokens: int = 16384    # tokens in one prefill batch (long prompts are chunked)
    max_model_len: int = 0                 # 0: the model's max_position_embeddings, capped by the KV cache
    gpu_memory_utilization: float = 0.9    # fraction of GPU memory for weights + activations + KV cache
    kv_cache_gb: float = 0.0               # 0: auto (GPU: free memory; CPU: 2 GiB, at most what max_num_seqs need)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False            # True: no CUDA graphs
    seed: int = 0                          # seeds requests that carry no seed of their own
    tensor_parallel_size: int = 1
    load_format: str = "auto"              # auto: the checkpoint's safetensors; dummy: random weights (benchmarks)

    def __post_init__(self) -> None:
        def bad(field: str, value, fix: str) -> ValueError:
            return ValueError(f"engine config: {field}={value!r} is invalid; {fix}")

        if not self.model:
            raise bad("model", self.model, "give a model directory or a known model name")
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
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
        if self.load_format not in ("auto", "dummy"):
            raise bad("load_format", self.load_format, "use auto (read the weights) or dummy (random weights)")
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, "use a positive integer")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
