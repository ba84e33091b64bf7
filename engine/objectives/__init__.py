"""Training objectives, one file each, registered by name.

An objective is an ``nn.Module`` owning its models (students and teachers). The loop
calls ``forward(imgs, ctx)`` -> (loss, metrics), ``on_epoch_start(epoch)`` and
``after_optimizer_step(epoch)``; ``trainable`` is the module whose parameters the
optimizer updates, ``encoder`` the network the probe evaluates.
"""
from __future__ import annotations

from .base import Objective, StepContext

OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        cls.name = name
        return cls
    return wrap


def build_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective.name](cfg)


from . import hpm, mae, mocov3, simclr  # noqa: E402,F401  (registration)

__all__ = ["OBJECTIVES", "Objective", "StepContext", "build_objective", "register"]
