"""Structured outputs: grammars compiled by llguidance, one matcher per constrained request, token bitmasks.

Why llguidance: it computes a mask lazily from the grammar's current state (an Earley parser over a lexer built
on demand), so a new grammar costs well under a millisecond to build and there is no per-schema precompute
over the vocabulary; it fills the masks of a batch in parallel on its own threads with the GIL released; and
its wheel has no Python dependencies (xgrammar's pulls in torch and transformers builds of its own choosing).

A grammar is compiled once per distinct content (a hash of its kind and canonical text): the first request
pays, every later one deep-copies the compiled matcher (tens of microseconds). Masks are int32 words, bit
(t & 31) of word t >> 5 set where token t is allowed; the sampling kernel reads them on the GPU.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from flashgen.sampling_params import StructuredOutputsParams

COMPILE_SECONDS = 10.0   # a grammar that takes longer to build is refused (its line fails, the job goes on)
CACHE_ENTRIES = 4096     # compiled grammars kept (least recently used dropped first)
TEMPLATES = 16           # matchers of one grammar that requests are copied from (see _Templates)
COMPILE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


def _llg():
    import llguidance

    return llguidance


def canonical(so: StructuredOutputsParams) -> str:
    """The grammar's identity: its kind and content, JSON with sorted keys (equal schemas hash equal)."""
    v: Any = getattr(so, so.kind)
    if so.kind == "json" and isinstance(v, str):
        v = parse_schema(v)
    return json.dumps([so.kind, v], sort_keys=True, ensure_ascii=False)


def parse_schema(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not valid JSON ({e.msg} at character {e.pos})") from None


def grammar_text(so: StructuredOutputsParams) -> str:
    """llguidance's grammar for the request (ValueError naming the problem where it is malformed)."""
    llg = _llg()
    kind, v = so.kind, getattr(so, so.kind)
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else (parse_schema(v) if isinstance(v, str) else v)
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema is an object (or true/false), not {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(v)
    if kind == "choice":  # Lark string literals take JSON's escapes
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in v))
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return llg.LLMatcher.grammar_from_lark(any_to_lark(v))
    except Exception as e:  # the GBNF reader raises its own errors for malformed GBNF
        raise ValueError(f"the grammar does not parse: {e}") from None


_problems: OrderedDict[str, str] = OrderedDict()
_problems_lock = threading.Lock()


def grammar_problem(so: StructuredOutputsParams) -> str | None:
    """What is wrong with the request's grammar (an invalid schema or regex, an unsupported JSON Schema feature,
    a grammar syntax error), without a tokenizer; None when it is fine. Cached by content."""
    try:
        key = _key(so)
    except ValueError as e:  # JSON text that does not parse
        return str(e)
    with _problems_lock:
        if key in _problems:
            _problems.move_to_end(key)
            return _problems[key] or None
    try:
        is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar_text(so))
        problem = summary(messages[0]) if is_error else ""
    except ValueError as e:
        problem = str(e)
    with _problems_lock:
        _problems[key] = problem
        while len(_problems) > CACHE_ENTRIES:
            _problems.popitem(last=False)
    return problem or None


def summary(message: str) -> str:
    """llguidance's error on one line: without the caret lines and the excerpts of the grammar it built (the
    user never wrote that grammar), keeping the reason (e.g. "error: unclosed character class")."""
    lines = [ln.strip() for ln in message.strip().splitlines()]
    keep = [ln for ln in lines if ln and set(ln) != {"^"} and not re.match(r"^\d+ \|", ln)]
    return " ".join(keep)


def _key(so: StructuredOutputsParams) -> str:
    return hashlib.sha256(canonical(so).encode()).hexdigest()


