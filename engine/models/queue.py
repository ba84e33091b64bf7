"""A first-in first-out queue of key features (MoCo v2, DenseCL): negatives from earlier steps.

The features and the write pointer are buffers, so a checkpoint holds the queue and a resumed run contrasts
against exactly the keys the uninterrupted one would have. Under torch.distributed every rank enqueues the
keys of all ranks (gathered in rank order), so the queues of all ranks stay identical without ever being
communicated themselves; they must start identical too (DDP broadcasts buffers when it wraps the model).

Wrap-around is handled: a batch that runs past the end continues at the start, so the size need not be a
multiple of the global batch (the official MoCo / DenseCL code asserts that it is). A global batch larger than
the queue is refused: it would overwrite its own keys.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def gather_from_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank of the default group concatenated in rank order (no gradient); ``x`` itself alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


class FeatureQueue(nn.Module):
    """``size`` unit vectors of width ``dim``; starts as random unit vectors, as MoCo's queues do."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"FeatureQueue needs dim >= 1 and size >= 1, got dim={dim}, size={size}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` [n, dim] of this rank and those of every other rank."""
        if keys.dim() != 2 or keys.shape[1] != self.features.shape[1]:
            raise ValueError(f"keys must have shape [n, {self.features.shape[1]}], got {list(keys.shape)}")
        keys = gather_from_ranks(keys.detach().to(self.features.dtype))
        if keys.shape[0] > self.size:
            raise ValueError(f"a global batch of {keys.shape[0]} keys does not fit a queue of {self.size}: "
                             f"make the queue at least as large as the global batch")
        slots = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.features.index_copy_(0, slots, keys)
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.size)


__all__ = ["FeatureQueue", "gather_from_ranks"]
