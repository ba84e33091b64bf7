"""Rotation prediction (Gidaris et al., 2018) as a plugin objective: the worked example of
docs/adding_an_objective.md. Each image is turned by a random multiple of 90 degrees and the encoder's
pooled feature, through a linear head, classifies the turn."""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt.engine.config import ObjectiveSettings, require
from sslpt.engine.models.vit import build_vit, vit_flops
from sslpt.engine.objectives import EvalOutput, Objective, StepContext, register


@dataclass(kw_only=True)
class RotationSettings(ObjectiveSettings):
    turns: Literal[2, 4] = 4            # 2: 0 / 180 degrees only
    pooling: Literal["cls", "mean"] = "cls"
    label_smoothing: float = 0.0

    def check(self, cfg) -> None:
        require(0 <= self.label_smoothing < 1,
                f"{self.key('label_smoothing')} must be in [0, 1), got {self.label_smoothing}")
        require(cfg.model.img_size > 1, "model.img_size must be > 1 for a rotation to be visible")


@register
class Rotation(Objective):
    name = "rotation"
    Settings = RotationSettings

    def __init__(self, settings: RotationSettings, model):
        super().__init__(settings, model)
        self.net = nn.ModuleDict({"encoder": build_vit(model),
                                  "head": nn.Linear(model.dims[0], settings.turns)})

    @property
    def trainable(self) -> nn.Module:
        return self.net

    @property
    def encoder(self) -> nn.Module:
        return self.net["encoder"]

    def rotate(self, imgs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(self.settings.turns, (imgs.shape[0],), generator=generator, device=imgs.device)
        quarter_turns = labels * (4 // self.settings.turns)
        turned = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(imgs, quarter_turns)])
        return turned, labels

    def pooled(self, imgs: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(imgs)
        return tokens[:, 0] if self.settings.pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        turned, labels = self.rotate(imgs, ctx.generator)
        logits = self.net["head"](self.pooled(turned))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.label_smoothing)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"loss_rotation": loss.detach(), "accuracy": accuracy.detach()}

    def flops_per_image(self) -> float:
        return 3 * vit_flops(self.encoder)

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> EvalOutput:
        turned, labels = self.rotate(imgs, generator)
        accuracy = (self.net["head"](self.pooled(turned)).argmax(dim=1) == labels).float().mean()
        return EvalOutput(metrics={"val_rotation_accuracy": float(accuracy)})
