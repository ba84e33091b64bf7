"""Helpers shared by test modules: a free local TCP port for a gloo process group, and N ranks spawned on it."""
from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, *args, nprocs: int = 2) -> None:
    """Run ``worker(rank, port, *args)`` in ``nprocs`` processes that share one free port; raises if any fails."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
