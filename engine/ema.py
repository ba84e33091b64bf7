"""Exponential moving average teachers (HPM's timm ``ModelEma``), updated in place.

The teacher holds copies of the student's parameters and buffers except those under
``skip`` (HPM's teacher never uses the reconstruction decoder: not copying it saves
its memory and its forward pass). ``update`` runs one fused ``_foreach_lerp_``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, skip: tuple[str, ...] = ()):
        super().__init__()
        model = copy.deepcopy(student)
        for name in skip:
            setattr(model, name, None)
        model.requires_grad_(False)
        model.eval()
        self.model = model
        student_params = dict(student.named_parameters())
        student_buffers = dict(student.named_buffers())
        self._pairs = [(p, student_params[n]) for n, p in model.named_parameters()]
        self._buffers_pairs = [(b, student_buffers[n]) for n, b in model.named_buffers()]

    def train(self, mode: bool = True):
        # the teacher always stays in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student."""
        teacher = [t for t, _ in self._pairs]
        student = [s.detach() for _, s in self._pairs]
        torch._foreach_lerp_(teacher, student, 1.0 - decay)
        for t, s in self._buffers_pairs:
            t.copy_(s)


def ema_decay(epoch: int, total_epochs: int, start: float, end: float, ramp_epochs: int) -> float:
    """HPM's per-epoch decay: linear from ``start`` to ``end`` over the ramp, then flat.

    Official: 0.999 + epoch / 100 * (0.9999 - 0.999) for epoch < 100. Runs shorter than
    ``ramp_epochs`` ramp over their whole length instead, so they still end at ``end``.
    """
    ramp = min(ramp_epochs, total_epochs)
    if ramp <= 0 or epoch >= ramp:
        return end
    return start + epoch / ramp * (end - start)
