"""Host time of two per-request costs on the engine's thread, on the CPU (no GPU needed):

- admission: Engine.add_request of token-id prompts shaped like the extract job's (a shared 1,000-token
  instruction plus 50-300 tokens), microseconds per request, as lists of ints (the LLM API) and as int32 arrays
  (what a job's prepared lines hold);
- detokenization: a sequence's text built token by token (detokenizer.detokenize_step, the path of requests with
  stop strings) against decoded once at the end (detokenizer.decode_output, every other request), microseconds per
  generated token, with a real BPE tokenizer;
- the sampling batch of a decode step (sampler.build_sampling_batch: 256 rows' settings as tensors), and the
  runner's look for grammar matchers and logprobs rows (runner_flags_us);
- packing a decode step (step_packing.pack_step) of 256 and 512 sequences behind one 1,024-token prefix (the extract
  job's shape, 64-token blocks), with and without shared-prefix groups, microseconds per step; and a prefill step
  of 48 such prompts with their 1,022-token prefix cached (about 10,000 new tokens, ids of a 49,152 vocabulary),
  and one of 512 short prompts (a synth-like first wave);
- the engine thread's phases of a whole job of 256 lines (schedule, commit, pack_step, launch, _process),
  milliseconds per call, with a tiny model on the CPU (launch includes the model's torch ops; on the CPU the engine
  never runs a step ahead of its tokens, so Scheduler.can_run_ahead is not among them).

    PYTHONPATH=. python3 tools/probes/host_cost_probe.py TOKENIZER_DIR

Run it in two trees to compare a change with its base (the same machine, one after the other).
"""
from __future__ import annotations

import random
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from flashgen import LLM, SamplingParams  # noqa: E402
from flashgen.engine import detokenizer  # noqa: E402
from flashgen.engine.sequence import Sequence  # noqa: E402
from flashgen.tokenizer import Tokenizer  # noqa: E402


def admission_us(n: int = 400, as_array: bool = False) -> float:
    from test_cli_support import tiny_model

    llm = LLM(model=tiny_model(), device="cpu", kv_cache_gb=0.5, max_num_seqs=256)
    rng = random.Random(0)
    shared = [rng.randrange(3, 250) for _ in range(1000)]
    prompts = [shared + [rng.randrange(3, 250) for _ in range(rng.randrange(50, 300))] for _ in range(n)]
    sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    if as_array:
        from array import array

        prompts = [array("i", p) for p in prompts]  # type: ignore[misc]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        llm.add_request(f"r{i}", p, sp)
    return (time.perf_counter() - t0) / n * 1e6


