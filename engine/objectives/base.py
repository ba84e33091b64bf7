"""What the trainer and an objective know of each other, and nothing more.

An objective is an ``nn.Module`` that owns its networks (students, EMA teachers, heads). The trainer calls:

- ``forward(imgs, ctx) -> (loss, metrics)`` for each micro-step, under autocast;
- ``on_epoch_start(ctx)``, ``before_optimizer_step(ctx)`` and ``after_optimizer_step(ctx)`` (schedules, frozen
  layers, EMA updates);
- ``optimizers(optim_cfg, lr)`` once, to build its optimizers (one by default; an objective that trains
  several models with their own optimizers returns several);
- ``evaluate(imgs, generator) -> EvalOutput`` on a fixed held-out batch;
- ``encoder`` (what the probe measures) and ``random_encoder(...)`` (the same-shaped untrained baseline).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from sslpt.engine.config import ModelConfig, ObjectiveSettings, OptimConfig
from sslpt.engine.optim import build_optimizer


@dataclass(frozen=True)
class StepContext:
    """Where the run is, handed to every hook."""
    epoch: int                    # 0-based
    step: int                     # global micro-step index: epoch * steps_per_epoch + index in the epoch
    steps_per_epoch: int
    epochs: int                   # the run's length, for schedules (train.epochs)
    generator: torch.Generator    # this step's random stream, a function of (seed, epoch, step, rank)

    @property
    def progress(self) -> float:
        """Epochs completed before this step, fractional (e.g. 2.25)."""
        return self.step / self.steps_per_epoch


@dataclass
class EvalOutput:
    """An objective's evaluation of a held-out batch: metrics for the log, tensors for the pictures.

    Reconstruction objectives fill the tensors: ``prediction`` is per patch in the objective's target space
    (``prediction_normalized``: each patch standardised, as with MAE's norm_pix); ``patch_scores`` is a
    per-patch heat map the objective wants shown next to ``patch_losses`` (HPM: predicted vs actual loss).
    ``pictures`` are any further figures: name -> a function that writes a PNG at the path it is given
    (the trainer calls it on rank 0 with ``pictures/<name>_epochNNNN.png``).
    """
    metrics: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None            # [B, C, H, W]
    mask: torch.Tensor | None = None              # [B, L], True / 1 = masked
    prediction: torch.Tensor | None = None        # [B, L, patch_dim]
    prediction_normalized: bool = False
    patch_losses: torch.Tensor | None = None      # [B, L]
    patch_scores: torch.Tensor | None = None      # [B, L]
    hard_mask: torch.Tensor | None = None         # [B, L] the masked patches chosen as hard (HPM)
    caption: str = ""                             # one line for the panel (the trainer adds the epoch)
    row_notes: list[str] | None = None            # a short note per image of the panel
    pictures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


class Objective(nn.Module):
    """Subclasses declare ``name``, ``Settings`` (an ObjectiveSettings dataclass), ``presets`` (names of
    files in configs/) and are registered with ``@register``; ``__init__(settings, model)`` builds them."""
    name: ClassVar[str] = ""
    Settings: ClassVar[type[ObjectiveSettings]] = ObjectiveSettings
    presets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ObjectiveSettings, model: ModelConfig):
        super().__init__()
        self.settings = settings
        self.model_cfg = model

    @property
    def trainable(self) -> nn.Module:
        """The module whose parameters the default optimizer updates (activation checkpointing wraps its
        blocks); by default the objective's ``model`` attribute."""
        return self.model

    @property
    def encoder(self) -> nn.Module:
        """The network the probe measures, with ``features(imgs, pool)`` (pool ``cls`` or ``mean``); by
        default ``model.encoder``."""
        return self.model.encoder

    @classmethod
    def random_encoder(cls, settings: ObjectiveSettings, model: ModelConfig) -> nn.Module:
        """An untrained encoder of the same shape, built as the objective builds its own (the probe's baseline)."""
        return cls(settings, model).encoder

    def optimizers(self, optim_cfg: OptimConfig, lr: float) -> list[torch.optim.Optimizer]:
        """The optimizers the trainer steps, in order. The schedule sets each group's lr to the scheduled lr
        times the group's ``lr_scale`` (default 1)."""
        return [build_optimizer(self.trainable, optim_cfg, lr)]

    def forward(self, imgs: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Before the epoch's first step (also when a run resumes mid-epoch); ``ctx`` is that step's."""

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """After the backward of an update step, before clipping and the optimizer step (e.g. to drop the
        gradients of a layer frozen for now, as DINO's first epoch does)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """After each applied or skipped optimizer step; ``ctx`` is the step just taken."""

    def flops_per_image(self) -> float:
        """Analytic training FLOPs per image (forward + backward), for MFU; 0 = unknown."""
        return 0.0

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> EvalOutput:
        return EvalOutput()
