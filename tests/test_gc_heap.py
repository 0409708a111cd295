"""The start-up heap frozen out of the collector while a job runs its lines, and thawed when the job ends; a job's
run leaves no cyclic garbage."""
from __future__ import annotations

import gc
import json
from collections import Counter

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


GOOD = [{"prompt": "hello there"}, {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "a json object", "response_format": {"type": "json_object"}, "max_tokens": 6},
        {"prompt": "logprobs", "logprobs": 2},
        {"messages": [{"role": "user", "content": "chat logprobs"}], "logprobs": 1},
        {"prompt": "two samples", "n": 2, "temperature": 1.0, "seed": 3},
        {"prompt": "stop", "stop": ["e"], "max_tokens": 8},
        {"method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "a batch line"}], "logprobs": True, "top_logprobs": 2}}]
BAD = ["{not json", '[1, 2, 3]', '{"prompt": 5}', '{"prompt": "hi", "temperature": "hot"}',
       '{"prompt": "hi", "max_tokens": -3}', '{"prompt": "hi", "bogus_field": 1}', '{"messages": [{"role": 3}]}',
       '{"prompt_token_ids": [1000000000]}', '{"id": "same", "prompt": "dup"}',
       '{"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}',
       '{"prompt": "' + "word " * 3000 + '"}']


def test_a_job_leaves_no_cyclic_garbage(tmp_path, monkeypatch):
    """A job's lines, results and error records of every kind make nothing that only the collector could free: a
    line's objects (its text, its prompt ids) go when the line is written, not at the collector's next pass, and the
    young passes that run on the job's threads find nothing to do but walk. The run is watched with the collector's
    automatic passes off; what one full pass finds right after it, before anything is torn down, must be nothing."""
    found = []
    run = Runner.run

    def watched(self, *a, **k):
        gc.collect()
        saved = gc.get_threshold()
        gc.set_threshold(0)
        try:
            return run(self, *a, **k)
        finally:
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                gc.collect()
                found.append(Counter(type(o).__name__ for o in gc.garbage))
            finally:
                gc.garbage.clear()
                gc.set_debug(0)
                gc.set_threshold(*saved)

    monkeypatch.setattr(Runner, "run", watched)
    lines = [json.dumps({("custom_id" if "body" in g else "id"): f"g{i}", **g})
             for i, g in enumerate(GOOD[i % len(GOOD)] for i in range(60))]
    lines += [b.replace('{"id": "same", ', '{"id": "g1", ') if '"same"' in b else b for b in BAD]
    lines.append(b"\xff\xfe not utf-8")
    r, recs = gen(tmp_path, lines)
    assert len(recs) == len(lines)
    assert sum(bool(x.get("error")) for x in recs) == len(BAD) + 1, [x["error"] for x in recs if x.get("error")]
    assert found == [Counter()], f"cyclic garbage left by the job: {found}"
