"""ModelRunner: owns the device, the weights and the KV cache; turns a batch of sequences into step metadata,
runs the model and samples."""
from __future__ import annotations

import logging

import torch

from flashgen.config import EngineConfig
from flashgen.engine.sampler import SamplingBatch, sample
from flashgen.engine.sequence import Sequence
from flashgen.models.decoder import DecoderLM, StepContext
from flashgen.models.spec import DTYPES, ModelSpec
from flashgen.ops import cuda_backend_available, get_ops

log = logging.getLogger("flashgen")


def pick_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def pick_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision GEMMs are slow and less exact; the reference runs fp32
    return DTYPES[spec.torch_dtype] if spec.torch_dtype != "float32" else torch.bfloat16


def pick_backend(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> str:
    if config.backend == "torch":
        return "torch"
    ok, why = cuda_backend_available()
    if config.backend == "cuda":
        if device.type != "cuda" or not ok:
            raise RuntimeError(f"backend='cuda' cannot run here: {why or 'the device is the CPU'}")
        if dtype == torch.float32:
            raise RuntimeError("backend='cuda' runs bfloat16 and float16; use --dtype bfloat16 or backend torch")
        return "cuda"
    return "cuda" if device.type == "cuda" and ok and dtype != torch.float32 else "torch"


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, spec: ModelSpec, eos_ids: set[int]):
        self.config, self.spec, self.eos_ids = config, spec, eos_ids
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, spec, self.device)
        self.backend = pick_backend(config, self.device, self.dtype)
        self.block_size = config.block_size
        max_len = config.max_model_len or spec.max_position_embeddings
        if spec.sliding_window and spec.sliding_window < max_len:
            log.warning("model uses a sliding window of %d tokens; max_model_len capped to it", spec.sliding_window)
            max_len = spec.sliding_window
        self.model = DecoderLM(model_dir, spec, self.dtype, self.device, get_ops(self.backend), max_len,
                               config.load_format)
        self.num_blocks = self._plan_kv_blocks(max_len)
        self.max_model_len = min(max_len, self.num_blocks * self.block_size)
        if self.max_model_len < max_len:
            log.warning("KV cache holds %d tokens; max_model_len capped from %d", self.max_model_len, max_len)
        kv_shape = (2, spec.num_layers, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_cache = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.model.bind_kv_cache(self.kv_cache)
        self.on_logits = None  # tests hook: called with (seqs, logits) before sampling
        self.graphs = None
        # NOTE: the torch reference reads context lengths on the host, so only the CUDA kernels are capturable.
        if self.device.type == "cuda" and self.backend == "cuda" and not config.enforce_eager:
            from flashgen.engine.cuda_graphs import DecodeGraphs

            max_blocks = (self.max_model_len + self.block_size - 1) // self.block_size
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, max_blocks)

    def _plan_kv_blocks(self, max_len: int) -> int:
        per_block = self.spec.kv_bytes_per_token(self.dtype) * self.block_size
        need = self.config.max_num_seqs * max_len * self.spec.kv_bytes_per_token(self.dtype)
        if self.config.kv_cache_gb:
            budget = self.config.kv_cache_gb * 2**30
        elif self.device.type == "cuda":
            peak = self._profile_activations(max_len)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - self.config.gpu_memory_utilization) - peak
            log.info("activation peak %.2f GiB; KV cache gets %.2f GiB", peak / 2**30, max(budget, 0) / 2**30)
        else:
            budget = min(2 * 2**30, need)
        blocks = int(max(budget, 0) // per_block)
        if blocks < 1:
            raise RuntimeError(f"no memory is left for the KV cache ({per_block} bytes per block); lower "
                               "max_num_batched_tokens, raise gpu_memory_utilization or set kv_cache_gb")
        return blocks

    def _profile_activations(self, max_len: int) -> int:
        """Peak activation bytes of the largest prefill step plus a full decode batch's logits and sampling,
        measured by running them on a scratch cache (freed afterwards)."""
        bs, spec = self.block_size, self.spec
        T = self.config.max_num_batched_tokens
        seq_len = min(T, max_len)
        nseq = (T + seq_len - 1) // seq_len
        blocks_per_seq = (seq_len + bs - 1) // bs
        scratch = torch.zeros((2, spec.num_layers, nseq * blocks_per_seq, bs, spec.num_kv_heads, spec.head_dim),
                              dtype=self.dtype, device=self.device)
        self.model.bind_kv_cache(scratch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        seqs = []
        for i in range(nseq):
            n = min(seq_len, T - i * seq_len)
            s = Sequence(f"_profile{i}", None, [0] * n, None, bs, 0)  # type: ignore[arg-type]
            s.block_table, s.num_scheduled_tokens = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), n
            seqs.append(s)
        input_ids, ctx, last = self._prepare(seqs, True)
        hidden, residual = self.model.forward(input_ids, ctx)
        del hidden, residual
        probe = torch.randn(self.config.max_num_seqs, spec.vocab_size, device=self.device)
        probe.softmax(-1).sort(-1)  # sampling's widest temporaries: a sort of (max_num_seqs, vocab)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del probe, scratch
        self.model.k_caches, self.model.v_caches = [], []
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # headroom for allocator fragmentation and graph pools

    # -- step metadata ---------------------------------------------------------------------------------------
    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32)

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        bs = self.block_size
        ids, pos, slots, cu, ctx_lens, last = [], [], [], [0], [], []
        for s in seqs:
            start, n = s.num_computed_tokens, s.num_scheduled_tokens
            ids += s.token_ids[start:start + n]
            pos += range(start, start + n)
            slots += [s.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu.append(cu[-1] + n)
            ctx_lens.append(start + n)
            if start + n == s.num_tokens:
                last.append(cu[-1] - 1)
        i32 = dict(dtype=torch.int32)
        ctx = StepContext(
            is_prefill=is_prefill, positions=torch.tensor(pos, **i32), slot_mapping=torch.tensor(slots, **i32),
            context_lens=torch.tensor(ctx_lens, **i32), block_tables=self._tables(seqs),
            cu_seqlens_q=torch.tensor(cu, **i32), max_seqlen_q=max(s.num_scheduled_tokens for s in seqs),
        )
        dev = self.device
        for f in ("positions", "slot_mapping", "context_lens", "block_tables", "cu_seqlens_q"):
            setattr(ctx, f, getattr(ctx, f).to(dev, non_blocking=True))
        return torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True), ctx, last

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        dev, V = self.device, self.spec.vocab_size
        ps = [s.params for s in seqs]
        f32 = dict(dtype=torch.float32)
        b = SamplingBatch(
            temperature=torch.tensor([p.temperature for p in ps], **f32),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else V for p in ps]) if any(p.top_k > 0 for p in ps) else None,
            top_p=torch.tensor([p.top_p for p in ps], **f32) if any(p.top_p < 1 for p in ps) else None,
            min_p=torch.tensor([p.min_p for p in ps], **f32) if any(p.min_p > 0 for p in ps) else None,
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.int64),
            steps=torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64),
            all_greedy=all(p.temperature == 0 for p in ps),
        )
        if any(p.repetition_penalty != 1 for p in ps):
            b.rep_penalty = torch.tensor([p.repetition_penalty for p in ps], **f32)
            b.seen_prompt = torch.zeros(len(seqs), V, dtype=torch.bool)
            for i, s in enumerate(seqs):
                b.seen_prompt[i, torch.tensor(s.token_ids, dtype=torch.int64)] = True
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            b.presence = torch.tensor([p.presence_penalty for p in ps], **f32)
            b.frequency = torch.tensor([p.frequency_penalty for p in ps], **f32)
            b.out_counts = torch.zeros(len(seqs), V, **f32)
            for i, s in enumerate(seqs):
                if s.output_counts:
                    b.out_counts[i, torch.tensor(list(s.output_counts))] = torch.tensor(
                        list(s.output_counts.values()), **f32)
        banned = [(i, s) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if banned:
            b.banned = torch.zeros(len(seqs), V, dtype=torch.bool)
            for i, s in banned:
                stop = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else self.eos_ids)
                b.banned[i, [t for t in stop if t < V]] = True
        for f in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps", "rep_penalty", "presence",
                  "frequency", "seen_prompt", "out_counts", "banned"):
            v = getattr(b, f)
            if v is not None:
                setattr(b, f, v.to(dev, non_blocking=True))
        return b

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step; returns the sampled token of each sequence whose context is complete, in order."""
        input_ids, ctx, last = self._prepare(seqs, is_prefill)
        if not is_prefill and self.graphs is not None and self.graphs.bucket(len(seqs)) is not None:
            logits = self.graphs.run(input_ids, ctx)
        else:
            hidden, residual = self.model.forward(input_ids, ctx)
            if not last:
                return []
            idx = torch.tensor(last, device=self.device)
            logits = self.model.logits(hidden[idx], residual[idx])
        done = [s for s in seqs if s.num_computed_tokens + s.num_scheduled_tokens == s.num_tokens]
        if self.on_logits is not None:
            self.on_logits(done, logits)
        return sample(logits, self._sampling_batch(done)).tolist()

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """(len, vocab) float32 logits of every position of one prompt, through the paged path (uses block 0..)."""
        n = len(token_ids)
        blocks = list(range((n + self.block_size - 1) // self.block_size))
        seq = Sequence("_score", None, token_ids, None, self.block_size, 0)  # type: ignore[arg-type]
        seq.block_table, seq.num_scheduled_tokens = blocks, n
        input_ids, ctx, _ = self._prepare([seq], True)
        hidden, residual = self.model.forward(input_ids, ctx)
        return self.model.logits(hidden, residual)
