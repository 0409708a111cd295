"""The launch gate (flashgen.engine.launch_gate): a job's preparation thread keeps off the GIL while the engine's
thread launches a step, and only then."""
from __future__ import annotations

import io
import json
import threading
import time

import pytest

from flashgen.engine.launch_gate import LaunchGate, gate_wanted
from flashgen.jobs.idset import IdSet
from flashgen.jobs.inputs import LineParser, read_lines
from flashgen.jobs.progress import JobStats
from flashgen.jobs.runner import Runner
from flashgen.jobs.writer import OrderedWriter
from test_jobs_prepare import DEFAULTS, MAX_LEN, fake_llm, stable


def test_the_setting_is_auto_on_for_cuda_and_refuses_other_values(monkeypatch):
    monkeypatch.delenv("FLASHGEN_LAUNCH_GATE", raising=False)
    assert gate_wanted("cuda") and not gate_wanted("cpu")
    monkeypatch.setenv("FLASHGEN_LAUNCH_GATE", "1")
    assert gate_wanted("cpu")
    monkeypatch.setenv("FLASHGEN_LAUNCH_GATE", "0")
    assert not gate_wanted("cuda")
    monkeypatch.setenv("FLASHGEN_LAUNCH_GATE", "yes")
    with pytest.raises(ValueError, match="FLASHGEN_LAUNCH_GATE='yes'"):
        gate_wanted("cuda")


def _paused_until(gate: LaunchGate, hold: float) -> tuple[float, float]:
    """(when a pause on another thread returned, when the launch ended) for a launch of `hold` seconds that begins
    before the pause."""
    inside, returned = threading.Event(), []

    def pauser() -> None:
        inside.wait()
        gate.pause()
        returned.append(time.perf_counter())

    t = threading.Thread(target=pauser)
    t.start()
    with gate.launching():
        inside.set()
        time.sleep(hold)
        ended = time.perf_counter()
    t.join(5)
    assert returned, "the pause never returned"
    return returned[0], ended


def test_a_pause_waits_for_the_launch_to_end_and_only_when_on():
    back, ended = _paused_until(LaunchGate(True), 0.2)
    assert back >= ended
    back, ended = _paused_until(LaunchGate(False), 0.2)
    assert back < ended - 0.1


def test_the_gate_opens_again_when_the_launch_raises():
    gate = LaunchGate(True)
    with pytest.raises(RuntimeError), gate.launching():
        raise RuntimeError("a launch that fails")
    t0 = time.perf_counter()
    gate.pause()
    assert time.perf_counter() - t0 < 0.5


class GatedLLM:
    """fake_llm whose steps are launches of `hold` seconds that let go of the GIL (as torch calls do), inside its
    engine's launch gate; the launch intervals are recorded."""

    def __init__(self, gate_on: bool, hold: float = 0.004):
        from types import SimpleNamespace

        self._llm = fake_llm(max_num_seqs=8, steps=lambda rid: 3)
        self.engine = SimpleNamespace(launch_gate=LaunchGate(gate_on))
        self.hold, self.launches = hold, []

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        with self.engine.launch_gate.launching():
            t0 = time.perf_counter()
            for _ in range(8):  # a launch's calls, each dropping the GIL
                time.sleep(self.hold / 8)
            self.launches.append((t0, time.perf_counter()))
        return self._llm.step()


def _gated_job(gate_on: bool, monkeypatch) -> tuple[bytes, list, list]:
    """A job of 400 prompt lines through the preparation thread: (output, launch intervals, the start times of
    the lines' preparation steps on that thread)."""
    llm = GatedLLM(gate_on)
    starts: list[float] = []
    real_build = LineParser.build

    def build(self, *a, **k):
        if threading.current_thread().name == "flashgen-prepare":
            starts.append(time.perf_counter())
        return real_build(self, *a, **k)

    monkeypatch.setattr(LineParser, "build", build)
    data = b"\n".join(json.dumps({"id": i, "prompt": f"line {i} " + "word " * (i % 40)}).encode()
                      for i in range(400)) + b"\n"
    sink = io.BytesIO()
    runner = Runner(llm, LineParser(llm.tokenizer, MAX_LEN, DEFAULTS), OrderedWriter(sink), JobStats(),
                    max_in_flight=64, prepare_ahead=True)
    assert runner.run(read_lines(io.BytesIO(data)), IdSet()) == "ok"
    monkeypatch.setattr(LineParser, "build", real_build)
    return sink.getvalue(), llm.launches, starts


def _inside(launches: list, starts: list) -> list[int]:
    """How many preparation steps began strictly inside each launch."""
    return [sum(a < s < b for s in starts) for a, b in launches]


def test_the_preparation_thread_starts_at_most_one_line_inside_a_launch(monkeypatch):
    """With the gate a line's preparation may begin inside a launch only when its yield point came just before
    the gate closed (once a launch at most); without it lines are prepared all through the launches. The output is
    the same."""
    out_on, launches_on, starts_on = _gated_job(True, monkeypatch)
    out_off, launches_off, starts_off = _gated_job(False, monkeypatch)
    assert len(starts_on) == len(starts_off) == 400 and len(launches_on) > 50
    assert max(_inside(launches_on, starts_on)) <= 1
    assert sum(_inside(launches_off, starts_off)) > 4 * max(1, sum(_inside(launches_on, starts_on)))
    assert stable(out_on) == stable(out_off) and out_on.count(b"\n") == 400
