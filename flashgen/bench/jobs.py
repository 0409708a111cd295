"""`flashgen bench jobs`: realistic JSONL jobs run through the same path as `flashgen generate` (reading, line
parsing, chat template, tokenization, engine, output records), timed as a whole from start-up to the last line
written, next to the job's GPU floor measured in the same run.

The kernel and throughput benchmarks hand token ids to `LLM.generate` after the model is warm; a user's job also
pays for start-up, for JSON, templates and tokenization on the host, and for writing records. This benchmark
writes a JSONL file and runs it through `run_generate` (the function behind `flashgen generate`), so it measures
what a user waits for and says where that time went.

Workloads (deterministic: seeded text, no downloads):

- extract: 20,000 OpenAI-batch chat lines (`/v1/chat/completions`), each a shared ~1,000-token instruction (the
  system message) and a 50-300-token document, at most 64 new tokens, greedy. OpenAI batch lines, not native
  `messages` lines: extraction jobs of this size are what people bring over from the OpenAI Batch API, and the
  batch path (body envelope, chat.completion records) is the heavier of the two on the host, so per-line cost is
  not understated. The other two workloads use native `messages` lines, so both parsers are measured.
- synth: 4,000 short native chat prompts (20-80 tokens) asking for generated text, 512 new tokens, temperature 1.
- summarize: 2,000 native chat lines, each a 2,000-6,000-token report to summarize, 256 new tokens, greedy.

The model is random weights of a real shape (`--shape`, default qwen3-0.6b, `load_format=dummy`) with a real BPE
tokenizer (`--tokenizer DIR`, default the embedded SmolLM2's; the model's vocabulary is resized to it, and a
tokenizer without a chat template gets a ChatML one). The text comes from a seeded generator of English-like prose
(common words, names, figures, dates), made to a target length in the tokenizer's tokens; the measured token
counts of each line's own text are printed and stored, and must lie in the workload's range. Random weights end a
line at a random place, so every line runs with `ignore_eos` (`--ignore-eos`) and generates exactly its max_tokens:
the work is the same from run to run and the floor knows it.

`--lengths spread` gives each line its own max_tokens instead (seeded, uniform from an eighth of the workload's
max_tokens to all of it), as EOS would end real lines at different places: lines then finish a few at a time nearly
every step, where `fixed` (the default) finishes them in waves of max_num_seqs. The targets are measured with
`fixed`; `spread` shows what a job with real stopping points pays for admitting new lines as old ones finish (the
scheduler's admission; docs/design.md, "Continuous batching").

The whole job's wall time (from run_generate's start, model load included) is split into: start-up (job start to
the first engine step, less the input taken meanwhile), input (what input work is left on the job's thread: taking
each prepared line, and waiting for the preparation thread while the engine has nothing to do), admit (the
engine's checks of each request), prefill and decode steps (the engine's own timers, EngineStats), output (records
built, serialized and written) and other (the rest: the run loop, progress, closing files, and this benchmark's
copy of each prompt's token ids for the floor, microseconds a line). The parts are disjoint intervals of the job's
thread, so they sum to at most the wall time. They are measured by a Runner subclass and a thin wrapper of the LLM
that only read the clock: the job code itself runs unchanged. Line reading happens on the job's reader thread, and
JSON parsing, validation, chat template and tokenization on its preparation thread (flashgen.jobs.source.Prepared),
both overlapped with the engine's steps: they are not parts; the preparation thread's busy seconds are reported as
detail.prepare_thread_s (its tokenization runs outside the GIL; the rest of it shares the GIL with the job's
thread).

On a GPU the same steps are also timed on the stream (GpuSteps: CUDA events around each step's launch): the GPU's
time in prefill and in decode steps, and its idle time between steps, when a step had finished before the host
queued the next (by transition: after a prefill or a decode step, before which kind; and the longest gap), and the
host's own time inside those launches (packing, queuing kernels and sampling), and how many launches were still
running when the GPU reached their step (the host's and the stream's clocks put on one timeline): there the GPU
ran the step at the host's pace. Set against the steps' wall times above, they say whether a kind of step waits
on the GPU or on the host. Decode graphs
captured during the job (the first step of a group bucket or of short contexts) are counted with their host time,
which falls inside that step's GPU span.

The floor is bench/throughput.py's (weights plus live distinct KV per decode step over the copy bandwidth, prefill
FLOPs of the distinct prompt tokens over the matmul rate, a shared prefix counted once) on the prompts exactly as
the job tokenized them, at the engine's limits (lines admitted in order into its max_num_seqs slots and its KV
cache, as floor_from_lengths says), with ceilings measured in the same run. `--scale F` (e.g. 0.01) shrinks the
line counts for smoke runs. Output: `jobs_WORKLOAD.json` in `--out-dir`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class JobWorkload:
    name: str
    lines: int                         # at --scale 1
    max_tokens: int
    temperature: float
    text_tokens: tuple[int, int]       # each line's own text (document or prompt), in the tokenizer's tokens
    instruction_tokens: int = 0        # a shared system message of about this many tokens (0: none)
    batch_format: bool = False         # OpenAI batch lines (else native "messages" lines)
    task: str = ""                     # the words before each line's text


WORKLOADS = {
    "extract": JobWorkload("extract", 20_000, 64, 0.0, (50, 300), instruction_tokens=1000, batch_format=True),
    "synth": JobWorkload("synth", 4_000, 512, 1.0, (20, 80)),
    "summarize": JobWorkload("summarize", 2_000, 256, 0.0, (2_000, 6_000),
                             task="Summarize the following report in one paragraph for a busy reader.\n\n"),
}
INSTRUCTION_SLACK = 0.05  # the instruction lies within 5% of its target length
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---- seeded English-like text --------------------------------------------------------------------------------------

_DET = "the the the a a this that each every one another their its our".split()
_ADJ = ("annual regional new final early late large small quarterly local central total recent main public private "
        "initial revised overall former current major minor key strong weak steady modest sharp gradual").split()
_NOUN = ("report company market team customer order invoice shipment payment contract supplier price cost revenue "
         "budget plan project survey board committee region office store product service system network policy "
         "review agreement account balance delivery schedule warehouse factory partner client vendor audit "
         "quarter forecast inventory demand margin loan rate share council hospital school program").split()
_VERB = ("reported approved reviewed delivered reduced increased signed received expected announced recorded "
         "confirmed delayed completed updated extended replaced opened closed managed raised lowered estimated "
         "published shipped requested rejected accepted finished").split()
_PREP = "in for with from by after before during under across about near".split()
_UNIT = "percent units customers orders hours days tonnes employees sites accounts".split()
_MONTH = ("January February March April May June July August September October November December").split()
_SYL = "al bar cor dan el fen gar hol is jor kel lin mor nor ol par quin ros sel tor ul ver wen yar zel".split()
_END = ["", "a", "on", "ia", "ton", "wick", "ford", "ley"]
_ORG = "Group Holdings Logistics Labs Partners Systems Foods Energy Health Bank".split()
_CONJ = [",", "and"], [",", "while"], [";", "however", ","], [",", "but"], [",", "so"]
_SLOTS = {"D": _DET, "A": _ADJ, "N": _NOUN, "V": _VERB, "P": _PREP, "U": _UNIT, "M": _MONTH}
# D determiner, A adjective, N noun, V verb, P preposition, U unit, M month, Y year, O organisation, C place,
# F figure, $ amount; anything else is itself
_TEMPLATES = ["D A N V D N P D N", "P M Y , O V F U P D A N", "D N P O V to F U", "O , D A N P C , V D N",
              "D N V A , and D N V F U", "D A N P C V $ P M", "O V D N P D A N", "D N V by F percent P M Y"]
_TASKS = ["Write a short story based on these notes:", "Write a product description from these notes:",
          "Write a news article from these notes:", "Write a friendly email to a customer about these notes:",
          "Write a blog post from these notes:", "Write a dialogue between two managers about these notes:",
          "Write a poem inspired by these notes:", "Write a detailed explanation of these notes:"]


class Prose:
    """Seeded English-like prose, counted in tokens of one tokenizer as it is made. Text is a list of pieces,
    each a word with its leading space or a punctuation mark, which a BPE pre-tokenizer keeps apart: the sum of
    the pieces' token counts is the text's (the caller measures the result anyway)."""

    def __init__(self, rng: random.Random, encode: Callable[[str], list[int]]):
        self.rng = rng
        self.encode = encode
        self._n: dict[str, int] = {}

    def count(self, piece: str) -> int:
        n = self._n.get(piece)
        if n is None:
            n = self._n[piece] = len(self.encode(piece))
        return n

    def _name(self) -> str:
        r = self.rng
        return "".join(r.choice(_SYL) for _ in range(r.randint(2, 3))).capitalize() + r.choice(_END)

    def _figure(self) -> str:
        r = self.rng
        k = r.random()
        if k < 0.4:
            return str(r.randint(2, 999))
        if k < 0.7:
            return f"{r.randint(1, 99)}.{r.randint(0, 9)}"
        return f"{r.randint(1, 99)},{r.randint(0, 999):03d}"

    def sentence(self) -> list[str]:
        r = self.rng
        words: list[str] = []
        for k in range(1 if r.random() < 0.6 else 2):
            if k:
                words += r.choice(_CONJ)
            for slot in r.choice(_TEMPLATES).split():
                pool = _SLOTS.get(slot)
                if pool is not None:
                    words.append(r.choice(pool))
                elif slot == "O":
                    words.append(f"{self._name()} {r.choice(_ORG)}")
                elif slot == "C":
                    words.append(self._name())
                elif slot == "F":
                    words.append(self._figure())
                elif slot == "Y":
                    words.append(str(r.randint(2015, 2025)))
                elif slot == "$":
                    words.append("$" + self._figure())
                else:
                    words.append(slot)
        words[0] = words[0][:1].upper() + words[0][1:]
        pieces = []
        for word in words:
            if word in (",", ";"):
                pieces.append(word)
            else:  # a name of two words is two pieces
                pieces += [" " + x for x in word.split(" ")]
        return pieces + ["."]

    def pieces(self, tokens: int, limit: int, paragraph: int = 0) -> tuple[list[str], int]:
        """Whole sentences until at least `tokens`, then cut back to at most `limit` (a cut sentence ends with a
        full stop); a blank line every `paragraph` sentences (0: one paragraph)."""
        out: list[str] = []
        n = k = 0
        while n < tokens:
            sentence = self.sentence()
            if paragraph and k and k % paragraph == 0:
                out.append("\n\n")
                n += self.count("\n\n")
                sentence[0] = sentence[0].lstrip(" ")
            for p in sentence:
                out.append(p)
                n += self.count(p)
            k += 1
        while n > limit - 1 or (out and out[-1] in ("\n\n", ",", ";")):
            n -= self.count(out.pop())
        if out and out[-1] != ".":
            out.append(".")
            n += 1
        return out, n

    def text(self, tokens: int, limit: int, paragraph: int = 0) -> str:
        return "".join(self.pieces(tokens, limit, paragraph)[0]).lstrip(" ")


# ---- the JSONL input -----------------------------------------------------------------------------------------------

def scaled_lines(w: JobWorkload, scale: float) -> int:
    return max(1, round(w.lines * scale))


def make_texts(w: JobWorkload, n: int, encode: Callable[[str], list[int]],
               measure: Callable[[list[str]], list[int]], seed: int = 0) -> tuple[str, list[str], list[int]]:
    """(the shared instruction or "", each line's own text, its length in tokens), every text measured with
    `measure` and inside the workload's range (a text that fell outside is made again at another length)."""
    rng = random.Random(seed)
    prose = Prose(rng, encode)
    instruction = ""
    if w.instruction_tokens:
        lo, hi = (round(w.instruction_tokens * (1 - s)) for s in (INSTRUCTION_SLACK, -INSTRUCTION_SLACK))
        head = ("You are an information extraction system. Read the document in the user message and answer with "
                "one JSON object with the fields vendor, date, total, currency, invoice_id and summary. Use null "
                "for a field the document does not state. Follow these rules and examples.\n\n")
        body = prose.text(w.instruction_tokens - len(encode(head)), hi - len(encode(head)) - 8, paragraph=4)
        instruction = head + body
        got = len(encode(instruction))
        if not lo <= got <= hi:
            raise AssertionError(f"the instruction has {got} tokens, outside [{lo}, {hi}]")
    lo, hi = w.text_tokens
    task_tokens = [len(encode(t + " ")) for t in _TASKS]

    def one(i: int) -> str:
        target = rng.randint(lo, hi)
        if w.name == "synth":
            t = i % len(_TASKS)
            return _TASKS[t] + " " + prose.text(max(1, target - task_tokens[t]), hi - task_tokens[t])
        return prose.text(target, hi, paragraph=6 if hi > 1000 else 0)

    texts = [one(i) for i in range(n)]
    counts = measure(texts)
    for _ in range(10):  # the pieces' sum is exact for BPE tokenizers that split words from punctuation
        bad = [i for i, c in enumerate(counts) if not lo <= c <= hi]
        if not bad:
            return instruction, texts, counts
        again = [one(i) for i in bad]
        for i, text, c in zip(bad, again, measure(again), strict=True):
            texts[i], counts[i] = text, c
    raise AssertionError(f"{len(bad)} texts of {w.name} stay outside [{lo}, {hi}] tokens with this tokenizer")


LENGTHS = ("fixed", "spread")


def output_lengths(w: JobWorkload, n: int, lengths: str = "fixed", seed: int = 1) -> list[int]:
    """Each line's max_tokens: the workload's (`fixed`), or seeded and uniform in [max_tokens / 8, max_tokens]
    (`spread`: where EOS would end real lines, every line still generating exactly its own max_tokens)."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths {lengths!r} is unknown; use one of {', '.join(LENGTHS)}")
    if lengths == "fixed":
        return [w.max_tokens] * n
    rng = random.Random(seed)
    return [rng.randint(max(1, w.max_tokens // 8), w.max_tokens) for _ in range(n)]


def line_of(w: JobWorkload, i: int, instruction: str, text: str, max_tokens: int | None = None) -> dict:
    """Line i of the job; `max_tokens` other than the workload's goes into the line (its own limit)."""
    own = {} if max_tokens is None or max_tokens == w.max_tokens else {"max_tokens": max_tokens}
    if w.batch_format:
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
        return {"custom_id": f"{w.name}-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "bench", "messages": messages, "max_tokens": max_tokens or w.max_tokens}}
    return {"id": f"{w.name}-{i:06d}", "messages": [{"role": "user", "content": w.task + text}], **own}


def write_input(path: Path, w: JobWorkload, instruction: str, texts: list[str],
                max_tokens: list[int] | None = None) -> int:
    """The JSONL file (line i limited to max_tokens[i] when given); returns its size in bytes."""
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            line = line_of(w, i, instruction, text, max_tokens[i] if max_tokens is not None else None)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path.stat().st_size


# ---- timing the job ------------------------------------------------------------------------------------------------

class JobClock:
    """Seconds of each part of one job on the job's thread; every interval is disjoint from the others."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.ready = 0.0            # the Runner made: model loaded, parser and writer ready
        self.first_step = 0.0       # the first engine step began
        self.input = self.admit = self.steps = self.output = 0.0
        self.before_first_step = 0.0  # input + admit seconds spent before the first step
        self.prepare_thread_s = 0.0   # the preparation thread's busy seconds (not the job's thread: not a part)
        self.worker_groups = (0, 0)   # (processes building lines for it, groups they built)
        self.first_step_s = 0.0
        self.prompts: list[array] = []  # each request's prompt token ids, as the engine got them
        self.llm: Any = None
        self.gpu_steps: GpuSteps | None = None

    def add(self, part: str, seconds: float) -> None:
        setattr(self, part, getattr(self, part) + seconds)
        if part in ("input", "admit") and not self.first_step:
            self.before_first_step += seconds


# torch.cuda.memory_stats' counters of calls that wait for the GPU: device allocations (cudaMalloc), device frees,
# retries after a failed allocation (every cached block freed), syncs of all streams (before freeing cached blocks)
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


class GpuSteps:
    """CUDA events around each engine step's launch (what the step queues on the stream: graph inputs, kernels,
    sampling), read once the job is done: per step kind, the GPU's span of the steps (from the stream reaching a
    step to finishing it: an eagerly launched step's gaps between kernels included), and the GPU's idle time between
    steps (a step finished before the host had queued the next one).

    The host's clock and the stream's are put on one timeline by an event recorded on the idle stream when this is
    made, next to the host's clock: so each launch can be set against the GPU's progress. A launch still running
    when the GPU reached its step (the step's first event) means the GPU ran that step at the pace the host queued
    its kernels, or waited for the launch to end: its span then measures the host as much as the GPU.

    The caching allocator's counters over the job (ALLOCATOR_COUNTERS, from `memory_stats`) say whether a step's
    host time went to the device allocator: a cudaMalloc or cudaFree, or a retry (which frees the cached blocks
    after synchronizing every stream), waits for the GPU's queued work."""

    def __init__(self, runner, event: Callable[[], Any] = lambda: torch.cuda.Event(enable_timing=True),
                 synchronize: Callable[[], None] = torch.cuda.synchronize,
                 clock: Callable[[], float] = time.perf_counter,
                 memory_stats: Callable[[], dict] = torch.cuda.memory_stats):
        # (prefill, rows, start event, end event, host clock at the launch's start, and at its end)
        self.steps: list[tuple[bool, int, Any, Any, float, float]] = []
        self._sync = synchronize
        self._memory_stats = memory_stats
        synchronize()
        self._alloc0 = self._allocator()
        self._origin = event()
        self._origin.record()
        self._origin_host = clock()
        launch = runner.launch

        def timed_launch(batch):
            t = clock()
            a = event()
            a.record()
            out = launch(batch)
            b = event()
            b.record()
            self.steps.append((batch.is_prefill, len(batch.seqs), a, b, t, clock()))
            return out

        runner.launch = timed_launch

    def _allocator(self) -> dict[str, int]:
        stats = self._memory_stats()
        return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}

    def summary(self) -> dict:
        """Per step kind: steps, GPU seconds, rows, the host's seconds inside the launches (the engine's thread
        packing the step, queuing its kernels and sampling: where it is near the GPU seconds, the steps wait on
        the host), and the launches still running when the GPU reached their step (how many, and the host's
        seconds in them from that moment on); the idle seconds between steps, in all and by transition
        ("decode>prefill": a prefill step that found the GPU idle after a decode step; seconds and how many such
        gaps), and the longest gap."""
        self._sync()
        out = {k: {"steps": 0, "gpu_s": 0.0, "rows": 0, "host_launch_s": 0.0, "late_launches": 0,
                   "late_launch_s": 0.0} for k in ("prefill", "decode")}
        idle, longest = 0.0, 0.0
        by: dict[str, dict[str, float]] = {}
        for i, (prefill, rows, a, b, start, end) in enumerate(self.steps):
            o = out["prefill" if prefill else "decode"]
            o["steps"] += 1
            o["rows"] += rows
            o["gpu_s"] += a.elapsed_time(b) / 1e3
            o["host_launch_s"] += end - start
            reached = self._origin_host + self._origin.elapsed_time(a) / 1e3  # on the host's clock
            if end > reached:
                o["late_launches"] += 1
                o["late_launch_s"] += end - reached
            gap = max(0.0, self.steps[i - 1][3].elapsed_time(a) / 1e3) if i else 0.0
            if gap > 0:
                idle += gap
                longest = max(longest, gap)
                kind = f"{'prefill' if self.steps[i - 1][0] else 'decode'}>{'prefill' if prefill else 'decode'}"
                t = by.setdefault(kind, {"s": 0.0, "gaps": 0})
                t["s"] += gap
                t["gaps"] += 1
        alloc = {k: v - self._alloc0[k] for k, v in self._allocator().items()}
        return {**out, "idle_between_steps_s": idle, "idle_by_transition": by, "longest_idle_s": longest,
                "allocator": alloc}


def _runner(llm) -> Any:
    """The LLM's model runner, or None where it has no single one (data parallel)."""
    return getattr(getattr(llm, "engine", None), "runner", None)


class _TimedLLM:
    """The job's LLM, unchanged, with a clock on add_request and step (and on a CUDA device, GpuSteps)."""

    def __init__(self, llm, clock: JobClock):
        self._llm, self._clock = llm, clock
        clock.llm = llm
        runner = _runner(llm)
        if runner is not None and getattr(runner, "device", torch.device("cpu")).type == "cuda":
            clock.gpu_steps = GpuSteps(runner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def add_request(self, request_id, prompt, params=None) -> None:
        t = time.perf_counter()
        try:
            self._llm.add_request(request_id, prompt, params)
        finally:
            self._clock.add("admit", time.perf_counter() - t)
        self._clock.prompts.append(array("i", prompt))

    def step(self):
        c = self._clock
        t = time.perf_counter()
        if not c.first_step:
            c.first_step = t
        try:
            return self._llm.step()
        finally:
            dt = time.perf_counter() - t
            c.steps += dt
            if not c.first_step_s:
                c.first_step_s = dt


@contextlib.contextmanager
def instrumented(clock: JobClock) -> Iterator[None]:
    """run_generate with its Runner timed: the job's own classes, with a clock around taking input, admitting,
    steps and records on the job's thread. Restored on exit."""
    from flashgen.jobs import generate
    from flashgen.jobs.runner import Runner

    class TimedRunner(Runner):
        def __init__(self, llm, parser, *args, **kw):
            clock.ready = time.perf_counter()
            super().__init__(_TimedLLM(llm, clock), parser, *args, **kw)

        def _take(self, wait: bool) -> object:
            t = time.perf_counter()
            try:
                return super()._take(wait)
            finally:
                clock.add("input", time.perf_counter() - t)

        def run(self, *args, **kw) -> str:
            try:
                return super().run(*args, **kw)
            finally:
                if self.prepared is not None:
                    clock.prepare_thread_s = self.prepared.busy_s
                    clock.worker_groups = (self.prepare_workers, self.pool_groups)

        def _finish(self, out) -> None:
            t = time.perf_counter()
            try:
                super()._finish(out)
            finally:
                clock.add("output", time.perf_counter() - t)

    old = generate.Runner
    generate.Runner = TimedRunner  # type: ignore[misc]
    try:
        yield
    finally:
        generate.Runner = old  # type: ignore[misc]


def distinct_tokens(prompts: list[array]) -> int:
    """Nodes of the prompts' prefix trie (throughput.distinct_prefix_tokens) without building it: the total
    length less the common prefix of each prompt with the one before it in sorted order."""
    import numpy as np

    order = sorted(prompts)
    shared = 0
    for a, b in zip(order, order[1:], strict=False):
        n = min(len(a), len(b))
        diff = np.flatnonzero(np.frombuffer(a, np.int32, n) != np.frombuffer(b, np.int32, n))
        shared += int(diff[0]) if diff.size else n
    return sum(map(len, prompts)) - shared


def breakdown(wall: float, clock: JobClock, prefill_s: float, decode_s: float) -> dict[str, float]:
    """The job's wall time in disjoint parts (see the module docstring); `other` is what is left."""
    startup = (clock.first_step or clock.t0 + wall) - clock.t0 - clock.before_first_step
    parts = {"startup_s": startup, "input_s": clock.input, "admit_s": clock.admit,
             "prefill_s": prefill_s, "decode_s": decode_s,
             "step_other_s": max(0.0, clock.steps - prefill_s - decode_s), "output_s": clock.output}
    parts["other_s"] = wall - sum(parts.values())
    return parts


def job_floor(spec, prompt_lens: list[int], distinct: int, max_tokens: int | list[int], ceil: dict,
              max_seqs: int | None = None, kv_capacity: int | None = None, **engine_kw) -> float:
    """throughput.floor_seconds of the job's prompts as the engine got them (template included), each generating
    exactly max_tokens (one for all, or each line's), with the engine's weight and KV-cache dtypes, at its limits
    (sequence slots, KV tokens)."""
    from flashgen.bench.throughput import floor_from_lengths, weight_bytes_of
    from flashgen.models.spec import kv_dtype_of

    kv_dtype = kv_dtype_of(engine_kw.get("kv_cache_dtype"), torch.bfloat16)
    outs = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompt_lens)
    return floor_from_lengths(prompt_lens, outs, distinct, spec,
                              weight_bytes_of(spec, engine_kw.get("quantization") == "fp8"), ceil, kv_dtype,
                              max_seqs, kv_capacity)


def _piece_hits(llm) -> dict[str, int]:
    """The job's tokenizer's piece-cache hits (flashgen.tokenizer.PieceCache), where it has one: on the job's own
    preparation thread (each preparation worker keeps its own cache, not counted here)."""
    cache = getattr(getattr(llm, "tokenizer", None), "piece_cache", None)
    return {"piece_hits": cache.hits, "piece_chars": cache.hit_chars} if cache is not None else {}


def _stats(xs: list[int]) -> dict:
    return {"min": min(xs), "mean": round(statistics.fmean(xs), 1), "max": max(xs), "total": sum(xs)}


def check_records(path: Path, w: JobWorkload, n: int, max_tokens: list[int] | None = None) -> dict:
    """Every line's record: how many, how many are results, how many generated exactly their max_tokens (the
    workload's, or max_tokens[i] for line i)."""
    recs = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines()]
    key = "custom_id" if w.batch_format else "id"
    want = {f"{w.name}-{i:06d}" for i in range(n)}
    ok = exact = 0
    for r in recs:
        if r.get("error") is not None or r.get(key) not in want:
            continue
        ok += 1
        usage = r["response"]["body"]["usage"] if w.batch_format else r["usage"]
        i = int(r[key].rsplit("-", 1)[1])
        exact += usage["completion_tokens"] == (max_tokens[i] if max_tokens is not None else w.max_tokens)
    return {"records": len(recs), "result_records": ok, "exact_length_records": exact,
            "distinct_ids": len({r.get(key) for r in recs} & want)}


