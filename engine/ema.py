"""Exponential moving average teachers (HPM's timm ``ModelEma``, MoCo's momentum encoder), updated in place.

The teacher holds copies of the student's parameters and buffers except those under
``skip`` (HPM's teacher never uses the reconstruction decoder: not copying it saves
its memory and its forward pass). ``update`` runs one fused ``_foreach_lerp_``.

Under FSDP2 the teacher's blocks are sharded exactly like the student's (each parameter split
on dim 0 over the same mesh), so the update is a lerp of local shards: no gather, no communication.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from sslpt.engine.distributed import local_tensor as _local

# name parts added by wrappers (torch.compile, activation checkpointing) that are not part of a parameter's identity
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, skip: tuple[str, ...] = ()):
        super().__init__()
        model = copy.deepcopy(student)
        for name in skip:
            setattr(model, name, None)
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self._student = (student,)   # a tuple, so the student is not registered as a submodule
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] | None = None
        self._buffer_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def rebind(self) -> None:
        """Pair teacher and student tensors again (after sharding or wrapping replaced the student's)."""
        self._pairs = None

    def _bind(self) -> None:
        student = self._student[0]
        student_params = {canonical_name(n): p for n, p in student.named_parameters()}
        student_buffers = {canonical_name(n): b for n, b in student.named_buffers()}
        self._pairs = [(p, student_params[canonical_name(n)]) for n, p in self.model.named_parameters()]
        self._buffer_pairs = [(b, student_buffers[canonical_name(n)]) for n, b in self.model.named_buffers()]
        for t, s in self._pairs:
            assert _local(t).shape == _local(s).shape, "teacher and student must be sharded alike"

    def train(self, mode: bool = True):
        # the teacher always stays in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student (on this rank's shards under FSDP)."""
        if self._pairs is None:
            self._bind()
        teacher = [_local(t) for t, _ in self._pairs]
        student = [_local(s).detach() for _, s in self._pairs]
        torch._foreach_lerp_(teacher, student, 1.0 - decay)
        for t, s in self._buffer_pairs:
            t.copy_(s)


def rebind_teachers(module: nn.Module) -> None:
    """Re-pair every EMA teacher inside ``module`` with its student's tensors: after FSDP sharding, DDP or
    SyncBatchNorm conversion replaced them, and after a checkpoint was loaded."""
    for child in module.modules():
        if isinstance(child, EMATeacher):
            child.rebind()


def cosine_momentum(progress: float, total: float, base: float, cosine: bool = True) -> float:
    """MoCo v3's and DINO's per-iteration teacher momentum at ``progress`` (epochs, may be fractional) of
    ``total``: 1 - (1 - base) * (1 + cos(pi * progress / total)) / 2, from ``base`` to 1 (``base`` if not cosine)."""
    if not cosine:
        return base
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * min(progress / total, 1.0))) / 2


def ema_decay(epoch: float, total_epochs: int, start: float, end: float, ramp_epochs: int) -> float:
    """HPM's per-epoch decay: linear from ``start`` to ``end`` over the ramp, then flat (``epoch`` may be
    fractional, for a decay that moves every step).

    Official: 0.999 + epoch / 100 * (0.9999 - 0.999) for epoch < 100. Runs shorter than
    ``ramp_epochs`` ramp over their whole length instead, so they still end at ``end``.
    """
    ramp = min(ramp_epochs, total_epochs)
    if ramp <= 0 or epoch >= ramp:
        return end
    return start + epoch / ramp * (end - start)
