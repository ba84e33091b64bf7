"""The interface every objective implements."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class StepContext:
    epoch: int
    step: int                    # global optimizer-independent micro-step index
    generator: torch.Generator   # this step's random stream, derived from (seed, epoch, step, rank)


class Objective(nn.Module):
    name = "objective"

    @property
    def trainable(self) -> nn.Module:
        raise NotImplementedError

    @property
    def encoder(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, imgs: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self, epoch: int) -> None:
        pass

    def flops_per_image(self) -> float:
        """Analytic training FLOPs per image (forward + backward), for MFU."""
        return 0.0

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """Tensors for pictures and eval metrics on a fixed batch (objective-specific)."""
        return {}
