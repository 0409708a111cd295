"""Tensor-parallel worker processes.

Rank 0 is the engine's own ModelRunner. It starts ranks 1..N-1 here, each a process with a ModelRunner of its
own (its slice of the weights, its heads' KV cache), and broadcasts every step as one packed int64 tensor; the
workers run the same forward (its all-reduces pair up across ranks) and drop the logits. Only rank 0 schedules,
samples, reads input and writes output.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import socket

import torch
import torch.distributed as dist

STOP, STEP = 0, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config) -> str:
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _init(config, rank: int, port: int) -> None:
    dist.init_process_group(_backend(config), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.tensor_parallel_size)


def start_workers(config, model_dir: str, spec, eos_ids: set[int]) -> list:
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(config, model_dir, spec, eos_ids, r, port), daemon=True)
             for r in range(1, config.tensor_parallel_size)]
    for p in procs:
        p.start()
    _init(config, 0, port)
    atexit.register(lambda: stop_workers(procs, None))
    return procs


def _comm_device(device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_step(buf: torch.Tensor, device) -> None:
    dev = _comm_device(device)
    dist.broadcast(torch.tensor([STEP, buf.numel()], device=dev), 0)
    dist.broadcast(buf.to(dev), 0)


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


def worker_main(config, model_dir: str, spec, eos_ids: set[int], rank: int, port: int) -> None:
    from flashgen.engine.model_runner import ModelRunner

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _init(config, rank, port)
    runner = ModelRunner(config, model_dir, spec, eos_ids, rank=rank)
    dev = _comm_device(runner.device)
    with torch.inference_mode():
        while True:
            meta = torch.empty(2, dtype=torch.int64, device=dev)
            dist.broadcast(meta, 0)
            cmd, n = meta.tolist()
            if cmd == STOP:
                break
            buf = torch.empty(n, dtype=torch.int64, device=dev)
            dist.broadcast(buf, 0)
            runner._execute(buf)
    dist.destroy_process_group()