def _model_dir(d: str, tokenizer_dir: Path, shape: str) -> Path:
    from flashgen.bench.structured import model_dir
    from flashgen.tokenizer import Tokenizer

    mdir = model_dir(d, tokenizer_dir, shape)
    if not Tokenizer(mdir).chat_template:  # messages lines need one
        cfg_path = mdir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg_path.write_text(json.dumps({**cfg, "chat_template": CHATML}))
    return mdir


def random_llm(d: str, tokenizer_dir: str | Path, shape: str, cpu: bool = False, **engine_kw):
    """(model directory, LLM) of `shape` with random weights and `tokenizer_dir`'s tokenizer, written under `d`: the
    probes' model (bfloat16 on the GPU; cpu: float32 on the CPU, for smoke runs of a probe)."""
    from flashgen import LLM

    mdir = _model_dir(str(Path(d) / "model"), Path(tokenizer_dir), shape)
    kw = {"device": "cpu", **engine_kw} if cpu else engine_kw
    return mdir, LLM(model=str(mdir), load_format="dummy", dtype="float32" if cpu else "bfloat16", **kw)


def main(workload: str = "extract", scale: float = 1.0, tokenizer: str | None = None, out_dir: str | None = None,
         shape: str = "qwen3-0.6b", lengths: str = "fixed", prepare_workers: str = "auto", **engine_kw) -> dict:
    """Run one workload, print its report and return it; `lengths`: every line's max_tokens the workload's, or
    spread (output_lengths); `engine_kw`: EngineConfig's options (device="cpu" runs it on the CPU, without a
    floor: smoke runs); `prepare_workers`: the job's [job] prepare_workers."""
    from tokenizers import Tokenizer as HFTokenizer

    from flashgen.bench.throughput import measure_ceilings
    from flashgen.jobs.generate import run_generate
    from flashgen.models.spec import load_spec
    from flashgen.tokenizer import job_tokenizer_threads

    job_tokenizer_threads()  # the job's pool, as flashgen generate has it: before the texts are made

    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} is unknown; use one of {', '.join(WORKLOADS)}")
    if not scale > 0:
        raise ValueError(f"scale {scale} must be > 0 (1 = the full workload, 0.01 = a smoke run)")
    on_cpu = engine_kw.get("device") == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        raise RuntimeError("flashgen bench jobs needs a CUDA GPU (device='cpu' runs it on the CPU, without a floor)")
    if tokenizer is None:
        from flashgen.models.default_model import DEFAULT_MODEL, resolve_model

        tokenizer = resolve_model(DEFAULT_MODEL)
    engine_kw.setdefault("dtype", "float32" if on_cpu else "bfloat16")
    w = WORKLOADS[workload]
    n = scaled_lines(w, scale)
    outs = output_lengths(w, n, lengths)
    device = "cpu" if on_cpu else torch.cuda.get_device_name()
    ceil = None if on_cpu else measure_ceilings()
    if not on_cpu:
        torch.cuda.empty_cache()
    res: dict[str, Any] = {"workload": workload, "device": device, "shape": shape, "scale": scale, "lines": n,
                           "format": "openai_batch" if w.batch_format else "messages", "max_tokens": w.max_tokens,
                           "temperature": w.temperature, "ignore_eos": True, "lengths": lengths,
                           "line_max_tokens": _stats(outs)}
    with tempfile.TemporaryDirectory() as d:
        mdir = _model_dir(str(Path(d) / "model"), Path(tokenizer), shape)
        hf = HFTokenizer.from_file(str(mdir / "tokenizer.json"))
        res["vocab_size"] = hf.get_vocab_size(with_added_tokens=True)

        def encode(s: str) -> list[int]:
            return hf.encode(s, add_special_tokens=False).ids

        def measure(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False)]

        t = time.perf_counter()
        instruction, texts, text_tokens = make_texts(w, n, encode, measure)
        src, out, stats_path = Path(d) / "in.jsonl", Path(d) / "out.jsonl", Path(d) / "stats.json"
        res["input_bytes"] = write_input(src, w, instruction, texts, outs)
        res["make_input_s"] = time.perf_counter() - t
        res["instruction_tokens"] = len(encode(instruction)) if instruction else 0
        res["text_tokens"] = {**_stats(text_tokens), "range": list(w.text_tokens)}
        del texts
        flags = {"engine": {"model": str(mdir), "load_format": "dummy", **engine_kw},
                 "sampling": {"max_tokens": w.max_tokens, "temperature": w.temperature, "ignore_eos": True},
                 "job": {"quiet": True, "progress": "off", "stats_json": str(stats_path),
                         "prepare_workers": prepare_workers}}
        clock = JobClock()
        old_cwd = os.getcwd()
        os.chdir(d)  # the job's own directory: no ./flashgen.toml of the caller's applies
        try:
            with instrumented(clock):
                clock.t0 = time.perf_counter()
                code = run_generate(str(src), str(out), None, flags, overwrite=True)
                wall = time.perf_counter() - clock.t0
        finally:
            os.chdir(old_cwd)
        job = json.loads(stats_path.read_text())
        if code != 0:
            raise RuntimeError(f"the job exited with {code}: {job}")
        llm, clock.llm = clock.llm, None
        engine = llm.stats
        res["gpu_steps"] = clock.gpu_steps.summary() if clock.gpu_steps is not None else None
        graphs = getattr(_runner(llm), "graphs", None)
        if graphs is not None:  # captured the first time a step needed them: their time is inside the steps'
            res["graphs_captured_during_job"] = {"count": graphs.late_captures, "s": graphs.late_capture_s}
        res.update(check_records(out, w, n, outs))
        prompt_lens = [len(p) for p in clock.prompts]
        res["prompt_tokens"] = _stats(prompt_lens)
        res["distinct_prompt_tokens"] = distinct_tokens(clock.prompts)
        res["output_tokens"] = job["completion_tokens"]
        res.update(wall_s=wall, tok_per_s=job["completion_tokens"] / wall,
                   breakdown=breakdown(wall, clock, job["prefill_seconds"], job["decode_seconds"]),
                   detail={"model_load_s": clock.ready - clock.t0, "prepare_thread_s": clock.prepare_thread_s,
                           "prepare_workers": clock.worker_groups[0], "worker_groups": clock.worker_groups[1],
                           "first_step_s": clock.first_step_s, "steps": engine.steps,
                           "prompt_tokens_computed": engine.prompt_tokens, "cached_tokens": engine.cached_tokens,
                           "preemptions": engine.preemptions, **_piece_hits(llm)},
                   job=job)
        res["floor_s"] = res["pct_of_floor"] = None
        if ceil is not None:
            runner = _runner(llm)
            limits = {"max_seqs": llm.config.max_num_seqs,
                      "kv_capacity": runner.num_blocks * runner.block_size if runner is not None else None}
            floor = job_floor(load_spec(mdir), prompt_lens, res["distinct_prompt_tokens"], outs, ceil,
                              **limits, **engine_kw)
            res.update(ceil, floor_s=floor, pct_of_floor=100 * floor / wall, floor_limits=limits)
        llm.close()
        del llm, clock
    print(report(res), flush=True)
    if out_dir:
        with open(f"{out_dir}/jobs_{workload}.json", "w") as f:
            json.dump(res, f, indent=1)
    return res


