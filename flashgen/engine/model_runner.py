"""ModelRunner: owns the device, the weights and the KV cache; turns a batch of sequences into step metadata,
runs the model and samples."""
from __future__ import annotations

import logging

import numpy as np
import torch

from flashgen.config import EngineConfig
from flashgen.engine.sampler import build_sampling_batch, sample
from flashgen.engine.sequence import Sequence
from flashgen.models.decoder import DecoderLM, StepContext
from flashgen.models.spec import DTYPES, ModelSpec
from flashgen.models.tensor_parallel import TPInfo
from flashgen.ops import cuda_backend_available, get_ops

log = logging.getLogger("flashgen")


def pick_device(config: EngineConfig, rank: int = 0) -> torch.device:
    if config.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and config.tensor_parallel_size > 1:
        if torch.cuda.device_count() < config.tensor_parallel_size:
            raise RuntimeError(f"tensor_parallel_size={config.tensor_parallel_size} needs as many GPUs; "
                               f"{torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
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


class SampledTokens:
    """Tokens sampled by a launched step, read back without blocking the GPU: a pinned host copy and an event
    (CUDA), or the values themselves (CPU)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None, is_prefill: bool):
        self.seqs = seqs
        self.idx: list[int] = []  # where each sequence's PLACEHOLDER sits
        self.is_prefill = is_prefill
        self._event = None
        if tokens is None:
            self._host = torch.empty(0, dtype=torch.int64)
        elif tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens

    def result(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class ModelRunner:
    """Rank 0 runs in the engine's process; with tensor parallelism, ranks 1..N-1 run `worker_loop` in their
    own processes (flashgen.engine.tp_worker.worker_main) and replay every step rank 0 broadcasts."""

    def __init__(self, config: EngineConfig, model_dir: str, spec: ModelSpec, eos_ids: set[int], rank: int = 0):
        self.config, self.spec, self.eos_ids, self.rank = config, spec, eos_ids, rank
        self.world = config.tensor_parallel_size
        self.device = pick_device(config, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = pick_dtype(config, spec, self.device)
        self.backend = pick_backend(config, self.device, self.dtype)
        self.block_size = config.block_size
        self.workers = []
        if self.world > 1 and rank == 0:
            from flashgen.engine.tp_worker import start_workers

            self.workers = start_workers(config, model_dir, spec, eos_ids)
        max_len = config.max_model_len or spec.max_position_embeddings
        if max_len > spec.max_position_embeddings:  # checked before the weights load (the RoPE table alone
            # for 10^8 positions would take the machine's memory)
            raise ValueError(f"max_model_len={max_len:,} is more than the model's max_position_embeddings "
                             f"({spec.max_position_embeddings:,}, from its config.json); use at most that, or 0 "
                             "for the model's own length")
        if spec.sliding_window and spec.sliding_window < max_len:
            log.warning("model uses a sliding window of %d tokens; max_model_len capped to it", spec.sliding_window)
            max_len = spec.sliding_window
        tp = TPInfo(rank, self.world) if self.world > 1 else None
        self.model = DecoderLM(model_dir, spec, self.dtype, self.device, get_ops(self.backend), max_len,
                               config.load_format, tp)
        self.num_kv_heads = self.model.num_kv_heads_local
        self.num_blocks = self._plan_kv_blocks(max_len)
        self.max_model_len = min(max_len, self.num_blocks * self.block_size)
        if self.max_model_len < max_len and rank == 0:
            log.warning("KV cache holds %d tokens; max_model_len capped from %d", self.max_model_len, max_len)
        kv_shape = (2, spec.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, spec.head_dim)
        self.kv_cache = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.model.bind_kv_cache(self.kv_cache)
        self.on_logits = None  # tests hook: called with (seqs, logits) before sampling; may change logits
        # Pipelined decode (CUDA, one process): each running sequence's latest token lives in a device slot, so a
        # decode step can start before the host has read the previous step's tokens.
        self.async_capable = False
        self.last_tokens = None
        self._slot: dict[int, int] = {}
        if self.device.type == "cuda" and self.world == 1:
            self.enable_pipelining()
        self.graphs = None
        # NOTE: the torch reference reads context lengths on the host, so only the CUDA kernels are capturable.
        if self.device.type == "cuda" and self.backend == "cuda" and not config.enforce_eager:
            from flashgen.engine.cuda_graphs import DecodeGraphs

            max_blocks = (self.max_model_len + self.block_size - 1) // self.block_size
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, max_blocks)

    def _plan_kv_blocks(self, max_len: int) -> int:
        per_token = self.spec.kv_bytes_per_token(self.dtype, self.num_kv_heads)
        per_block = per_token * self.block_size
        need = self.config.max_num_seqs * max_len * per_token
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
        if self.world > 1:  # every rank must hold the same blocks: take the smallest
            import torch.distributed as dist

            t = torch.tensor([blocks], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            blocks = int(t.item())
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
        scratch = torch.zeros((2, spec.num_layers, nseq * blocks_per_seq, bs, self.num_kv_heads, spec.head_dim),
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
        # NOTE: no broadcast here: every rank profiles its own copy of the same step
        self._execute(self._pack(seqs, True, []))
        probe = torch.randn(self.config.max_num_seqs, spec.vocab_size, device=self.device)
        probe.softmax(-1).sort(-1)  # sampling's widest temporaries: a sort of (max_num_seqs, vocab)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del probe, scratch
        self.model.k_caches, self.model.v_caches = [], []
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # headroom for allocator fragmentation and graph pools

    # -- step metadata: packed into one int64 tensor, so tensor-parallel ranks get it in one broadcast --------
    HEADER = 7  # is_prefill, T, B, width, max_seqlen_q, n_last, all_rows

    def _pack(self, seqs: list[Sequence], is_prefill: bool, last: list[int] | None = None) -> torch.Tensor:
        bs, B = self.block_size, len(seqs)
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((B, width), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        if is_prefill:
            ids, pos, slots, cu, rows = [], [], [], [0], []
            for s in seqs:
                start, n = s.num_computed_tokens, s.num_scheduled_tokens
                ids += s.token_ids[start:start + n]
                p = np.arange(start, start + n)
                pos.append(p)
                slots.append(np.asarray(s.block_table)[p // bs] * bs + p % bs)
                cu.append(cu[-1] + n)
                if start + n == s.num_tokens:
                    rows.append(cu[-1] - 1)
            ctx_lens = [s.num_computed_tokens + s.num_scheduled_tokens for s in seqs]
            pos_a, slot_a = np.concatenate(pos), np.concatenate(slots)
            max_q = max(s.num_scheduled_tokens for s in seqs)
        else:  # one token per sequence, at position len - 1
            # NOTE: with device slots the id column holds slot numbers (the token may still be on the GPU)
            ids = [self._slot[s.seq_id] for s in seqs] if self.last_tokens is not None else \
                [s.token_ids[-1] for s in seqs]
            ctx_lens = [len(s) for s in seqs]
            pos_a = np.asarray(ctx_lens, dtype=np.int64) - 1
            last_blocks = tables[np.arange(B), pos_a // bs]
            slot_a = last_blocks * bs + pos_a % bs
            cu, rows, max_q = list(range(B + 1)), list(range(B)), 1
        if last is not None:
            rows = last
        header = [int(is_prefill), len(ids), B, width, max_q, len(rows), 0]
        return torch.from_numpy(np.concatenate([
            np.asarray(header + ids, dtype=np.int64), pos_a, slot_a, np.asarray(ctx_lens + cu, dtype=np.int64),
            tables.ravel(), np.asarray(rows, dtype=np.int64)]))

    def _unpack(self, buf: torch.Tensor) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
        is_prefill, T, B, W, max_q, n_last, _ = buf[:self.HEADER].tolist()
        buf = buf.to(self.device, non_blocking=True)
        parts = buf[self.HEADER:].split([T, T, T, B, B + 1, B * W, n_last])
        i32 = [p.to(torch.int32) for p in parts[1:6]]
        ctx = StepContext(is_prefill=bool(is_prefill), positions=i32[0], slot_mapping=i32[1], context_lens=i32[2],
                          cu_seqlens_q=i32[3], block_tables=i32[4].view(B, W), max_seqlen_q=max_q)
        return parts[0], ctx, parts[6]

    def _execute(self, buf: torch.Tensor) -> torch.Tensor | None:
        """Run one packed step on this rank; (rows, vocab) logits (model dtype) of the rows to sample, or None."""
        input_ids, ctx, rows = self._unpack(buf)
        if not ctx.is_prefill and self.last_tokens is not None:
            input_ids = self.last_tokens[input_ids]
        if not ctx.is_prefill and self.graphs is not None and self.graphs.bucket(input_ids.shape[0]) is not None:
            return self.graphs.run(input_ids, ctx)
        hidden, residual = self.model.forward(input_ids, ctx)
        if rows.numel() == 0:
            return None
        return self.model.logits(hidden[rows], residual[rows])

    def _step(self, buf: torch.Tensor) -> torch.Tensor | None:
        if self.workers:
            from flashgen.engine.tp_worker import broadcast_step

            broadcast_step(buf, self.device)
        return self._execute(buf)

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool) -> SampledTokens:
        """Queue one step on the device; the returned tokens (one per sequence whose context is complete, in
        order) are read later with .result()."""
        if not is_prefill:
            # Longest context first: the attention kernel's CTAs are dispatched in batch order, so the long
            # sequences start in the first wave and the short ones fill the tail.
            seqs = sorted(seqs, key=len, reverse=True)
        done = [s for s in seqs if s.num_computed_tokens + s.num_scheduled_tokens == s.num_tokens]
        logits = self._step(self._pack(seqs, is_prefill))
        if logits is None:
            return SampledTokens([], None, is_prefill)
        if self.on_logits is not None:
            self.on_logits(done, logits)
        batch = build_sampling_batch(done, self.spec.vocab_size, self.eos_ids, self.device)
        tokens = sample(logits, batch, fused=self.backend == "cuda")
        # NOTE: a row whose chosen logit is NaN or inf (a NaN row makes both samplers pick a NaN or index 0) is
        # reported as token -1, so the engine can fail that request alone. O(B): no second pass over the logits.
        # The device slot keeps the sampled id, a valid index for the next (pipelined) step's embedding lookup.
        checked = torch.where(torch.isfinite(logits.gather(1, tokens[:, None])).squeeze(1), tokens, -1)
        if self.last_tokens is not None:
            for s in done:
                if s.seq_id not in self._slot:
                    self._slot[s.seq_id] = self._free_slots.pop()
            slots = torch.tensor([self._slot[s.seq_id] for s in done], dtype=torch.int64)
            self.last_tokens[slots.to(self.device, non_blocking=True)] = tokens
        return SampledTokens(done, checked, is_prefill)

    def enable_pipelining(self) -> None:
        """Keep each running sequence's latest token in a device slot (2 x max_num_seqs slots: preempted
        sequences give theirs back)."""
        self.last_tokens = torch.zeros(2 * self.config.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        self._free_slots = list(range(self.last_tokens.shape[0] - 1, -1, -1))
        self.async_capable = True

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: its device token slot is free again."""
        slot = self._slot.pop(seq.seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """(len, vocab) float32 logits of every position of one prompt, through the paged path (uses block 0..)."""
        n = len(token_ids)
        seq = Sequence("_score", None, token_ids, None, self.block_size, 0)  # type: ignore[arg-type]
        seq.block_table, seq.num_scheduled_tokens = list(range((n + self.block_size - 1) // self.block_size)), n
        return self._step(self._pack([seq], True, list(range(n)))).float()

    def shutdown(self) -> None:
        if self.workers:
            from flashgen.engine.tp_worker import stop_workers

            stop_workers(self.workers, self.device)
            self.workers = []
