"""ModelRunner: owns the device, the weights, the KV cache and the token slots; launches a scheduled batch
(pack -> forward -> sample) and hands back its tokens as a future.

Its parts: step_packing (a batch as one int64 tensor), kv_plan (how many KV blocks fit), cuda_graphs (graph or
eager dispatch), token_slots (where sampled tokens wait for the host), tp_worker (the other ranks' processes)."""
from __future__ import annotations

import concurrent.futures
import logging
import os
from array import array
from collections.abc import Callable

import numpy as np
import torch

from flashgen.config import EngineConfig
from flashgen.engine import tp_worker
from flashgen.engine.cuda_graphs import DecodeGraphs, run_step
from flashgen.engine.grammar import TokenMasks
from flashgen.engine.kv_plan import alloc_kv_cache, calibrate_kv_scales, plan_kv_blocks
from flashgen.engine.logprobs import pack_logprobs
from flashgen.engine.sampler import (
    LOGPROBS,
    STRUCTURED,
    SamplingBatch,
    batch_flags,
    build_sampling_batch,
    processed_logits,
    sample_checked,
)
from flashgen.engine.scheduler import Batch
from flashgen.engine.sequence import Sequence
from flashgen.engine.step_packing import SHARED_GROUP, SHARED_GROUP_WIDE, pack_step, unpack_step
from flashgen.engine.token_slots import SampledTokens, TokenSlots
from flashgen.models.decoder import DecoderLM
from flashgen.models.spec import DTYPES, ModelSpec, kv_dtype_of
from flashgen.models.tensor_parallel import TPInfo
from flashgen.ops import CUDA_FIX, cuda_backend_available, get_ops
from flashgen.ops.cuda_attention import ATTN_HEAD_DIMS, shared_on_prefill
from flashgen.ops.cuda_moe import grouped_unsupported, moe_impl

log = logging.getLogger(__name__)
# prompt positions whose logits are computed at once for prompt logprobs: (512, vocab) in the model's dtype is no
# more than the (max_num_seqs, vocab) float32 logits plan_kv_blocks measures room for at 256 sequences or more
PROMPT_LP_ROWS = 512


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


def pick_backend(config: EngineConfig, device: torch.device, dtype: torch.dtype, spec: ModelSpec | None = None
                 ) -> str:
    if config.backend == "torch":
        return "torch"
    # sliding-window layers (Gemma 3) run on the CUDA kernels too (their `window` argument), and so does Gemma 3
    # 1B-12B's head_dim 256; a head_dim the attention kernels lack (Phi-3's 96) does not
    if spec is not None and spec.head_dim not in ATTN_HEAD_DIMS:
        if config.backend == "cuda":
            raise RuntimeError(f"backend='cuda' cannot run {spec.architecture}: its head_dim {spec.head_dim} is not "
                               f"one of the CUDA attention kernels' {ATTN_HEAD_DIMS}; use --backend torch")
        if device.type == "cuda":
            log.warning("%s has head_dim %d, which the CUDA attention kernels do not run (they take %s); running "
                        "the torch reference ops (--backend torch)", spec.architecture, spec.head_dim,
                        ATTN_HEAD_DIMS)
        return "torch"
    ok, why = cuda_backend_available()
    if config.backend == "cuda":
        if device.type != "cuda" or not ok:
            fix = f" ({CUDA_FIX})" if device.type == "cuda" else ""
            raise RuntimeError(f"backend='cuda' cannot run here: {why or 'the device is the CPU'}{fix}")
        if dtype == torch.float32:
            raise RuntimeError("backend='cuda' runs bfloat16 and float16; use --dtype bfloat16 or backend torch")
        return "cuda"
    if device.type == "cuda" and not ok:  # one line at start-up: a GPU must not run the reference ops unnoticed
        log.warning("CUDA GPU found but the CUDA kernels cannot run (%s); running the slow torch reference ops. "
                    "Fix: %s; or pass --backend torch to choose the reference ops explicitly", why, CUDA_FIX)
    return "cuda" if device.type == "cuda" and ok and dtype != torch.float32 else "torch"


