"""Engine.step(): schedule -> run -> postprocess, the whole data path in a few lines."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from flashgen.config import EngineConfig
from flashgen.engine import detokenizer
from flashgen.engine.model_runner import ModelRunner, SampledTokens
from flashgen.engine.scheduler import Scheduler
from flashgen.engine.sequence import PLACEHOLDER, Sequence
from flashgen.models.spec import load_spec
from flashgen.outputs import RequestOutput
from flashgen.sampling_params import SamplingParams
from flashgen.tokenizer import Tokenizer


@dataclass
class EngineStats:
    prompt_tokens: int = 0        # prompt tokens computed (prefix-cache hits excluded)
    cached_tokens: int = 0        # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    preemptions: int = 0


def _eos_ids(model_dir: Path, tok: Tokenizer) -> set[int]:
    from flashgen.models.errors import ModelLoadError, read_json_object

    ids = set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        fix = "fix the file or delete it (the tokenizer's eos_token then ends generation)"
        cfg = read_json_object(gen, fix, "settings")
        e = cfg.get("eos_token_id")
        found = e if isinstance(e, list) else ([] if e is None else [e])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in found):
            raise ModelLoadError(f"{gen}: eos_token_id={e!r} must be a token id or a list of token ids; {fix}")
        ids |= set(found)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def tokenize_prompt(tok: Tokenizer, prompt: str | list[int], vocab_size: int, max_model_len: int):
    """(text or None, token ids) of a prompt; ValueError saying what to fix when it cannot run."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character")
        text, ids = prompt, tok.encode(prompt)
    else:
        text, ids = None, [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt has no tokens; give a non-empty prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {max_model_len} tokens "
                         "and at least one must be left to generate: shorten the prompt")
    return text, ids


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = Path(config.model)
        self.spec = load_spec(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.eos_ids = _eos_ids(model_dir, self.tokenizer)
        self.runner = ModelRunner(config, str(model_dir), self.spec, self.eos_ids)
        self.max_model_len = self.runner.max_model_len
        self.scheduler = Scheduler(config, self.runner.num_blocks, self.max_model_len)
        self.scheduler.on_preempt = self.runner.release
        self.stats = EngineStats()
        self._pending: SampledTokens | None = None  # a launched decode step whose tokens are not read yet
        self._seed_rng = random.Random(config.seed)
        self._ids: set[str] = set()

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in the engine; ids must be unique")
        text, ids = tokenize_prompt(self.tokenizer, prompt, self.spec.vocab_size, self.max_model_len)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        self._ids.add(request_id)
        self.scheduler.add(Sequence(request_id, text, ids, params, self.config.block_size, seed))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        """Schedule -> launch -> read tokens and postprocess. In steady decoding the host reads step n's tokens
        (detokenizes, checks stops) while the GPU already runs step n + 1 (see _can_pipeline)."""
        t0 = time.perf_counter()
        finished: list[RequestOutput] = []
        if self._pending is not None and not self._can_pipeline():
            finished += self._resolve(self._pending, ())
            self._pending = None
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:  # only sequences whose last token is still unread: read it
            assert self._pending is not None, "scheduler found no work although requests are pending"
            finished += self._resolve(self._pending, ())
            self._pending = None
            return finished
        future = self.runner.launch(seqs, is_prefill)
        for seq in seqs:
            if is_prefill:
                if seq.num_computed_tokens == seq.num_cached_tokens:
                    self.stats.cached_tokens += seq.num_cached_tokens
                self.scheduler.complete_prefill_chunk(seq)
            else:
                seq.num_computed_tokens += 1
        for seq in future.seqs:
            future.idx.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        if self._pending is not None:  # runs while the GPU computes the step just launched
            finished += self._resolve(self._pending, {s.seq_id for s in seqs})
            self._pending = None
        if not is_prefill and self.runner.async_capable:
            self._pending = future
        else:
            finished += self._resolve(future, ())
        st = self.stats
        st.steps += 1
        st.preemptions = self.scheduler.num_preemptions
        dt = time.perf_counter() - t0
        if is_prefill:
            st.prefill_seconds += dt
            st.prompt_tokens += sum(s.num_scheduled_tokens for s in seqs)
        else:
            st.decode_seconds += dt
        return finished

    def _can_pipeline(self) -> bool:
        """Keep the last decode step's tokens unread across the next schedule only when that schedule cannot
        need them: no prefill waiting, a free block for every running sequence (no preemption), no penalties
        (they count the latest token)."""
        s = self.scheduler
        return (not self._pending.is_prefill and not s.waiting
                and s.block_manager.num_free_blocks >= len(s.running)
                and not any(seq.params.has_penalties for seq in s.running))

    def _resolve(self, future: SampledTokens, launched: set[int] | tuple) -> list[RequestOutput]:
        """Read a step's tokens: fill the placeholders, detokenize, check stops, finish sequences. A fault of one
        request (non-finite logits, an exception in its detokenizer or stop check) fails that request alone."""
        done = []
        for seq, idx, token in zip(future.seqs, future.idx, future.result()):
            if seq.is_finished:  # ended by the step before; this token was computed speculatively
                continue
            try:
                if token < 0:
                    raise RequestFailed("non_finite_logits", "the model's logits for this request are not finite "
                                        "(NaN or inf); the checkpoint or the dtype overflows on this prompt: try "
                                        "--dtype float32 or check the weights")
                out = self._advance(seq, idx, token, launched)
            except Exception as e:
                out = self._fail(seq, idx, e)
            if out is not None:
                done.append(out)
        return done

    def _advance(self, seq: Sequence, idx: int, token: int, launched) -> RequestOutput | None:
        self.stats.generated_tokens += 1
        seq.set_token(idx, token)
        bs = self.config.block_size
        if (idx + 1) % bs == 0 and seq.seq_id in launched:
            self.scheduler.block_manager.register_full_block(seq, idx // bs)
        delta = detokenizer.detokenize_step(self.tokenizer, seq, token) if seq.params.detokenize else ""
        seq.output_text += delta
        detokenizer.check_stop(seq, token, self.eos_ids, self.max_model_len, delta, idx + 1)
        if not seq.finish_reason:
            return None
        del seq.token_ids[idx + 1:]  # drop a speculative placeholder after the end
        if seq.params.detokenize and not isinstance(seq.stop_reason, str):
            seq.output_text += detokenizer.flush(self.tokenizer, seq)
        return self._retire(seq)

    def _fail(self, seq: Sequence, idx: int, e: Exception) -> RequestOutput:
        """End one request with an error; its blocks and token slot are freed and every other request goes on."""
        code, message = (e.code, e.message) if isinstance(e, RequestFailed) else \
            ("engine_error", f"serving this request raised {type(e).__name__}: {e}")
        del seq.token_ids[idx:]  # the unread token and any speculative one after it
        seq.finish_reason, seq.stop_reason = "error", None
        return self._retire(seq, code, message)

    def _retire(self, seq: Sequence, error_code: str | None = None, error: str | None = None) -> RequestOutput:
        cached = seq.num_cached_tokens
        if not seq.is_finished:
            self.scheduler.finish(seq)
        self.runner.release(seq)
        self._ids.discard(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            text=seq.output_text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, num_cached_tokens=cached, error_code=error_code, error=error)


class RequestFailed(Exception):
    """One request cannot go on; `code` and `message` reach its RequestOutput (and the job's error record)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message