LABELS = {"startup_s": "start-up", "input_s": "input (left on the job's thread)", "admit_s": "admit",
          "prefill_s": "prefill steps", "decode_s": "decode steps", "step_other_s": "steps, other",
          "output_s": "output", "other_s": "other"}


def report(res: dict) -> str:
    b, tt, pt = res["breakdown"], res["text_tokens"], res["prompt_tokens"]
    wall = res["wall_s"]
    lt = res.get("line_max_tokens")
    gen = (f"exactly {res['max_tokens']} tokens" if res.get("lengths", "fixed") == "fixed" or lt is None else
           f"exactly its own max_tokens, {lt['min']}-{lt['max']} (mean {lt['mean']:.0f})")
    what = "OpenAI batch chat lines" if res["format"] == "openai_batch" else "native messages lines"
    instr = f"a shared {res['instruction_tokens']:,}-token instruction + " if res["instruction_tokens"] else ""
    lines = [
        f"workload {res['workload']} on {res['device']} ({res['shape']} shape, random weights, vocab "
        f"{res['vocab_size']:,}; {res['lines']:,} {what}; ignore_eos: every line generates {gen})",
        f"  tokens per line: {instr}text min {tt['min']:,} / mean {tt['mean']:,.0f} / max {tt['max']:,} "
        f"(range {tt['range'][0]:,}-{tt['range'][1]:,}); prompt as tokenized (template included) min {pt['min']:,} "
        f"/ mean {pt['mean']:,.0f} / max {pt['max']:,}; {res['detail']['cached_tokens']:,} prompt tokens from the "
        "prefix cache",
    ]
    if res["floor_s"] is not None:
        lines.append(f"  copy {res['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                     f"{res['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    floor = (f"floor {res['floor_s']:.2f} s -> {res['pct_of_floor']:.0f}% of floor" if res["floor_s"] is not None
             else "floor n/a (no GPU ceilings)")
    lines += [
        f"  whole job {wall:.2f} s, start-up included: {res['output_tokens']:,} output tokens, "
        f"{res['tok_per_s']:,.0f} tok/s; {res['result_records']:,}/{res['lines']:,} result records; {floor}",
        "  " + " | ".join(f"{LABELS[k]} {v:.2f} s ({100 * v / wall:.0f}%)" for k, v in b.items()),
        f"  input prepared on its own thread, overlapped: {res['detail'].get('prepare_thread_s', 0.0):.2f} s busy"
        + (f"; {res['detail']['worker_groups']:,} groups of lines built by {res['detail']['prepare_workers']} worker "
           "processes" if res["detail"].get("prepare_workers") else "")
        + (f"; {res['detail']['piece_hits']:,} prompt pieces ({res['detail']['piece_chars']:,} characters) "
           "tokenized once and reused" if res["detail"].get("piece_hits") else ""),
    ]
    g = res.get("gpu_steps")
    if g:
        lines += report_lines_gpu(g, res.get("graphs_captured_during_job"))
    return "\n".join(lines)


def report_lines_gpu(g: dict, late: dict | None) -> list[str]:
    """The report's lines on the GPU's time (GpuSteps.summary): its steps, the idle time between them by
    transition, and the decode graphs captured during the job (`late`: count and seconds, or None)."""
    p, d = g["prefill"], g["decode"]
    lines = [f"  on the GPU: {p['steps']:,} prefill steps {p['gpu_s']:.2f} s, {d['steps']:,} decode steps "
             f"{d['gpu_s']:.2f} s (mean batch {d['rows'] / max(1, d['steps']):.0f}, "
             f"{1e3 * d['gpu_s'] / max(1, d['steps']):.2f} ms each); idle between steps "
             f"{g['idle_between_steps_s']:.2f} s"]
    by = g.get("idle_by_transition") or {}
    if by:
        lines.append("  idle by transition: " + ", ".join(
            f"{k} {v['s']:.2f} s over {int(v['gaps']):,} gaps" for k, v in sorted(by.items()))
            + f"; the longest {1e3 * g['longest_idle_s']:.1f} ms")
    if late:
        lines.append(f"  decode graphs captured during the job (inside its steps): {late['count']:,}, "
                     f"{late['s']:.2f} s")
    if "host_launch_s" in d:
        lines.append(f"  host time inside the launches: prefill {p['host_launch_s']:.2f} s, decode "
                     f"{d['host_launch_s']:.2f} s ({1e3 * d['host_launch_s'] / max(1, d['steps']):.2f} ms a step)")
    if "late_launches" in d:
        lines.append(f"  launches still running when the GPU reached their step: prefill {p['late_launches']:,} of "
                     f"{p['steps']:,} ({p['late_launch_s']:.2f} s of host time after it), decode "
                     f"{d['late_launches']:,} of {d['steps']:,} ({d['late_launch_s']:.2f} s)")
    a = g.get("allocator")
    if a is not None:
        lines.append(f"  the caching allocator during the job: {a['num_device_alloc']:,} device allocations, "
                     f"{a['num_device_free']:,} device frees, {a['num_alloc_retries']:,} retries, "
                     f"{a['num_sync_all_streams']:,} syncs of all streams (each waits for the GPU)")
    return lines


if __name__ == "__main__":
    import argparse

    from flashgen.config import EngineConfig

    ap = argparse.ArgumentParser(description="Realistic JSONL jobs through flashgen generate's path, next to the "
                                             "GPU floor.")
    ap.add_argument("--workload", default="extract", choices=tuple(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the workload's lines (0.01: smoke run)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded model's)")
    ap.add_argument("--shape", default="qwen3-0.6b", help="model shape of bench/synthetic.py")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    ap.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    ap.add_argument("--device", default=None, help="cpu: a smoke run on the CPU (with --shape tiny), no floor")
    ap.add_argument("--prepare-workers", default="auto", help="the job's prepare_workers (0: a thread)")
    ap.add_argument("--lengths", default="fixed", choices=LENGTHS,
                    help="fixed: every line generates max_tokens; spread: each its own, 1/8 to all of it")
    a = ap.parse_args()
    main(a.workload, a.scale, a.tokenizer, a.out_dir, a.shape, a.lengths, a.prepare_workers,
         enforce_eager=a.enforce_eager,
         max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, kv_cache_dtype=a.kv_cache_dtype,
         **({"device": a.device} if a.device else {}))
