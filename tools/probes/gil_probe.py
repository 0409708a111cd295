"""Whether the job's preparation thread delays the engine's thread through the GIL (CPU only, no GPU needed).

The engine's thread spends a step mostly waiting on the GPU (a wait that releases the GIL), then needs the GIL back
to read the tokens and launch the next step. While the preparation thread parses, templates and tokenizes lines
(flashgen/jobs/source.Prepared: its Python parts hold the GIL, the tokenizer's encode_batch does not), taking the
GIL back can wait up to sys.getswitchinterval() (5 ms by default) each time. This probe runs the job's own
preparation (LineParser.head / build / encode_pending on the extract job's lines, groups of PREPARE_GROUP) on a
thread, and on the main thread a loop of 2 ms GIL-free waits (time.sleep, as the engine waits on the GPU), then
prints how late the main thread gets going again after each wait: with no preparation running, and with it at
switch intervals of 5, 1 and 0.5 ms, next to the preparation's rate; then with the lines built in worker processes
(flashgen.jobs.prepare_pool, `--workers N`, 2 by default): the thread only reads each line's id (head) and hands the
groups to the workers, four groups in flight, as the job's preparation thread does with --prepare-workers N. The last
column is the preparing thread's own CPU time a line (time.thread_time): its Python work, which holds the GIL (the
tokenizer's encode_batch runs on its own threads, outside the GIL). The thread yields the GIL after each line, as the
job's does. `late/s` is the lateness summed over the row's run, in ms a second: the engine's time lost.

With `--rate R` the preparation is paced as in a job whose engine takes R lines a second (a group starts no earlier
than its lines are due), instead of running flat out: a job prepares only what its bounded window lets it.

`--no-piece-cache` tokenizes every line's whole prompt (flashgen.tokenizer.PieceCache off: the shared system message
tokenized again each line), as before the cache.

    PYTHONPATH=. python3 tools/probes/gil_probe.py TOKENIZER_DIR [--lines 2000] [--workers 2] [--rate R]
        [--no-piece-cache]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from flashgen.bench.jobs import WORKLOADS, _model_dir, line_of, make_texts
from flashgen.jobs.inputs import LineParser
from flashgen.jobs.params import defaults_from_settings
from flashgen.jobs.prepare_pool import PreparePool
from flashgen.jobs.runner import PREPARE_GROUP
from flashgen.jobs.settings import load_settings
from flashgen.tokenizer import PieceCache, Tokenizer


def lateness(stop: threading.Event, wait_s: float = 0.002) -> list[float]:
    """How late (s) the thread resumes after each of its GIL-free waits, until `stop`."""
    late = []
    while not stop.is_set():
        t = time.perf_counter()
        time.sleep(wait_s)
        late.append(time.perf_counter() - t - wait_s)
    return late


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-piece-cache", action="store_true")
    ap.add_argument("--rate", type=float, default=0.0, help="lines a second the preparation is paced to (0: flat out)")
    a = ap.parse_args()
    w = WORKLOADS["extract"]
    if a.no_piece_cache:
        PieceCache.MIN_CHARS = sys.maxsize  # no piece is long enough to keep
    with tempfile.TemporaryDirectory() as d:
        mdir = _model_dir(str(Path(d) / "model"), Path(a.tokenizer), "tiny")
        tok = Tokenizer(mdir)

        def encode(s: str) -> list[int]:
            return tok.encode(s, add_special_tokens=False)

        def measure(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tok.encode_batch(texts, add_special_tokens=False)]

        instruction, texts, _ = make_texts(w, a.lines, encode, measure)
        raws = [json.dumps(line_of(w, i, instruction, t), ensure_ascii=False).encode() for i, t in enumerate(texts)]
        parser = LineParser(tok, 1 << 20, defaults_from_settings(load_settings(None, {}, "/").sampling))

        def pace(t: float, g: int) -> None:
            if a.rate:
                time.sleep(max(0.0, t + g / a.rate - time.perf_counter()))

        def prepare_all(paced: bool = True) -> float:
            t = time.perf_counter()
            cpu = time.thread_time()
            for g in range(0, len(raws), PREPARE_GROUP):
                if paced:
                    pace(t, g)
                items = []
                for i, r in enumerate(raws[g:g + PREPARE_GROUP]):
                    items.append(parser.build(parser.head(g + i, r), defer=True))
                    time.sleep(0)  # the GIL offered after each line, as flashgen.jobs.source.Prepared does
                parser.encode_pending(items)
            cpu_ms[0] = 1e3 * (time.thread_time() - cpu) / len(raws)
            return time.perf_counter() - t

        cpu_ms = [0.0]  # the preparing thread's CPU time a line in the last run (GIL held, less the tokenizer's)
        alone = prepare_all(paced=False)
        print(f"{len(raws)} extract lines prepared in {alone:.2f} s on one thread ({1e3 * alone / len(raws):.2f} ms "
              "a line)")
        stop = threading.Event()
        idle = threading.Thread(target=lambda: (time.sleep(1.0), stop.set()))
        idle.start()
        base = lateness(stop)
        idle.join()
        print(f"{'switch interval':<18}{'mean late':>11}{'p90':>9}{'max':>9}{'waits':>7}{'late/s':>8}{'prep s':>8}"
              f"{'thread CPU/line':>17}")

        def row(name: str, late: list[float], prep_s: str, span: float = 1.0) -> None:
            p90 = sorted(late)[9 * len(late) // 10]
            print(f"{name:<18}{1e3 * statistics.fmean(late):>9.3f}ms{1e3 * p90:>7.3f}ms{1e3 * max(late):>7.2f}ms"
                  f"{len(late):>7}{1e3 * sum(late) / span:>8.1f}{prep_s}")

        def beside(name: str, prepare: Callable[[], float]) -> None:
            """`prepare` on a thread, the lateness measured meanwhile: one row."""
            done = threading.Event()
            took: list[float] = []

            def run() -> None:
                took.append(prepare())
                done.set()

            prep = threading.Thread(target=run)
            prep.start()
            late = lateness(done)
            prep.join()
            row(name, late, f"{took[0]:>8.2f}{cpu_ms[0]:>14.3f} ms", took[0])

        row("(no preparation)", base, "")
        for si in (0.005, 0.001, 0.0005):
            sys.setswitchinterval(si)
            beside(f"{si * 1e3:g} ms", prepare_all)
        sys.setswitchinterval(0.005)
        if a.workers:
            pool = PreparePool(parser, a.workers)
            pool._up.result(120)

            def pooled() -> float:
                t = time.perf_counter()
                cpu = time.thread_time()
                flight: deque = deque()
                for g in range(0, len(raws), PREPARE_GROUP):
                    pace(t, g)
                    group = list(enumerate(raws[g:g + PREPARE_GROUP], g))
                    for lineno, raw in group:
                        parser.head(lineno, raw)
                    flight.append(pool.submit(group))
                    if len(flight) == 4:
                        flight.popleft().result()
                for f in flight:
                    f.result()
                cpu_ms[0] = 1e3 * (time.thread_time() - cpu) / len(raws)
                return time.perf_counter() - t

            pooled()  # the workers warm
            beside(f"{a.workers} workers, 5 ms", pooled)
            pool.close()


if __name__ == "__main__":
    main()
