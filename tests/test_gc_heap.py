"""The start-up heap frozen out of the collector while a job runs its lines, and thawed when the job ends."""
from __future__ import annotations

import gc

from flashgen.engine.gc_heap import freeze_startup_heap, thaw_heap
from flashgen.jobs.runner import Runner
from test_cli_support import gen


class _Cycle:
    def __init__(self):
        self.me = self


def test_freeze_collects_first_and_thaw_hands_everything_back():
    """Garbage left before the freeze is collected, not frozen; what is alive is frozen (the oldest generation's
    pass no longer walks it) until thawed."""
    assert gc.get_freeze_count() == 0
    alive = [object() for _ in range(3)] + [[]]  # a tracked container among them
    garbage = _Cycle()
    del garbage  # unreachable: only the collector can free it
    try:
        n = freeze_startup_heap()
        assert n == gc.get_freeze_count() > 0
        assert not any(isinstance(o, _Cycle) for o in gc.get_objects())  # collected, not frozen
        assert not any(o is alive[3] for o in gc.get_objects())  # frozen: out of every generation
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    assert any(o is alive[3] for o in gc.get_objects())


def test_a_job_runs_its_lines_with_the_startup_heap_frozen_and_thaws_it(tmp_path, monkeypatch):
    """`flashgen generate` freezes what start-up left alive before its run loop (the model, the tokenizer, the
    imports), so the collector's full passes on the job's thread walk only the job's own objects; when the job
    ends, however it ends, the heap is thawed (a process that runs jobs in turn, as these tests do, keeps nothing
    frozen)."""
    seen = []
    run = Runner.run

    def watched(self, *a, **k):
        seen.append(gc.get_freeze_count())
        return run(self, *a, **k)

    monkeypatch.setattr(Runner, "run", watched)
    r, recs = gen(tmp_path, [{"id": i, "prompt": "hello"} for i in range(3)])
    assert r.exit_code == 0, r.stderr
    assert len(recs) == 3
    assert len(seen) == 1 and seen[0] > 1000  # the start-up heap: thousands of objects
    assert gc.get_freeze_count() == 0

    def failing(self, *a, **k):
        seen.append(gc.get_freeze_count())
        raise RuntimeError("the engine failed")

    monkeypatch.setattr(Runner, "run", failing)
    r, _ = gen(tmp_path, [{"id": 0, "prompt": "hello"}], name="again.jsonl")
    assert r.exit_code != 0 and seen[-1] > 1000
    assert gc.get_freeze_count() == 0