class Grammars:
    """The engine's compiled grammars, bound to its tokenizer. `matcher(so)` checks the grammar at once (a
    problem is a ValueError) and compiles it on a pool thread (llguidance builds with the GIL released), so a job
    with a different schema on every line compiles them in parallel while the GPU runs; the first sampling that
    needs the matcher waits for it (TokenMasks.fill). Built on the first constrained request (building
    llguidance's tokenizer takes ~0.5 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: set[int]):
        llg = _llg()
        self.vocab_size = vocab_size
        try:
            self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
        except TypeError as e:  # llguidance before 1.7 takes one EOS id, not the model's list of them
            version = getattr(llg, "__version__", "unknown")
            raise RuntimeError(f"structured outputs need llguidance >= 1.7 (installed: {version}; {e}); "
                               "upgrade it: pip install -U 'llguidance>=1.7'") from None
        self._compiled: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="flashgen-grammar")
        self.compile_seconds = 0.0  # summed over the pool's threads
        self.compiles = 0
        self.hits = 0

    def matcher(self, so: StructuredOutputsParams) -> PendingMatcher:
        """The request's matcher, to be resolved when first needed; ValueError saying what is wrong with a grammar
        llguidance refuses (checked without the tokenizer, cached by content)."""
        problem = grammar_problem(so)
        if problem:
            raise ValueError(problem)
        key = _key(so)
        compiled = self._compiled.get(key)
        if compiled is None:
            self.compiles += 1
            compiled = self._compiled[key] = self._pool.submit(self._compile, so)
            while len(self._compiled) > CACHE_ENTRIES:
                self._compiled.popitem(last=False)
        else:
            self.hits += 1
            self._compiled.move_to_end(key)
        return PendingMatcher(compiled)

    def _compile(self, so: StructuredOutputsParams) -> _Templates | str:
        """(On a pool thread.) The compiled grammar's templates, or the problem as a string (cached too)."""
        t0 = time.perf_counter()
        try:
            text = grammar_text(so)
            m = _llg().LLMatcher(self.tokenizer, text, log_level=0)
        except ValueError as e:
            return str(e)
        finally:
            self.compile_seconds += time.perf_counter() - t0
        return summary(m.get_error()) if m.is_error() else _Templates(m, text, self.tokenizer)


class PendingMatcher:
    """A request's matcher while its grammar compiles."""

    def __init__(self, compiled: concurrent.futures.Future):
        self.compiled = compiled

    def resolve(self):
        """The matcher, or a GrammarFailure (a grammar only the tokenizer-bound build refuses, or a build past
        COMPILE_SECONDS: abandoned to its thread, which cannot be interrupted)."""
        try:
            got = self.compiled.result(COMPILE_SECONDS)
        except concurrent.futures.TimeoutError:
            return GrammarFailure(f"compiling the grammar took more than {COMPILE_SECONDS:g} s; simplify it")
        return GrammarFailure(got) if isinstance(got, str) else got.next()


class GrammarFailure:
    """Stands in for the matcher of a request whose grammar could not be built: its mask allows nothing, so its
    first sampling fails it alone (the engine reports `message`)."""

    def __init__(self, message: str):
        self.message = message


class _Templates:
    """One compiled grammar's matchers to copy from. A deep copy shares its template's lexer cache, and the mask
    threads contend for it: with every row of a batch copied from one template, masks took twice as long per token
    on a 16-core host than with a template per row. So up to TEMPLATES are built (each ~1 ms, once per grammar)
    and requests are copied from them in turn."""

    def __init__(self, first, text: str, tokenizer):
        self.pristine, self.text, self.tokenizer = [first], text, tokenizer
        self.turn = 0

    def next(self):
        self.turn += 1
        if len(self.pristine) < TEMPLATES and self.turn > 1:
            self.pristine.append(_llg().LLMatcher(self.tokenizer, self.text, log_level=0))
        return self.pristine[self.turn % len(self.pristine)].deep_copy()


class TokenMasks:
    """Fills the bitmask rows of a step's constrained sequences on llguidance's threads, into pinned host
    memory, and copies them to the device without a host sync."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.words = (vocab_size + 31) // 32
        self.device = device
        self.executor = _llg().LLExecutor()
        self._host = torch.empty(0, self.words, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None
        self.seconds = 0.0
        self.rows = 0

    def fill(self, seqs: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bitmask (M, words) int32, mask_rows (len(seqs),) int32: the bitmask row of each sequence or -1) on
        the device, for the sequences with a matcher that are not finished; (None, None) when there are none."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None and not s.is_finished]
        if not rows:
            return None, None
        t0 = time.perf_counter()
        for i in rows:
            if isinstance(seqs[i].matcher, PendingMatcher):
                seqs[i].matcher = seqs[i].matcher.resolve()
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy out of the pinned buffer is done
        if self._host.shape[0] < len(rows):
            self._host = torch.empty(max(len(rows), 2 * self._host.shape[0]), self.words, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        live = []
        for j, i in enumerate(rows):
            if isinstance(seqs[i].matcher, GrammarFailure):
                self._host[j] = 0  # nothing allowed: the request fails with its grammar's problem
            else:
                live.append((seqs[i].matcher, j))
        if live:
            self.executor.unsafe_compute_mask_ptr(live, self._host.data_ptr(), self.words * 4, self._host.shape[0])
        mask_rows = torch.full((len(seqs),), -1, dtype=torch.int32)
        mask_rows[rows] = torch.arange(len(rows), dtype=torch.int32)
        bitmask = self._host[:len(rows)].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            bitmask = bitmask.clone()  # the CPU "copy" is a view of the reused buffer
        self.seconds += time.perf_counter() - t0
        self.rows += len(rows)
        return bitmask, mask_rows.to(self.device, non_blocking=True)
