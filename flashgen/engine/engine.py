"""Engine.step(): schedule -> launch -> process the previous step's tokens, the whole data path in a few lines."""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import random
import time
from array import array
from collections.abc import Sequence as Ids
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from flashgen.config import EngineConfig
from flashgen.engine import detokenizer
from flashgen.engine.grammar import GrammarFailure, Grammars
from flashgen.engine.launch_gate import LaunchGate, gate_wanted
from flashgen.engine.model_runner import ModelRunner
from flashgen.engine.scheduler import Batch, Scheduler
from flashgen.engine.sequence import Sequence, Status
from flashgen.engine.token_slots import SampledTokens
from flashgen.models.spec import load_spec
from flashgen.outputs import CompletionOutput, RequestOutput
from flashgen.sampling_params import SamplingParams, sample_seed
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

    def account(self, batch: Batch | None, seconds: float, preemptions: int) -> None:
        """One engine step: its wall time goes to prefill or decode (a call that only read tokens: decode)."""
        self.steps += batch is not None
        self.preemptions = preemptions
        if batch is not None and batch.is_prefill:
            self.prefill_seconds += seconds
            self.prompt_tokens += batch.num_tokens
            self.cached_tokens += batch.cached_tokens
        else:
            self.decode_seconds += seconds


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
    ids: Ids[int]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character")
        text, ids = prompt, tok.encode(prompt)
    else:
        text, ids = None, prompt_ids(prompt, vocab_size)
    if not ids:
        raise ValueError("prompt has no tokens; give a non-empty prompt")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {max_model_len} tokens "
                         "and at least one must be left to generate: shorten the prompt")
    return text, ids


def prompt_ids(prompt, vocab_size: int) -> array:
    """A prompt's token ids as an int32 array (what Sequence keeps); ValueError naming the first that is not an
    integer (a float such as 3.7, or a bool, is refused rather than truncated) or not inside the vocabulary. An int32
    array (what a job's prepared lines hold) is checked by NumPy without an int object made per id and returned as
    it is (the Sequence copies it). Plain int lists, what tokenizers and the LLM API give, have their types checked
    by one C-level pass and are copied into the array by another; NumPy then checks the range: on the engine's
    thread, which admits every line of a job."""
    if not (isinstance(prompt, array) and prompt.typecode == "i"):
        ids = prompt if isinstance(prompt, list) else list(prompt)
        if ids and set(map(type, ids)) != {int}:  # NumPy or torch integers, or something that is not a token id
            ids = [_token_id(t) for t in ids]
        try:
            prompt = array("i", ids)
        except OverflowError:  # past int32: outside any vocabulary
            _raise_outside(ids, vocab_size)
    if len(prompt):
        a = np.frombuffer(prompt, dtype=np.int32)
        if a.min() < 0 or a.max() >= vocab_size:
            _raise_outside(prompt, vocab_size)
    return prompt


def _raise_outside(ids, vocab_size: int) -> NoReturn:
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _token_id(t) -> int:
    if not isinstance(t, bool):
        with contextlib.suppress(TypeError):
            return operator.index(t)
    raise ValueError(f"token id {t!r} is not an integer; give token ids as integers")


