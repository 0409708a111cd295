"""Data parallelism: N engine processes (one per GPU, or N CPU workers), behind the LLM's incremental API.

`DataParallelLLM` looks like `LLM` to the batch job (add_request / step / has_unfinished_requests, tokenizer,
max_model_len, stats), so reading, error records, ordering, resume and exit codes stay in one place. Requests
are validated and tokenized here, in the parent, so a bad prompt raises at add_request exactly as in one
process; each goes to the worker with the least expected work (prompt + output tokens) in flight, through
bounded queues. Unseeded requests
get their seeds here, in input order, as one engine would assign them, so sampled output does not depend on N.

The workers end with `close()`, or, for an engine never closed, when it is garbage collected or at the latest when
the interpreter exits (a multiprocessing finalizer that runs before multiprocessing's own exit handler): that
handler stops daemon processes with SIGTERM, which the workers ignore, and then waits for them without a timeout,
so a worker still serving at exit would keep the process from ever ending.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import random
import time
from multiprocessing.util import Finalize

import torch

from flashgen.config import EngineConfig
from flashgen.engine.engine import EngineStats, tokenize_prompt
from flashgen.engine.gc_heap import freeze_startup_heap
from flashgen.models.spec import load_spec
from flashgen.outputs import RequestOutput
from flashgen.sampling_params import SamplingParams
from flashgen.tokenizer import Tokenizer

READY, DONE, FAILED = "ready", "done", "failed"  # worker -> parent
ADD, ABORT = "add", "abort"                      # parent -> worker


def resolve_data_parallel(value: str | int, config: EngineConfig) -> int:
    """'auto' -> one worker per visible GPU (1 on the CPU); an int >= 1 as given."""
    if str(value) == "auto":
        on_cpu = config.device == "cpu" or not torch.cuda.is_available()
        return 1 if on_cpu else torch.cuda.device_count()
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"data_parallel = {value!r} is invalid; use a positive integer (engine processes), or auto "
                         "(one per visible GPU)")
    return n


def _worker(config: EngineConfig, rank: int, n: int, inq, outq) -> None:
    import signal

    from flashgen.llm import LLM

    # The parent owns signals (a terminal's SIGINT and Slurm's SIGTERM reach every process): it stops or drains
    # the job and then ends the workers, so a worker must not die first and turn a clean stop into a failure.
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        dev = "cpu"
    else:
        dev = f"cuda:{rank}"
    try:
        llm = LLM(config=dataclasses.replace(config, device=dev))
    except Exception as e:  # report start-up failures instead of hanging the parent
        outq.put((FAILED, rank, f"{type(e).__name__}: {e}"))
        return
    freeze_startup_heap()  # as the job's process does (flashgen.engine.gc_heap)
    outq.put((READY, rank, llm.max_model_len))
    try:
        _serve(llm, inq, outq, rank)
    finally:
        # told to stop, or the parent is gone: nobody reads what is still buffered for it, and waiting to flush it
        # into a full pipe would keep this process from ending
        outq.cancel_join_thread()


def _serve(llm, inq, outq, rank: int) -> None:
    while True:
        msgs = []
        try:
            msgs.append(inq.get(block=not llm.has_unfinished_requests(), timeout=1.0))
            while True:
                msgs.append(inq.get_nowait())
        except queue.Empty:
            parent = mp.parent_process()
            if parent is not None and not parent.is_alive():  # the parent was killed (kill -9): end too
                return
        failed = []
        for m in msgs:
            if m is None:
                return
            kind, args = m
            if kind == ABORT:
                llm.abort_request(args)
                continue
            try:
                llm.add_request(*args)
            except Exception as e:  # this request's fault only: answer it, keep serving the others
                failed.append(RequestOutput(args[0], None, [], "", [], "error", error_code="invalid_request",
                                            error=f"{type(e).__name__}: {e}"))
        if failed:
            outq.put((DONE, rank, (failed, {})))
        if llm.has_unfinished_requests():
            before = dataclasses.asdict(llm.stats)
            outs = llm.step()
            delta = {k: v - before[k] for k, v in dataclasses.asdict(llm.stats).items()}
            outq.put((DONE, rank, (outs, delta)))


class DataParallelLLM:
    def __init__(self, config: EngineConfig, num_workers: int, queue_size: int = 0):
        self.config = config
        self.n = num_workers
        if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
            if torch.cuda.device_count() < num_workers:
                raise RuntimeError(f"data_parallel={num_workers} needs as many GPUs; "
                                   f"{torch.cuda.device_count()} are visible")
        self.tokenizer = Tokenizer(config.model)
        self.spec = load_spec(config.model)
        self.stats = EngineStats()
        self._seed_rng = random.Random(config.seed)
        ctx = mp.get_context("spawn")
        depth = queue_size or 2 * config.max_num_seqs
        self._in = [ctx.Queue(depth) for _ in range(num_workers)]
        self._out = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(config, r, num_workers, self._in[r], self._out), daemon=True)
                       for r in range(num_workers)]
        self._workers = _Workers(self._procs, self._in)
        # on garbage collection, or at exit before multiprocessing stops its children (see the module docstring)
        self._finalizer = Finalize(self, self._workers.shutdown, exitpriority=100)
        for p in self._procs:
            p.start()
        self._load = [0] * num_workers         # outstanding work (tokens) per worker
        self.dispatched = [0] * num_workers    # requests sent to each worker
        self._owner: dict[str, tuple[int, int]] = {}  # request id -> (worker, its expected work)
        lens = []
        for _ in range(num_workers):
            kind, rank, payload = self._out.get()
            if kind == FAILED:
                self.close()
                raise RuntimeError(f"data-parallel worker {rank} failed to start: {payload}")
            lens.append(payload)
        self.max_model_len = min(lens)

    @property
    def model_name(self) -> str:
        return self.config.model

    def describe(self) -> str:
        return f"{self.spec.architecture} on {self.n} data-parallel engines; max_model_len {self.max_model_len:,}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in the engine; ids must be unique")
        _, ids = tokenize_prompt(self.tokenizer, prompt, self.spec.vocab_size, self.max_model_len)
        if params.seed is None:  # as one engine would: seeds drawn in input order
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        # balance expected work (prompt + output tokens), not request counts: the last worker to finish sets
        # the job's wall time
        work = len(ids) + (params.max_tokens or 256)
        rank = min(range(self.n), key=self._load.__getitem__)
        self._in[rank].put((ADD, (request_id, ids, params)))
        self._load[rank] += work
        self.dispatched[rank] += 1
        self._owner[request_id] = (rank, work)

    def abort_request(self, request_id: str) -> None:
        """Drop a queued or running request; it gives no output."""
        owner = self._owner.pop(str(request_id), None)
        if owner is not None:
            rank, work = owner
            self._load[rank] -= work
            self._in[rank].put((ABORT, str(request_id)))

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def num_unfinished_requests(self) -> int:
        return len(self._owner)

    def step(self) -> list[RequestOutput]:
        """Finished requests from any worker: waits for at least one while requests are in flight."""
        if not self._owner:
            return []
        msgs = [self._get(block=True)]
        while (m := self._get(block=False)) is not None:
            msgs.append(m)
        done = []
        for outs, delta in msgs:
            for k, v in delta.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)
            for o in outs:
                owner = self._owner.pop(o.request_id, None)
                if owner is None:  # aborted after it had finished in its worker
                    continue
                self._load[owner[0]] -= owner[1]
                done.append(o)
        return done

    def _get(self, block: bool):
        while True:
            try:
                kind, rank, payload = self._out.get(block=block, timeout=5 if block else None)
            except queue.Empty:
                if not block:
                    return None
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    code = self._procs[dead[0]].exitcode
                    raise RuntimeError(f"data-parallel worker {dead[0]} died (exit code {code}); its requests are lost "
                                       "from this run") from None
                continue
            if kind == DONE:
                return payload

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        from flashgen.llm import generate_all

        return generate_all(self, prompts, sampling_params)

    def close(self) -> None:
        """End the workers (requests still in them give no output); the object is unusable afterwards. Safe to
        call again; if it is interrupted, the finalizer still ends them at exit."""
        self._workers.shutdown()
        self._finalizer.cancel()


class _Workers:
    """The worker processes and their input queues: all that ending them needs, without the engine itself (the
    finalizer holds this, and must not keep the engine alive)."""

    def __init__(self, procs: list, inqs: list, grace: float = 10.0):
        self.procs, self.inqs, self.grace = procs, inqs, grace
        self.done = False

    def shutdown(self) -> None:
        if self.done:
            return
        for q in self.inqs:
            try:
                q.put_nowait(None)
            except (queue.Full, ValueError, OSError):  # a stuck worker, or the queue closed: it is killed below
                pass
        started = [p for p in self.procs if p.pid is not None]
        end = time.monotonic() + self.grace
        for p in started:
            p.join(max(0.0, end - time.monotonic()))
        for p in started:
            if p.is_alive():  # SIGKILL: a worker ignores SIGTERM (the parent owns signals)
                p.kill()
                p.join(5)
        for q in self.inqs:  # nobody reads them now: exit must not wait to flush them into a pipe
            q.cancel_join_thread()
            q.close()
        self.done = True
