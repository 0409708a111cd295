"""Where the engine thread's host time goes in a decode step, piece by piece: the step's launch (packing, the copy
to the device and the unpacking, the graph's input copies and its replay, the sampling batch, the sampler's launch,
the token slots) and the engine's other work on the step (scheduling, reading the tokens back, advancing the
sequences).

The extract job's shape on random weights (Qwen3-0.6B by default): `--seqs` requests behind one cached 1,022-token
prefix, each with 50-300 tokens of its own, all admitted at once, 64 tokens each (temperature 1, so the fused
sampler draws), or without the shared prefix (`--no-shared`: synth-like). Each piece's host time is summed with
perf_counter around its call, nothing synchronized (the GPU runs as in a job), over the decode steps after the
first wave's prefill; printed in microseconds a decode step and a sequence, largest first. Pieces nest (launch
holds the others): their sum is not the step.

    PYTHONPATH=. python3 tools/probes/decode_launch_probe.py --tokenizer DIR [--shape qwen3-0.6b] [--seqs 256]
        [--no-shared] [--beside none|busy|gated] [--cpu]

--beside busy|gated: a thread prepares the extract job's lines beside the engine during the measured run, as a
job's preparation thread does (tools/probes/prefill_host_probe.preparer), yielding the GIL a line (busy) or pausing
at the engine's launch gate (gated: flashgen.engine.launch_gate); none (the default): nothing beside it.

--cpu: a smoke run of the probe itself (tiny shape, the torch backend: no graphs, no fused sampler).
"""
from __future__ import annotations

import argparse
import collections
import functools
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

from flashgen import SamplingParams
from flashgen.bench.jobs import random_llm
from flashgen.engine import cuda_graphs, engine, model_runner, scheduler, token_slots

# (owner, attribute, label): what is timed. Module functions are patched where the caller looks them up.
PIECES = [
    (engine.Engine, "step", "Engine.step (the whole step)"),
    (scheduler.Scheduler, "schedule", "Scheduler.schedule"),
    (scheduler.Scheduler, "commit", "Scheduler.commit"),
    (engine.Engine, "_process", "Engine._process (tokens read, sequences advanced)"),
    (scheduler.Scheduler, "postprocess", "  Scheduler.postprocess (inside _process)"),
    (model_runner.ModelRunner, "launch", "ModelRunner.launch"),
    (model_runner, "pack_step", "  pack_step"),
    (model_runner, "unpack_step", "  unpack_step (the copy to the device)"),
    (cuda_graphs.DecodeGraphs, "run", "  DecodeGraphs.run (input copies + replay)"),
    (torch.cuda.CUDAGraph, "replay", "    CUDAGraph.replay"),
    (model_runner.ModelRunner, "_sample", "  ModelRunner._sample"),
    (model_runner, "build_sampling_batch", "    build_sampling_batch"),
    (model_runner, "sample_checked", "    sample_checked (the draw and its epilogue)"),
    (token_slots.TokenSlots, "publish", "    TokenSlots.publish (+ SampledTokens)"),
]


def instrument(pieces: list[tuple[object, str, str]], spent: collections.Counter, calls: collections.Counter,
               active: list[bool] | None = None) -> list:
    """Wrap each (owner, attribute, label) of `pieces` so that its calls' host seconds add up in spent[label] and
    their number in calls[label] (while active[0], when `active` is given); the (owner, attribute, original)
    triples to put back. tools/probes/host_cost_probe.py times the engine's phases with it too."""
    undo = []
    for owner, name, label in pieces:
        f = getattr(owner, name)

        def wrapper(*a, f=f, label=label, **k):
            if active is not None and not active[0]:
                return f(*a, **k)
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
                calls[label] += 1
        setattr(owner, name, functools.wraps(f)(wrapper))
        undo.append((owner, name, f))
    return undo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--no-shared", action="store_true")
    ap.add_argument("--beside", choices=("none", "busy", "gated"), default="none")
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args()
    if a.cpu:
        a.shape = "tiny"
    with tempfile.TemporaryDirectory() as d:
        mdir, llm = random_llm(d, a.tokenizer, a.shape, a.cpu, max_num_seqs=a.seqs)
        vocab = llm.engine.spec.vocab_size
        rng = random.Random(0)
        shared = [] if a.no_shared else [rng.randrange(3, vocab) for _ in range(1022)]
        lo, hi = (50, 300) if shared else (60, 120)
        sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0, seed=0)

        def prompts() -> list[list[int]]:
            return [shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi + 1))]
                    for _ in range(a.seqs)]

        llm.generate(prompts(), sp)  # warm-up: the graphs of this batch (and its groups) captured, the prefix cached
        spent: collections.Counter = collections.Counter()
        calls: collections.Counter = collections.Counter()
        active = [False]
        undo = instrument(PIECES, spent, calls, active)
        decode_steps = [0]
        launch = model_runner.ModelRunner.launch

        def counting(self, batch):
            if not batch.is_prefill:
                decode_steps[0] += 1
            return launch(self, batch)
        model_runner.ModelRunner.launch = counting
        stop, done = threading.Event(), [0]
        worker = None
        if a.beside != "none":
            from prefill_host_probe import preparer  # this script's own directory is on sys.path

            gate = llm.engine.launch_gate
            if a.beside == "gated" and not gate.on:
                print("the engine's launch gate is off here (FLASHGEN_LAUNCH_GATE, or the CPU): gated = busy")
            worker = threading.Thread(target=preparer(Path(mdir), pause=gate.pause if a.beside == "gated"
                                                      else lambda: time.sleep(0)), args=(stop, done), daemon=True)
            worker.start()
            time.sleep(0.5)  # its first groups under way
        try:
            active[0] = True
            if torch.cuda.is_available() and not a.cpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(prompts(), sp)
            if torch.cuda.is_available() and not a.cpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            prepared = done[0]
        finally:
            stop.set()
            if worker is not None:
                worker.join()
            active[0] = False
            model_runner.ModelRunner.launch = launch
            for owner, name, f in reversed(undo):
                setattr(owner, name, f)
        n = max(1, decode_steps[0])
        print(f"{a.seqs} sequences{'' if a.no_shared else ' behind a 1,022-token shared prefix'}, 64 tokens each, "
              f"{a.shape} on {'the CPU' if a.cpu else torch.cuda.get_device_name()}: {n} decode steps, "
              f"{wall:.2f} s in all (prefill steps included)"
              + (f"; beside it, {a.beside}: {prepared / wall:.0f} lines prepared a second" if worker else ""))
        print("host time summed over the whole run (prefill steps too), per decode step and per sequence of one:")
        print(f"{'piece':<58}{'calls':>7}{'us / decode step':>18}{'us / seq':>10}")
        for _, _, label in PIECES:
            if calls[label]:
                per = spent[label] / n * 1e6
                print(f"{label:<58}{calls[label]:>7}{per:>18.0f}{per / a.seqs:>10.2f}")
        llm.close()


if __name__ == "__main__":
    main()
