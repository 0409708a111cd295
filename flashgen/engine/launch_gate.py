"""The launch gate: threads that run Python beside the engine (a job's input preparation) keep off the GIL while
the engine's thread launches a step.

A launch is a run of torch and kernel calls, each of which lets go of the GIL. A thread preparing lines that takes
it there keeps it until its next yield (the rest of a line, ~0.1-0.5 ms), so a decode launch of ~60 calls and a
prefill launch of ~1,000 could wait at many of them: on an H100 an extract prefill step's launch took 21 ms of host
time alone and 57 ms beside the preparation thread, and the GPU waited on it (BENCHMARKS.md, fifteenth session).
With the gate such a thread pauses at its next yield point until the launch is over, and runs while the engine's
thread waits for the GPU (reading a step's tokens), where it used to wait itself.

On by default where launches are asynchronous (the CUDA backend); on the CPU a launch holds the whole forward, so
the gate stays open there. $FLASHGEN_LAUNCH_GATE=0|1 turns it off or on anywhere (A/B measurements, tests).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator


def gate_wanted(device_type: str) -> bool:
    """$FLASHGEN_LAUNCH_GATE: "1" on, "0" off, unset or "auto": on for CUDA devices."""
    mode = os.environ.get("FLASHGEN_LAUNCH_GATE", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FLASHGEN_LAUNCH_GATE={mode!r}: use auto (the default), 0 or 1")
    return mode == "1" or (mode == "auto" and device_type == "cuda")


class LaunchGate:
    """Open except while the engine's thread is inside `launching()` (when `on`)."""

    def __init__(self, on: bool):
        self.on = on
        self._open = threading.Event()
        self._open.set()

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        """The engine's thread launches a step: closed until the block is left, however it is left."""
        if not self.on:
            yield
            return
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def pause(self) -> None:
        """A yield point of a thread beside the engine: hand the GIL over if the engine's thread waits for it,
        then wait while a launch is under way."""
        time.sleep(0)
        if self.on:
            self._open.wait()
