"""The public Python API, after vLLM: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import cast

import torch

from flashgen.config import EngineConfig
from flashgen.engine.engine import Engine, EngineStats
from flashgen.outputs import RequestOutput
from flashgen.sampling_params import SamplingParams
from flashgen.tokenizer import Tokenizer


def resolve_model_name(model: str | None) -> str:
    """A model directory for `model`: a directory as is, a known name or .gguf file converted once, a Hugging Face
    Hub id `org/name[@revision]` fetched once into the Hub cache."""
    try:
        from flashgen.models.default_model import resolve_model
    except ImportError:  # the default-model module is optional for plain directories
        if model is None:
            raise ValueError("no model given; pass model=DIR (a HuggingFace model directory)") from None
        return model
    return resolve_model(model)


def generate_all(front, prompts, sampling_params) -> list[RequestOutput]:
    """`generate` over any front with the incremental API (LLM, DataParallelLLM): queue every prompt, step
    until all finish, return the outputs in input order with request ids "0", "1", ..."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params or SamplingParams()] * len(prompts)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts; give one or one each")
    if front.has_unfinished_requests():
        raise RuntimeError("generate() needs an idle engine; finish the requests added with add_request first")
    keys = [f"_gen{i}" for i in range(len(prompts))]
    added = []
    try:
        for k, p, sp in zip(keys, prompts, sampling_params, strict=True):
            front.add_request(k, p, sp)
            added.append(k)
    except BaseException:  # one bad request: none runs, and the engine is left idle as it was found
        for k in added:
            front.abort_request(k)
        raise
    results: dict[str, RequestOutput] = {}
    while front.has_unfinished_requests():
        for out in front.step():
            results[out.request_id] = out
    outs = [results[k] for k in keys]
    for i, o in enumerate(outs):
        o.request_id = str(i)
    return outs


class LLM:
    """An offline generator over one model.

    >>> llm = LLM(model="path/to/hf-model", dtype="bfloat16")
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    >>> outs[0].text
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **engine_kwargs):
        if config is None:
            config = EngineConfig(model=resolve_model_name(model), **engine_kwargs)
        self.config = config
        self.engine = Engine(config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.config.model

    def describe(self) -> str:
        """One line for the start-up log: what runs where, and how many tokens the KV cache holds."""
        r, spec = self.engine.runner, self.engine.spec
        return (f"{spec.architecture} {str(r.dtype).replace('torch.', '')}{self._weights_note()} on {r.device} "
                f"({r.backend} kernels"
                f"{', CUDA graphs' if r.graphs is not None else ''}); KV cache {r.num_blocks * r.block_size:,} "
                f"tokens in {r.num_blocks:,} blocks of {r.block_size}{self._kv_note()}; max_model_len "
                f"{self.max_model_len:,}")

    def _weights_note(self) -> str:
        how = self.engine.runner.model.weights_fp8
        if not how:
            return ""
        spec = self.engine.spec
        source = f"the checkpoint's, {spec.quant.method}" if how == "checkpoint" and spec.quant else "quantized at load"
        return f" with FP8 weights (e4m3, a scale per output channel; {source})"

    def _kv_note(self) -> str:
        r = self.engine.runner
        if r.kv_dtype == r.dtype:
            return ""
        name = str(r.dtype).replace("torch.", "")
        spec = self.engine.spec
        ratio = spec.kv_bytes_per_token(r.dtype) / spec.kv_bytes_per_token(r.kv_dtype)
        what = "int8 K and fp8 e4m3 V" if r.kv_dtype == torch.int8 else "fp8 e4m3"
        return f" ({what}, {r.model.kv_scales_from} scales: {ratio:.2f}x the tokens of a {name} cache)"

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    # -- incremental API (the CLI's) ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError (saying what to fix) for an empty or too long prompt."""
        self.engine.add_request(str(request_id), prompt, params or SamplingParams())

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished in it."""
        return self.engine.step()

    def abort_request(self, request_id: str) -> None:
        """Drop a queued or running request; it gives no output."""
        self.engine.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return self.engine.num_unfinished()

    # -- batch API ---------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in input order."""
        return generate_all(self, prompts, sampling_params)

    def chat(
        self,
        messages: Seq[dict] | Seq[Seq[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate a reply to one conversation (a list of {"role", "content"} messages) or to each of a list of
        them, through the model's chat template; `prompt` in each output is the rendered template."""
        one = bool(messages) and isinstance(messages[0], dict)
        convs = cast("list[list[dict]]", [list(messages)] if one else [list(c) for c in messages])
        tok = self.tokenizer
        texts = [tok.apply_chat_template(conv, add_generation_prompt=True) for conv in convs]
        outs = generate_all(self, [tok.encode(t, add_special_tokens=False) for t in texts], sampling_params)
        for out, text in zip(outs, texts, strict=True):
            out.prompt = text
        return outs

    def close(self) -> None:
        """Stop tensor-parallel workers (if any); the object is unusable afterwards."""
        self.engine.runner.shutdown()

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """(len, vocab) float32 logits at every prompt position (prefill through the paged path)."""
        if self.has_unfinished_requests():
            raise RuntimeError("prompt_logits() needs an idle engine")
        return self.engine.prompt_logits(list(token_ids))