def pick_kv_dtype(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the model's, float8_e4m3fn (--kv-cache-dtype fp8) or torch.int8 (int8k: int8 K and
    e4m3 V) where the device converts to and from e4m3 in hardware (compute capability 8.9 and later) or on the
    CPU (the torch reference)."""
    kv_dtype = kv_dtype_of(config.kv_cache_dtype, dtype)
    if kv_dtype != dtype:
        require_fp8(device, f"kv_cache_dtype={config.kv_cache_dtype!r}", "use kv_cache_dtype='auto'")
    return kv_dtype


def require_fp8(device: torch.device, what: str, fix: str) -> None:
    """Refuse `what` on a CUDA GPU without FP8 conversions and GEMMs (compute capability below 8.9), saying `fix`;
    the CPU (the torch reference) runs FP8 everywhere."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"{what} needs a GPU with FP8 (compute capability 8.9 or later: Ada, Hopper, "
                           f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}: {fix}")


def check_fp8_weights(config: EngineConfig, spec: ModelSpec, device: torch.device) -> bool:
    """Whether the weights run FP8 (an FP8 checkpoint, or --quantization fp8): refused at start-up, before a weight
    is read, on a GPU without FP8 GEMMs (compute capability below 8.9); the CPU runs the torch reference."""
    fp8 = config.quantization == "fp8" or spec.quant is not None
    if fp8:
        what, fix = (("quantization='fp8'", "use quantization='auto'") if spec.quant is None else
                     (f"this checkpoint's FP8 weights (quantization_config.quant_method={spec.quant.method!r})",
                      "use the model's unquantized checkpoint"))
        require_fp8(device, what, fix)
    return fp8


class Launched:
    """A step whose forward is queued: the sequences that sample, their logits until sampled, then the tokens."""

    def __init__(self, done: list[Sequence], logits: torch.Tensor | None, is_prefill: bool):
        self.done, self.logits, self.is_prefill = done, logits, is_prefill
        self.flags = batch_flags(done)  # the features its rows use (sampler.sampling_flags)
        # a row with a grammar: its mask needs the previous step's tokens, so the step samples in complete()
        self.constrained = bool(self.flags & STRUCTURED) and any(s.matcher is not None for s in done)
        self.tokens: SampledTokens | None = None
        self.masks: concurrent.futures.Future | None = None  # its grammar masks being filled (start_masks)
        self.prompt_lp: list = []  # (sequence, first position, packed prompt logprobs) of this step


