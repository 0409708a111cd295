"""Tensor-parallel transport: the worker processes, the process group, and the step broadcast.

Rank 0 is the engine's own ModelRunner. It starts ranks 1..N-1 here, each a process running
model_runner.run_worker (a ModelRunner of its own: its slice of the weights, its heads' KV cache), and
broadcasts every step as one packed int64 tensor; the workers run the same forward (its all-reduces pair up
across ranks) and drop the logits. Only rank 0 schedules, samples, reads input and writes output. This module
knows nothing of models or runners.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import socket
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from flashgen.engine.step_packing import STEP_DTYPE

STOP, STEP = 0, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config) -> str:
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def join_group(config, rank: int, port: int) -> None:
    dist.init_process_group(_backend(config), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.tensor_parallel_size)


def start_workers(config, target: Callable, args: tuple) -> list:
    """Spawn ranks 1..N-1 as `target(*args, rank, port)` and join the group as rank 0."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, args=(target, args, r, port), daemon=True)
             for r in range(1, config.tensor_parallel_size)]
    for p in procs:
        p.start()
    join_group(config, 0, port)
    atexit.register(lambda: stop_workers(procs, None))
    return procs


def _worker_entry(target: Callable, args: tuple, rank: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    target(*args, rank, port)


def _comm_device(device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_step(buf: torch.Tensor, device) -> None:
    """Rank 0: send one packed step to every worker."""
    dev = _comm_device(device)
    dist.broadcast(torch.tensor([STEP, buf.numel()], device=dev), 0)
    dist.broadcast(buf.to(dev), 0)


def receive_steps(device) -> Iterator[torch.Tensor]:
    """A worker: each packed step rank 0 broadcasts, until it says stop."""
    dev = _comm_device(device)
    while True:
        meta = torch.empty(2, dtype=torch.int64, device=dev)
        dist.broadcast(meta, 0)
        cmd, n = meta.tolist()
        if cmd == STOP:
            return
        buf = torch.empty(n, dtype=STEP_DTYPE, device=dev)
        dist.broadcast(buf, 0)
        yield buf


def leave_group() -> None:
    dist.destroy_process_group()


def stop_workers(procs: list, device) -> None:
    if not dist.is_initialized():
        return
    try:
        dev = _comm_device(device if device is not None else torch.device("cuda", 0))
        dist.broadcast(torch.tensor([STOP, 0], device=dev), 0)
        for p in procs:
            p.join(timeout=30)
    finally:
        dist.destroy_process_group()
