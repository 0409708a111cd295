"""CUDA-event timing of short GPU calls, for the kernel benchmark and for the engine's own kernel choices
(flashgen.ops.cuda_ops.linear_plan)."""
from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch


def fixed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[[int], object]:
    """bench's fn(i) for a call with the same inputs every time: fn(*args, **kwargs). The arguments are bound
    now, not looked up when bench calls it, so a loop times this iteration's tensors and can free them (del)
    once bench has returned."""
    return lambda i: fn(*args, **kwargs)


def rotating(fn: Callable[..., object], sets: Sequence[tuple], **kwargs: Any) -> Callable[[int], object]:
    """bench's fn(i) for rotating inputs: fn(*sets[i % len(sets)], **kwargs), one tuple of positional
    arguments per input set (so that repeated calls cannot be served from L2); bound now, as in fixed()."""
    return lambda i: fn(*sets[i % len(sets)], **kwargs)


def bench(fn: Callable[[int], object], reps: int = 30, inner: int = 10, warmup: int = 3, graph: bool = True) -> float:
    """Median seconds per fn(i) call. `inner` calls (i = 0 .. inner-1, for rotating inputs) are captured in
    one CUDA graph and its replays are timed with CUDA events, so Python and launch overheads stay out
    (decode steps run as graphs in the engine too). Eager calls are timed instead with graph=False (the
    copy ceiling: a captured device-to-device copy becomes a copy-engine node, slower than the copy
    kernel an eager call runs) or when capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def eager() -> None:
        for i in range(inner):
            fn(i)

    run: Callable[[], object] = eager
    per = inner
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(inner):
                    fn(i)
            run = g.replay
        except Exception as e:  # noqa: BLE001 - a peer kernel that refuses capture is timed eagerly
            print(f"graph capture failed ({type(e).__name__}: {str(e)[:80]}); timing eager calls", file=sys.stderr)
            torch.cuda.synchronize()
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3 / per