def detok_us(tokenizer_dir: str, seqs: int = 256, tokens: int = 100, vocab: int = 49152) -> tuple[float, float | None]:
    """(token by token, decoded once at the end) microseconds per generated token, random ids below `vocab` (the
    embedded SmolLM2's vocabulary); None where this tree has no decode_output."""
    tok = Tokenizer(tokenizer_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(50)] for _ in range(seqs)]
    outs = [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(seqs)]
    sp = SamplingParams(max_tokens=tokens)
    ss = [Sequence(f"r{i}", None, p, sp, 64, 0) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    for j in range(tokens):
        for s, o in zip(ss, outs, strict=True):
            detokenizer.detokenize_step(tok, s, o[j])
    inc = (time.perf_counter() - t0) / (seqs * tokens) * 1e6
    if not hasattr(detokenizer, "decode_output"):
        return inc, None
    ss = [Sequence(f"r{i}", None, p, sp, 64, 0) for i, p in enumerate(prompts)]
    for s, o in zip(ss, outs, strict=True):
        s.token_ids.extend(o)
    t0 = time.perf_counter()
    for s in ss:
        detokenizer.decode_output(tok, s, len(s.token_ids))
    return inc, (time.perf_counter() - t0) / (seqs * tokens) * 1e6


def _table(s: Sequence, ids: list[int]) -> list[int] | array:
    """Block ids as the tree's own kind of table (int32 arrays since the nineteenth session; lists before)."""
    return array("i", ids) if isinstance(s.block_table, array) else ids


def pack_us(reps: int = 300, n: int = 256, group: int | None = None) -> tuple[float, float]:
    """(without groups, with shared-prefix groups of at most `group` members: SHARED_GROUP by default)
    microseconds per pack_step of an n-sequence decode step."""
    from flashgen.engine.step_packing import SHARED_GROUP, pack_step

    bs, rng, prefix, nxt, seqs = 64, random.Random(0), list(range(1000, 1016)), 2000, []
    for _ in range(n):
        length = 1024 + rng.randrange(50, 300) + rng.randrange(64)
        s = Sequence("r", None, [1] * length, SamplingParams(), bs, 0)
        own = -(-length // bs) - len(prefix)
        s.block_table, nxt = _table(s, prefix + list(range(nxt, nxt + own))), nxt + own
        seqs.append(s)
    ids, out = list(range(len(seqs))), []
    for grouped in (False, True):
        t0 = time.perf_counter()
        for _ in range(reps):
            pack_step(seqs, False, bs, decode_ids=ids, shared_prefix=(group or SHARED_GROUP) if grouped else 0)
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return out[0], out[1]


def _prefill_us(n: int, lengths: tuple[int, int], cached: int, reps: int) -> tuple[int, float]:
    """(new tokens, median microseconds) of pack_step for a prefill step of n prompts of lengths in
    [lengths[0], lengths[1]) whose first `cached` tokens are in the cache, each computing the rest."""
    import statistics

    from flashgen.engine.step_packing import pack_step

    bs, rng, seqs, nb = 64, random.Random(0), [], 0
    for i in range(n):
        length = rng.randrange(*lengths)
        s = Sequence(str(i), None, [rng.randrange(300, 49152) for _ in range(length)], SamplingParams(), bs, 0)
        s.block_table = _table(s, list(range(nb, nb + -(-length // bs))))
        nb += len(s.block_table)
        s.num_computed_tokens, s.num_scheduled_tokens = cached, length - cached
        seqs.append(s)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pack_step(seqs, True, bs)
        times.append(time.perf_counter() - t0)
    return sum(s.num_scheduled_tokens for s in seqs), statistics.median(times) * 1e6


def prefill_pack_us(reps: int = 200) -> tuple[int, float]:
    """_prefill_us of 48 extract-shaped prompts whose 1,022-token prefix is cached."""
    return _prefill_us(48, (1089, 1336), 1022, reps)


def prefill_short_pack_us(reps: int = 100, n: int = 512) -> tuple[int, float]:
    """_prefill_us of n short prompts (20-60 tokens, none cached: a synth-like first wave)."""
    return _prefill_us(n, (20, 60), 0, reps)


def step_phases_ms(n: int = 256, tokens: int = 64) -> dict[str, tuple[int, float]]:
    """The engine thread's host phases of a job's steps, {phase: (calls, ms per call)}: n prompts behind a shared
    200-token prefix, `tokens` each, all resident at once (max_num_seqs n), on the CPU with a tiny model, so that
    `launch` (the model, here torch on the CPU) is not a GPU figure but the others are what a GPU step's host pays:
    scheduling, packing the step's inputs (inside launch), and reading the previous step's tokens (_process)."""
    import collections

    from decode_launch_probe import instrument  # this script's own directory is on sys.path
    from flashgen.engine import engine, model_runner, scheduler
    from test_cli_support import tiny_model

    llm = LLM(model=tiny_model(), device="cpu", kv_cache_gb=0.5, max_num_seqs=n)
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    undo = instrument([(owner, name, name) for owner, name in (
        (scheduler.Scheduler, "schedule"), (scheduler.Scheduler, "commit"), (model_runner, "pack_step"),
        (type(llm.engine.runner), "launch"), (engine.Engine, "_process"))], spent, calls)
    try:
        rng = random.Random(0)
        shared = [rng.randrange(3, 250) for _ in range(200)]
        prompts = [shared + [rng.randrange(3, 250) for _ in range(rng.randrange(20, 60))] for _ in range(n)]
        sp = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
        llm.generate(prompts[:8], sp)  # warm-up
        spent.clear()
        calls.clear()
        llm.generate(prompts, sp)
    finally:
        for owner, name, f in undo:
            setattr(owner, name, f)
    return {k: (calls[k], spent[k] / calls[k] * 1e3) for k in spent}


def sampling_batch_us(n: int = 256, reps: int = 2000) -> float:
    """model_runner's build_sampling_batch for a decode step of `n` sampling rows (temperature 1, a seed each, 20
    tokens generated), on the CPU: microseconds a step (the host part: the lists, the flags, the tensors)."""
    import torch

    from flashgen.engine.sampler import build_sampling_batch

    sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0, seed=3)
    seqs = [Sequence(str(i), None, list(range(1200)), sp, 64, seed=i) for i in range(n)]
    for s in seqs:
        s.token_ids.extend([5] * 20)
    cpu = torch.device("cpu")
    build_sampling_batch(seqs, 49152, {0}, cpu)
    t0 = time.perf_counter()
    for _ in range(reps):
        build_sampling_batch(seqs, 49152, {0}, cpu)
    return (time.perf_counter() - t0) / reps * 1e6


def runner_flags_us(n: int = 512, reps: int = 2000) -> tuple[float, float] | None:
    """The runner's look for grammar matchers and logprobs rows in a decode step of n greedy rows using neither:
    (as three passes over the rows, the way ModelRunner made them before the nineteenth session: a matcher check
    in launch and in _sample, the logprobs rows, the sampling batch's flags ORed; as one batch_flags pass gating
    the others), microseconds a step; None where this tree has no batch_flags."""
    from flashgen.engine import sampler

    if not hasattr(sampler, "batch_flags"):
        return None
    seqs = [Sequence(str(i), None, [1] * 100, SamplingParams(temperature=0), 64, 0) for i in range(n)]

    def passes() -> None:
        any(s.matcher is not None for s in seqs)
        [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        flags = 0
        for s in seqs:
            flags |= s.sampling_flags
        any(s.matcher is not None for s in seqs)

    def flagged() -> None:
        flags = sampler.batch_flags(seqs)
        bool(flags & sampler.STRUCTURED) and any(s.matcher is not None for s in seqs)
        [i for i, s in enumerate(seqs) if s.params.logprobs is not None] if flags & sampler.LOGPROBS else []

    out = []
    for f in (passes, flagged):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return out[0], out[1]


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    phases = step_phases_ms()
    print("engine thread, per call (256 sequences, 64 tokens each, tiny model on the CPU; launch includes the "
          "model): " + ", ".join(f"{k} {ms:.3f} ms x {c}" for k, (c, ms) in phases.items()))
    from flashgen.engine.step_packing import SHARED_GROUP_WIDE

    a = admission_us()
    a_arr = admission_us(as_array=True)
    plain, grouped = pack_us()
    print(f"pack_step, a decode step of 256 sequences: {plain:.0f} us without groups, {grouped:.0f} us with them")
    plain, grouped = pack_us(n=512, group=SHARED_GROUP_WIDE)
    print(f"pack_step, a decode step of 512 sequences: {plain:.0f} us without groups, {grouped:.0f} us with groups of "
          f"up to {SHARED_GROUP_WIDE}")
    print(f"build_sampling_batch, a decode step of 256 sampling rows: {sampling_batch_us():.0f} us")
    flags = runner_flags_us()
    if flags is not None:
        print(f"the runner's matcher and logprobs look, 512 rows: {flags[0]:.1f} us as three passes, {flags[1]:.1f} us "
              "flagged")
    new, pf = prefill_pack_us()
    print(f"pack_step, a prefill step of 48 sequences ({new:,} new tokens): {pf:.0f} us (median)")
    new, pf = prefill_short_pack_us()
    print(f"pack_step, a prefill step of 512 short prompts ({new:,} new tokens): {pf:.0f} us (median)")
    inc, once = detok_us(sys.argv[1])
    print(f"add_request, 1,050-1,300-token id prompts: {a:.0f} us per request as lists, {a_arr:.0f} us as int32 "
          "arrays")
    print(f"detokenization: token by token {inc:.2f} us per token; decoded once at the end "
          + (f"{once:.2f} us per token" if once is not None else "n/a (not in this tree)"))


if __name__ == "__main__":
    main()