class ModelRunner:
    """Rank 0 runs in the engine's process; with tensor parallelism, ranks 1..N-1 run `run_worker` in their own
    processes (started through flashgen.engine.tp_worker) and replay every step rank 0 broadcasts."""

    def __init__(self, config: EngineConfig, model_dir: str, spec: ModelSpec, eos_ids: set[int], rank: int = 0):
        self.config, self.spec, self.eos_ids, self.rank = config, spec, eos_ids, rank
        self.world = config.tensor_parallel_size
        self.device = pick_device(config, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = pick_dtype(config, spec, self.device)
        self.backend = pick_backend(config, self.device, self.dtype, spec)
        self.block_size = config.block_size
        self.workers = []
        if self.world > 1 and rank == 0:
            self.workers = tp_worker.start_workers(config, run_worker, (config, model_dir, spec, eos_ids))
        max_len = config.max_model_len or spec.max_position_embeddings
        if max_len > spec.max_position_embeddings:  # checked before the weights load (the RoPE table alone
            # for 10^8 positions would take the machine's memory)
            raise ValueError(f"max_model_len={max_len:,} is more than the model's max_position_embeddings "
                             f"({spec.max_position_embeddings:,}, from its config.json); use at most that, or 0 "
                             "for the model's own length")
        # Mistral-style: every layer has the one window. Gemma 3's local layers have it but its global layers
        # see every token, so its max_model_len is not capped (spec.sliding_window is None; spec.local_window)
        if spec.sliding_window and spec.sliding_window < max_len:
            log.warning("model uses a sliding window of %d tokens; max_model_len capped to it", spec.sliding_window)
            max_len = spec.sliding_window
        tp = TPInfo(rank, self.world) if self.world > 1 else None
        self.kv_dtype = pick_kv_dtype(config, self.device, self.dtype)
        check_fp8_weights(config, spec, self.device)
        self.model = DecoderLM(model_dir, spec, self.dtype, self.device, get_ops(self.backend), max_len,
                               config.load_format, tp, self.kv_dtype, config.quantization)
        self.slots, self.graphs = TokenSlots(), None
        # shared-prefix decode (step_packing.shared_prefix_groups): members per group, 0 = off. Not with sliding
        # windows (a window may end inside the shared blocks). FLASHGEN_SHARED_PREFIX=0 turns it off (A/B
        # measurements); wider groups for the PF_SHARED kernel (the default on a model-dtype cache)
        on = (not any(spec.layer_window(i) for i in range(spec.num_layers))
              and os.environ.get("FLASHGEN_SHARED_PREFIX", "1") != "0")
        wide = self.backend == "cuda" and shared_on_prefill(self.kv_dtype, self.dtype)
        self.shared_prefix = 0 if not on else SHARED_GROUP_WIDE if wide else SHARED_GROUP
        self.masks: TokenMasks | None = None  # grammar bitmasks, made on the first constrained step
        self._mask_thread: concurrent.futures.ThreadPoolExecutor | None = None  # fills them (start_masks)
        if self.kv_dtype == torch.float8_e4m3fn and self.model.kv_scales_from != "checkpoint":
            calibrate_kv_scales(config, self.model, max_len, self.execute)
        self.num_blocks = plan_kv_blocks(config, self.model, max_len, self.execute)
        self.max_model_len = min(max_len, self.num_blocks * self.block_size)
        if self.max_model_len < max_len and rank == 0:
            log.warning("KV cache holds %d tokens; max_model_len capped from %d", self.max_model_len, max_len)
        self.kv_cache, self.kv_scales = alloc_kv_cache(self.model, self.num_blocks, self.block_size)
        self.on_logits = None  # tests hook: called with (seqs, logits) before sampling; may change logits
        # Pipelined decode (CUDA, one process): a decode step can start before the host has read the previous
        # step's tokens (see TokenSlots).
        if self.device.type == "cuda" and self.world == 1:
            self.enable_pipelining()
        # NOTE: the torch reference reads context lengths on the host, so only the CUDA kernels are capturable. A
        # MoE model is captured when every MoE layer runs the grouped GEMMs (no host sync); the per-expert loop
        # reads its token counts on the host, so a model that runs it decodes eagerly (docs/design.md)
        if (self.device.type == "cuda" and self.backend == "cuda" and not config.enforce_eager
                and self._moe_capturable()):
            max_blocks = (self.max_model_len + self.block_size - 1) // self.block_size
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, max_blocks, max(1, self.shared_prefix),
                                       fine_groups=self.shared_prefix == SHARED_GROUP_WIDE)

    def _moe_capturable(self) -> bool:
        """Whether every MoE layer's ops.moe runs without a host sync (the CUDA backend's grouped GEMMs)."""
        if self.model.spec.moe is None:
            return True
        for L in self.model.layers:
            if L.get("router") is not None:
                gate_up, down = L["experts_gate_up"], L["experts_down"]
                assert gate_up is not None and down is not None
                if moe_impl(self.dtype, gate_up, down) != "grouped":
                    why = grouped_unsupported(self.dtype, gate_up, down) or "FLASHGEN_MOE=loop"
                    log.info("MoE layers run the per-expert loop (%s), so decode steps run without CUDA graphs", why)
                    return False
        return True

    def enable_pipelining(self) -> None:
        """Keep each running sequence's latest token in a device slot (forced on in CPU tests)."""
        self.slots.enable(self.config.max_num_seqs, self.device)

    @property
    def async_capable(self) -> bool:
        return self.slots.on

    def execute(self, buf: torch.Tensor, on_hidden=None) -> torch.Tensor | None:
        """Run one packed step (see step_packing) on this rank: (rows, vocab) logits, model dtype, or None."""
        input_ids, ctx, rows = unpack_step(buf, self.device)
        if not ctx.is_prefill:
            input_ids = self.slots.gather(input_ids)
        return run_step(self.model, self.graphs, input_ids, ctx, rows, on_hidden)

    def _step(self, buf: torch.Tensor, on_hidden=None) -> torch.Tensor | None:
        if self.workers:
            tp_worker.broadcast_step(buf, self.device)
        return self.execute(buf, on_hidden)

    def _prompt_logprobs(self, seqs: list[Sequence], out: list) -> Callable | None:
        """A hook for run_step that computes the prompt logprobs of the prefill chunks asking for them, in slices
        of PROMPT_LP_ROWS positions (never a whole prompt's logits at once), appending (seq, first position, the
        chunk's packed rows) to `out`; None when no sequence asks."""
        spans = []
        row = 0
        for s in seqs:
            start, n = s.num_computed_tokens, s.num_scheduled_tokens
            k = s.params.prompt_logprobs if s.params is not None else None
            # position p predicts token p + 1; positions done before a preemption are not redone
            first, end = max(start, len(s.prompt_logprobs) - 1), min(start + n, s.num_prompt_tokens - 1)
            if k is not None and first < end:
                spans.append((s, row + first - start, first, end - first, k))
            row += n
        if not spans:
            return None

        pin = self.device.type == "cuda"

        def hook(hidden: torch.Tensor, residual: torch.Tensor) -> None:
            # Runs with the forward queued and the GPU busy with it. The targets (position p's is token p + 1, past
            # the chunk's input ids for its last position) go up from pinned memory without blocking: a pageable
            # copy would hold this thread until the queued forward had run, and the GPU would idle while it caught up.
            for s, r0, p0, n, k in spans:
                host = torch.empty(n, dtype=torch.int64, pin_memory=pin)
                host.numpy()[:] = s.token_ids[p0 + 1:p0 + 1 + n]
                targets = host.to(self.device, non_blocking=True)
                packed = []
                for a in range(0, n, PROMPT_LP_ROWS):
                    b = min(n, a + PROMPT_LP_ROWS)
                    x = self.model.logits(hidden[r0 + a:r0 + b], residual[r0 + a:r0 + b])
                    packed.append(pack_logprobs(x, targets[a:b], k, self.backend == "cuda"))
                # one tensor per chunk: one host copy and one block for the engine, not one per slice
                out.append((s, p0, torch.cat(packed)))

        return hook

    @torch.inference_mode()
    def launch(self, batch: Batch) -> Launched:
        """Queue one step's forward on the device, and its sampling unless a row needs a grammar mask (which
        needs the tokens of the step before: see complete)."""
        seqs, lens = batch.seqs, None
        if not batch.is_prefill:
            # Longest context first: the attention kernel's CTAs are dispatched in batch order, so the long
            # sequences start in the first wave and the short ones fill the tail. The lengths are read once, for
            # the order and the packing (a key function a sequence costs more than the packing's table)
            length = np.asarray([len(s.token_ids) for s in seqs], dtype=np.int32)
            order = np.argsort(-length, kind="stable")
            seqs, lens = [seqs[i] for i in order.tolist()], length[order]
        done = [s for s in seqs if s.num_computed_tokens + s.num_scheduled_tokens == s.num_tokens]
        ids = None if batch.is_prefill else self.slots.decode_inputs(seqs)
        prompt_lp: list = []
        hook = self._prompt_logprobs(seqs, prompt_lp) if batch.is_prefill else None
        buf = pack_step(seqs, batch.is_prefill, self.block_size, ids, shared_prefix=self.shared_prefix, lens=lens)
        step = Launched(done, self._step(buf, hook), batch.is_prefill)
        step.prompt_lp = prompt_lp
        if not step.constrained:
            self._sample(step)
        return step

    @torch.inference_mode()
    def complete(self, step: Launched) -> SampledTokens:
        """The step's tokens as a future. A step with constrained rows samples here: the engine calls this after
        reading the previous step's tokens, so every matcher has consumed them and the masks can be filled
        (on CPU threads, while the GPU still runs the forward)."""
        return step.tokens if step.tokens is not None else self._sample(step)

    def start_masks(self, step: Launched) -> None:
        """Fill the grammar masks of a launched step's constrained rows on a thread, once the engine has had every
        matcher take the previous step's token: its remaining work on those tokens (detokenizing, stop checks)
        then runs while llguidance fills them, and complete() only waits for what is left. The engine touches no
        matcher until complete()."""
        if step.tokens is not None or step.masks is not None or not step.constrained:
            return
        if self._mask_thread is None:
            # a thread's current CUDA device is its own: the masks' copy and its event go to the runner's device
            init = (lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None
            self._mask_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashgen-masks",
                                                                      initializer=init)
        step.masks = self._mask_thread.submit(self._token_masks().fill, list(step.done))

    def _token_masks(self) -> TokenMasks:
        """The grammar bitmasks' filler, made on the first constrained step."""
        if self.masks is None:
            self.masks = TokenMasks(self.spec.vocab_size, self.device)
        return self.masks

    def _sample(self, step: Launched) -> SampledTokens:
        done, logits = step.done, step.logits
        if logits is None:
            step.tokens = SampledTokens([], None, False, prompt_lp=step.prompt_lp)
            return step.tokens
        if self.on_logits is not None:
            self.on_logits(done, logits)
        sampling = build_sampling_batch(done, self.spec.vocab_size, self.eos_ids, self.device,
                                        self.slots.assign(done), self.slots.tokens, step.flags)
        if step.masks is not None:
            sampling.bitmask, sampling.mask_rows = step.masks.result()
            step.masks = None
        elif step.constrained:
            sampling.bitmask, sampling.mask_rows = self._token_masks().fill(done)
        # NOTE: a row whose chosen logit is NaN or inf (a NaN row makes both samplers pick a NaN or index 0), or a
        # constrained row with no allowed token (the sampler's -1), is reported as token -1 in `checked`, so the
        # engine can fail that request alone; `safe` (and the device slot) gets a valid id
        safe, checked = sample_checked(logits, sampling, fused=self.backend == "cuda")
        lp_rows = [i for i, s in enumerate(done) if s.params.logprobs is not None] if step.flags & LOGPROBS else []
        lp = self._logprobs(logits, sampling, safe, done, lp_rows) if lp_rows else None
        step.tokens = self.slots.publish(done, checked, lp, lp_rows, step.prompt_lp)
        step.logits = None
        return step.tokens

    def _logprobs(self, logits: torch.Tensor, sampling: SamplingBatch, tokens: torch.Tensor, done: list[Sequence],
                  rows: list[int]) -> torch.Tensor:
        """pack_logprobs for `rows` of the step: over the model's raw logits, or, for processed_logprobs, over
        the distribution the token was drawn from."""
        k = max(done[i].params.logprobs or 0 for i in rows)
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        x = logits.index_select(0, idx)
        processed = [j for j, i in enumerate(rows) if done[i].params.logprobs_mode == "processed_logprobs"]
        if processed:
            x = x.float()
            sel = torch.tensor(processed, dtype=torch.int64).to(self.device, non_blocking=True)
            x[sel] = processed_logits(logits, sampling).index_select(0, idx[sel])
        return pack_logprobs(x, tokens.index_select(0, idx), k, self.backend == "cuda")

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV blocks (src -> dst, all layers, K and V), queued after the step that wrote the sources."""
        src = torch.tensor([a for a, _ in pairs], dtype=torch.int64).to(self.device, non_blocking=True)
        dst = torch.tensor([b for _, b in pairs], dtype=torch.int64).to(self.device, non_blocking=True)
        cache = self.kv_cache.view(torch.uint8) if self.kv_cache.dtype.itemsize == 1 else self.kv_cache
        cache[:, :, dst] = cache[:, :, src]  # FP8 as bytes: index copies of float8 are not on every torch
        if self.kv_scales is not None:  # the int8k cache: each token's scales go with it
            self.kv_scales[:, :, dst] = self.kv_scales[:, :, src]

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: its device token slot is free again."""
        self.slots.release(seq)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """(len, vocab) float32 logits of every position of one prompt, through the paged path (uses block 0..)."""
        n = len(token_ids)
        seq = Sequence("_score", None, token_ids, None, self.block_size, 0)  # type: ignore[arg-type]
        seq.block_table = array("i", range((n + self.block_size - 1) // self.block_size))
        seq.num_scheduled_tokens = n
        logits = self._step(pack_step([seq], True, self.block_size, rows=list(range(n))))
        assert logits is not None  # every row was asked for
        return logits.float()

    def shutdown(self) -> None:
        if self._mask_thread is not None:
            self._mask_thread.shutdown()
            self._mask_thread = None
        if self.workers:
            tp_worker.stop_workers(self.workers, self.device)
            self.workers = []


def run_worker(config: EngineConfig, model_dir: str, spec: ModelSpec, eos_ids: set[int], rank: int,
               port: int) -> None:
    """Tensor-parallel rank `rank` (a process of its own): build this rank's runner, replay every step."""
    tp_worker.join_group(config, rank, port)
    runner = ModelRunner(config, model_dir, spec, eos_ids, rank=rank)
    with torch.inference_mode():
        for buf in tp_worker.receive_steps(runner.device):
            runner.execute(buf)
    tp_worker.leave_group()