def check_vocab_ids(params: SamplingParams, vocab_size: int) -> None:
    """ValueError naming the field when logit_bias or allowed_token_ids holds a token id outside the vocabulary."""
    for name, ids in (("logit_bias", list(params.logit_bias or ())), ("allowed_token_ids", params.allowed_token_ids)):
        bad = next((t for t in ids or () if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


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
        self.scheduler.on_copy = self.runner.copy_blocks
        self.stats = EngineStats()
        # threads beside the engine (a job's input preparation) pause at their yield points while a step launches
        self.launch_gate = LaunchGate(gate_wanted(self.runner.device.type))
        self._last: SampledTokens | None = None  # a launched decode step whose tokens are not read yet
        self._seed_rng = random.Random(config.seed)
        self._ids: set[str] = set()
        self._grammars: Grammars | None = None
        self._texts: dict[int, str] = {}
        self._samples: dict[str, list[CompletionOutput | None]] = {}  # request id -> its finished samples
        # request id -> its finished sample 0 (prompt, prompt logprobs) and its prefix-cache hits
        self._first: dict[str, tuple[Sequence, int]] = {}

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in the engine; ids must be unique")
        text, ids = tokenize_prompt(self.tokenizer, prompt, self.spec.vocab_size, self.max_model_len)
        check_vocab_ids(params, self.spec.vocab_size)
        if params.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
            raise ValueError("prompt_logprobs is not supported with tensor_parallel_size > 1 yet; run the job on "
                             "one GPU per engine (--data-parallel) for prompt logprobs")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        # n samples are n sequences of one prompt: sample 0 computes the prompt (and its logprobs, once), the
        # others share its blocks when it is done
        later = dataclasses.replace(params, prompt_logprobs=None) if params.n > 1 else params
        seqs = [Sequence(request_id, text, ids, params if i == 0 else later, self.config.block_size,
                         sample_seed(seed, i), index=i) for i in range(params.n)]
        if params.structured_outputs is not None:
            for seq in seqs:
                seq.matcher = self.grammars().matcher(params.structured_outputs)
        self._ids.add(request_id)
        self._samples[request_id] = [None] * params.n
        if self.config.tensor_parallel_size == 1:  # the others fork from sample 0 (Scheduler._fork); with
            seqs[0].followers = seqs[1:]            # tensor parallelism, where a block copy would have to reach
            seqs = seqs[:1]                         # every rank, they share its full blocks by prefix caching
        for seq in seqs:
            self.scheduler.add(seq)

    def grammars(self) -> Grammars:
        """The compiled-grammar cache, built on the first constrained request."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer.to_json(), self.spec.vocab_size, self.eos_ids)
        return self._grammars

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (waiting, prefilling, decoding, with a step in flight): its blocks and
        token slot are freed and it gives no output."""
        while (seq := self.scheduler.find(request_id)) is not None:
            self.scheduler.abort(seq)
            self.runner.release(seq)
        self._ids.discard(request_id)
        self._samples.pop(request_id, None)
        self._first.pop(request_id, None)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """(len, vocab) float32 logits at every position of `token_ids` (idle engine). The pass writes KV blocks
        0..: the prefix cache forgets what they held."""
        logits = self.runner.prompt_logits(token_ids)
        self.scheduler.forget_cached(-(-len(token_ids) // self.config.block_size))
        return logits

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then process the previous one while the GPU runs it (the overlap loop). The
        last decode step's tokens stay unread across scheduling only when the scheduler can do without them."""
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        if self._last is not None and not self.scheduler.can_run_ahead():
            outputs += self._process(self._last, None)
            self._last = None
        batch = self.scheduler.schedule()
        if batch is None and self._last is not None:
            # nothing could run ahead of the unread tokens (every running sequence at its limit and no room in the
            # cache for the prompts waiting: Scheduler.schedule gives their places to waiting prompts otherwise):
            # read them now and schedule what they free, so the GPU has its next step before the finished
            # outputs go back to the caller (records, new lines)
            outputs += self._process(self._last, None)
            self._last = None
            batch = self.scheduler.schedule()
        with self.launch_gate.launching():
            launched = self.runner.launch(batch) if batch is not None else None
        if batch is not None:
            self.scheduler.commit(batch)
        if self._last is not None:  # the host's share of the last step overlaps the GPU's of this one; the
            # launched step's grammar masks are filled on a thread once every matcher has its token (on_consumed)
            outputs += self._process(self._last, batch, on_consumed=launched and (  # None: nothing launched
                lambda: self.runner.start_masks(launched)))
        current = self.runner.complete(launched) if launched is not None else None  # grammar masks need _last
        self._last = current if current is not None and current.deferrable else None
        if current is not None and self._last is None:
            outputs += self._process(current, None)
        self.stats.account(batch, time.perf_counter() - t0, self.scheduler.num_preemptions)
        return outputs

    def _process(self, tokens: SampledTokens, launched: Batch | None, on_consumed=None) -> list[RequestOutput]:
        """A step's tokens: grammar matchers first (then `on_consumed()`: the next step's masks can be filled
        meanwhile), then detokenize, check stops, finish sequences. A fault of one request (non-finite logits, a
        token its grammar refuses, an exception in its detokenizer or stop check) fails that request alone."""
        done: list[RequestOutput] = []
        for seq, pos, rows in tokens.read_prompt_logprobs():
            # row j is position pos + j + 1's; rows of positions the list already has (a chunk recomputed after a
            # preemption) add nothing twice, and the rest are appended as one block
            new = len(seq.prompt_logprobs) - 1 - pos
            if 0 <= new < len(rows):
                seq.prompt_logprobs.extend_packed(rows[new:], seq.token_ids[pos + new + 1:pos + len(rows) + 1],
                                                  seq.params.prompt_logprobs or 0, self._token_text)
        read = self.scheduler.postprocess(tokens, launched)
        complete = self._consume(read, done)
        if on_consumed is not None:
            on_consumed()
        generated, eos_ids, max_len = 0, self.eos_ids, self.max_model_len
        for seq, idx, token, lp in read:
            if seq.status is Status.FINISHED:  # failed by its grammar above
                continue
            quick = seq.quick_stop
            if quick is None:
                quick = seq.quick_stop = detokenizer.quick_stop(seq, eos_ids, max_len)
            # most tokens of most requests: not a stop id, not the last, no text to build, no logprobs, no grammar
            if 0 <= token and idx + 1 < quick[1] and token not in quick[0] and lp is None and seq.matcher is None:
                generated += 1
                continue
            try:
                if token < 0 and isinstance(seq.matcher, GrammarFailure):
                    raise RequestFailed("invalid_grammar", seq.matcher.message)
                if token < 0 and seq.matcher is not None:
                    raise RequestFailed("no_allowed_token", "no token is both allowed by the output's grammar "
                                        "(and by min_tokens, which holds back EOS) and finite in the model's "
                                        "logits; lower min_tokens or check the schema and the weights")
                if token < 0:
                    raise RequestFailed("non_finite_logits", "the model's logits for this request are not finite "
                                        "(NaN or inf); the checkpoint or the dtype overflows on this prompt: try "
                                        "--dtype float32 or check the weights")
                out = self._advance(seq, idx, token, lp, complete.get(seq.seq_id, False))
            except Exception as e:
                out = self._fail(seq, idx, e)
            if out is not None:
                done.append(out)
        self.stats.generated_tokens += generated
        return done

    def _consume(self, read: list, done: list[RequestOutput]) -> dict[int, bool]:
        """Each constrained row's matcher takes its token: {seq_id: whether its grammar is now complete}. A token
        the grammar refuses fails its request at once (into `done`), so no mask is filled for it. Only this pass
        touches the matchers while the next step's masks may be filled on another thread."""
        complete = {}
        for seq, idx, token, _ in read:
            if token < 0 or seq.matcher is None or isinstance(seq.matcher, GrammarFailure):
                continue
            taken = grammar_takes(seq.matcher, token)
            if isinstance(taken, bool):
                complete[seq.seq_id] = taken
                continue
            out = self._fail(seq, idx, taken)
            if out is not None:
                done.append(out)
        return complete

    def _advance(self, seq: Sequence, idx: int, token: int, lp: list[float] | None,
                 grammar_complete: bool) -> RequestOutput | None:
        """One read token (its grammar's matcher, if any, has taken it: _consume) into its sequence."""
        self.stats.generated_tokens += 1
        if lp is not None:
            seq.logprobs.append_row(lp, token, seq.params.logprobs or 0, self._token_text)
            seq.cumulative_logprob += lp[0]  # the chosen token's logprob (pack_logprobs' first column)
        incremental = detokenizer.incremental(seq.params)  # stop strings are looked for in the text as it grows
        delta = detokenizer.detokenize_step(self.tokenizer, seq, token) if incremental else ""
        seq.output_text += delta
        detokenizer.check_stop(seq, token, self.eos_ids, self.max_model_len, delta, idx + 1)
        if not seq.finish_reason and grammar_complete:
            seq.finish_reason = "stop"  # the grammar is complete: nothing may follow (ignore_eos included)
        if not seq.finish_reason:
            return None
        if incremental and not isinstance(seq.stop_reason, str):
            seq.output_text += detokenizer.flush(self.tokenizer, seq)
        elif seq.params.detokenize and not incremental:  # decoded once, now (detokenizer's docstring)
            seq.output_text = detokenizer.decode_output(self.tokenizer, seq, idx + 1)
        return self._retire(seq, idx + 1)

    def _fail(self, seq: Sequence, idx: int, e: Exception) -> RequestOutput | None:
        """End one request with an error; its blocks and token slot are freed and every other request goes on."""
        code, message = (e.code, e.message) if isinstance(e, RequestFailed) else \
            ("engine_error", f"serving this request raised {type(e).__name__}: {e}")
        seq.finish_reason, seq.stop_reason = "error", None
        if seq.params.detokenize and not detokenizer.incremental(seq.params):  # the tokens before the failure
            try:
                seq.output_text = detokenizer.decode_output(self.tokenizer, seq, idx)
            except Exception:  # noqa: BLE001 - a tokenizer that fails here fails this request's text, not the job
                seq.output_text = ""
        return self._retire(seq, idx, code, message)  # without the unread token and any after it

    def _retire(self, seq: Sequence, num_tokens: int, error_code: str | None = None,
                error: str | None = None) -> RequestOutput | None:
        """Finish one sample; the request's output once its last sample is done."""
        cached = seq.num_cached_tokens  # freeing the blocks resets it
        if not seq.is_finished:
            self.scheduler.finish(seq, num_tokens)
        self.runner.release(seq)
        assert seq.finish_reason is not None  # set by the stop check, or "error" by _fail
        samples = self._samples[seq.request_id]
        want_lp = seq.params.logprobs is not None
        samples[seq.index] = CompletionOutput(
            index=seq.index, text=seq.output_text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, logprobs=seq.logprobs if want_lp else None,
            cumulative_logprob=seq.cumulative_logprob if want_lp else None, error_code=error_code, error=error)
        if seq.index == 0:
            self._first[seq.request_id] = (seq, cached)
        if any(c is None for c in samples):
            return None
        done = [c for c in samples if c is not None]
        first, first_cached = self._first.pop(seq.request_id)
        failed = next((c for c in done if c.error_code is not None), None)
        del self._samples[seq.request_id]
        self._ids.discard(seq.request_id)
        c0 = done[0]
        return RequestOutput(
            request_id=first.request_id, prompt=first.prompt,
            prompt_token_ids=first.token_ids[:first.num_prompt_tokens].tolist(), text=c0.text, token_ids=c0.token_ids,
            finish_reason="error" if failed else c0.finish_reason, stop_reason=c0.stop_reason,
            num_cached_tokens=first_cached, error_code=failed.error_code if failed else None,
            error=failed.error if failed else None, logprobs=c0.logprobs,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
            cumulative_logprob=c0.cumulative_logprob, outputs=done)

    def _token_text(self, token: int) -> str | None:
        """A token's own text (special tokens included), cached: logprobs name up to 21 tokens per position."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text


def grammar_takes(matcher, token: int) -> bool | Exception:
    """A matcher takes a sampled token: whether its grammar is then complete, or what fails the request (a token
    the grammar refuses: grammar_error; an exception from the matcher itself: that exception, reported as the
    request's engine_error)."""
    try:
        if matcher.consume_token(token):
            return bool(matcher.is_stopped())
        return RequestFailed("grammar_error", f"token {token} does not continue the output's grammar: "
                             f"{matcher.get_error()}")
    except Exception as e:
        return e


class RequestFailed(Exception):
    """One request cannot go on; `code` and `message` reach its RequestOutput (and the job's error record)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message
