"""Where an eager prefill step's host time goes on a GPU, and whether a busy Python thread beside the engine (the
job's preparation thread: parsing, templating, tokenizing lines) stretches it through the GIL.

The extract job's shape on random weights: rounds of requests behind one cached 1,022-token prefix, each with
50-300 tokens of its own and max_tokens 1, so every step is a prefill of about max_num_batched_tokens new tokens.
Rounds cycle `quiet` (nothing else runs in the process), `busy` (a thread prepares the extract job's lines with the
job's own LineParser, as flashgen.jobs.source.Prepared does, over and over, yielding the GIL a line) and `gated`
(the same thread pausing at the engine's launch gate instead, as a job's does: flashgen.engine.launch_gate). Per
round, from flashgen.bench.jobs.GpuSteps: prefill steps, new tokens a step, the host's milliseconds inside each
launch, the GPU's milliseconds a step, the launches the GPU reached before the host had finished queuing them, and
the caching allocator's calls that wait for the GPU. With --profile, the host's functions inside the launches of
the first quiet round (cProfile, by own time). With --kernels, one more quiet round under torch.profiler: the
prefill steps' GPU time kernel by kernel (tools/probes/step_profile_probe.report), and the step's linear-layer
FLOPs set against the kernels' time.

    PYTHONPATH=. python3 tools/probes/prefill_host_probe.py --tokenizer DIR [--shape qwen3-0.6b] [--rounds 6]
        [--requests 480] [--profile] [--kernels] [--cpu]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flashgen import SamplingParams
from flashgen.bench.jobs import WORKLOADS, GpuSteps, line_of, make_texts, random_llm
from flashgen.jobs.inputs import LineParser
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.runner import PREPARE_GROUP
from flashgen.jobs.settings import load_settings
from flashgen.tokenizer import Tokenizer


def preparer(mdir: Path, lines: int = 2000, pause: Callable[[], None] = lambda: time.sleep(0)):
    """A function that prepares the extract job's lines (head, build, encode_pending in groups, `pause()` a line:
    a yield of the GIL, or the engine's LaunchGate.pause, as the job's preparation thread) until its event is
    set."""
    tok = Tokenizer(mdir)
    w = WORKLOADS["extract"]
    instruction, texts, _ = make_texts(w, lines, lambda s: tok.encode(s, add_special_tokens=False),
                                       lambda ts: [len(i) for i in tok.encode_batch(ts, add_special_tokens=False)])
    raws = [json.dumps(line_of(w, i, instruction, t), ensure_ascii=False).encode() for i, t in enumerate(texts)]
    parser = LineParser(tok, 1 << 20, defaults_from_settings(load_settings(None, {}, "/").sampling))

    def run(stop: threading.Event, done: list[int]) -> None:
        while not stop.is_set():
            for g in range(0, len(raws), PREPARE_GROUP):
                if stop.is_set():
                    return
                items = []
                for i, r in enumerate(raws[g:g + PREPARE_GROUP]):
                    items.append(parser.build(parser.head(g + i, r), defer=True))
                    pause()
                parser.encode_pending(items)
                done[0] += len(items)
    return run


def kernel_round(llm, shared: list[int], prompts: list[list[int]], sp) -> None:
    """One quiet round under torch.profiler: the prefill steps' kernels by name, and the new tokens' linear-layer
    FLOPs (2 x the layers' parameters a token) over the kernels' whole time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tools.probes.step_profile_probe import report
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        llm.generate(prompts, sp)
        sync()
    wall = time.perf_counter() - t0
    new = sum(len(p) for p in prompts) - len(shared) * len(prompts)
    spec = llm.engine.spec
    per_layer = spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim \
        + spec.num_heads * spec.head_dim * spec.hidden_size + 3 * spec.hidden_size * spec.intermediate_size
    print(f"kernels round: {len(prompts)} requests, {new:,} new tokens, linear layers "
          f"{2 * per_layer * spec.num_layers * new / 1e12:.2f} TFLOP, wall {wall:.3f} s")
    report(prof, wall, 25)


class _HostEvent:
    """A CUDA event's stand-in for --cpu: the host's clock."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _HostEvent) -> float:
        return 1e3 * (other.t - self.t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=480)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="a smoke run on the CPU (tiny shape, host clocks)")
    a = ap.parse_args()
    if a.cpu:
        a.shape = "tiny"
    with tempfile.TemporaryDirectory() as d:
        mdir, llm = random_llm(d, a.tokenizer, a.shape, a.cpu, **({"max_num_batched_tokens": 2048} if a.cpu else {}))
        runner = llm.engine.runner
        launch = runner.launch
        vocab = llm.engine.spec.vocab_size
        rng = random.Random(0)
        shared = [rng.randrange(3, vocab) for _ in range(1022)]
        sp = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
        llm.generate([shared + [5]], sp)  # the prefix cached
        preps = {"busy": preparer(mdir), "gated": preparer(mdir, pause=llm.engine.launch_gate.pause)}
        if not llm.engine.launch_gate.on:
            print("the engine's launch gate is off here (FLASHGEN_LAUNCH_GATE, or the CPU): gated = busy")
        print(f"{'round':<8}{'steps':>6}{'tok/step':>9}{'host ms':>9}{'GPU ms':>8}{'late':>6}{'late s':>8}"
              f"{'lines/s':>9}  allocator (alloc/free/retry/sync)")
        for r in range(a.rounds):
            mode = ("quiet", "busy", "gated")[r % 3]
            prompts = [shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(50, 301))]
                       for _ in range(a.requests)]
            stop, done = threading.Event(), [0]
            worker = threading.Thread(target=preps[mode], args=(stop, done), daemon=True) if mode != "quiet" else None
            if worker is not None:
                worker.start()
                time.sleep(0.5)  # its first groups under way
            prof = cProfile.Profile() if a.profile and r == 0 else None
            if prof is not None:
                def profiled(batch, prof=prof):
                    prof.enable()
                    try:
                        return launch(batch)
                    finally:
                        prof.disable()
                runner.launch = profiled
            steps = GpuSteps(runner, event=_HostEvent, synchronize=lambda: None, memory_stats=dict) if a.cpu \
                else GpuSteps(runner)
            n0, t0 = done[0], time.perf_counter()
            llm.generate(prompts, sp)
            rate = (done[0] - n0) / (time.perf_counter() - t0)
            stop.set()
            if worker is not None:
                worker.join()
            runner.launch = launch
            s = steps.summary()
            p, al = s["prefill"], s["allocator"]
            new = sum(len(x) for x in prompts) - len(shared) * len(prompts)
            n = max(1, p["steps"])
            print(f"{mode:<8}{p['steps']:>6}{new / n:>9.0f}{1e3 * p['host_launch_s'] / n:>9.2f}"
                  f"{1e3 * p['gpu_s'] / n:>8.2f}{p['late_launches']:>6}{p['late_launch_s']:>8.3f}{rate:>9.0f}  "
                  f"{al['num_device_alloc']}/{al['num_device_free']}/{al['num_alloc_retries']}/"
                  f"{al['num_sync_all_streams']}")
            if prof is not None:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
                print(out.getvalue())
        if a.kernels:
            kernel_round(llm, shared, [shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(50, 301))]
                                       for _ in range(a.requests)], sp)
        llm.close()


if __name__ == "__main__":
    main()
