"""The start-up heap kept out of Python's garbage collector.

A job's process holds some 170,000-180,000 objects the collector tracks once it has started (what the imports and
start-up leave; counted on the CPU), and the collector's oldest generation walks all of them whenever enough objects
made since its last pass have survived: on a job's thread that pass is a pause of tens of milliseconds or more (123
ms in a CPU smoke job of 4,000 extract lines; BENCHMARKS.md, fourteenth session), and the engine launches nothing
during it. Few of those objects ever become garbage: the job runs until the process ends. So once the engine is up,
what is alive is collected once and frozen (`gc.freeze`, Python 3.7+: moved to a generation the collector never
walks). Objects made afterwards (requests, sequences, records) are collected as before. Only jobs do this (`flashgen
generate`, which thaws the heap again when its job ends, so a process that runs jobs in turn keeps nothing frozen;
and its data-parallel engine processes); the LLM class, used from a caller's own process, leaves the caller's heap
alone.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then freeze every object alive; the number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Hand every frozen object back to the collector (its oldest generation), when the job is over."""
    gc.unfreeze()
