"""Training objectives, one self-contained file each (see docs/adding_an_objective.md).

A module here that declares ``@register class X(Objective)`` is found without being listed anywhere.
"""
from __future__ import annotations

from sslpt.engine.registry import get, names, register

from .base import EvalOutput, Objective, StepContext


def build_objective(cfg) -> Objective:
    """The objective that ``cfg.objective`` configures, built for ``cfg.model``."""
    return get(cfg.objective.name)(cfg.objective, cfg.model)


__all__ = ["EvalOutput", "Objective", "StepContext", "build_objective", "get", "names", "register"]
