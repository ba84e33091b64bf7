"""Helpers shared by test modules: a free local TCP port for a gloo process group, and N ranks spawned on it."""
from __future__ import annotations

import socket
import warnings

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, *args, nprocs: int = 2) -> None:
    """Run ``worker(rank, port, *args)`` in ``nprocs`` processes that share one free port; raises if any fails.

    A rank killed by a signal (gloo has aborted a rank with "terminate called without an active exception" about
    once in ten CI runs) gets one more try on a fresh port; an exception raised by the worker's own code never
    does, so a real failure still fails on its first run."""
    try:
        mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
    except mp.ProcessExitedException as err:
        if err.signal_name is None:
            raise
        warnings.warn(f"rank {err.error_index} died of {err.signal_name}; running the {nprocs} ranks once more")
        mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)


def as_ddp(result: dict, mean_keys, row_keys, world: int) -> None:
    """In place, what DDP would hold: ``mean_keys`` averaged over the ranks, ``row_keys`` (each rank's gradient of
    its own rows) concatenated in rank order. Call on every rank of the default group."""
    import torch
    import torch.distributed as dist

    for key in mean_keys:
        dist.all_reduce(result[key])
        result[key] /= world
    for key in row_keys:
        parts = [torch.empty_like(result[key]) for _ in range(world)]
        dist.all_gather(parts, result[key].contiguous())
        result[key] = torch.cat(parts)
