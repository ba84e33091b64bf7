"""MoCo v3 (Chen, Xie and He, 2021; github.com/facebookresearch/moco-v3) on a ViT: no queue, in-batch keys,
a momentum encoder and a predictor.

Per step: two views (BYOL's asymmetric augmentations); the base branch (encoder -> 3-layer projector ->
2-layer predictor) gives queries q1, q2; the momentum branch (encoder -> projector, an exponential moving
average of the base ones, no predictor) gives keys k1, k2 without gradient. As the official code:

    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2 tau * InfoNCE(q, k)   (tau = 0.2)

with the keys of all ranks as negatives under torch.distributed (``kernels.info_nce(group=...)``). Two
one-direction calls, not ``symmetric=True``: that would also contrast k2 against q1 as keys, a different loss.
The momentum branch runs with batch statistics in its BatchNorms, as the official one does (it is a module in
training mode there); the views go through each branch's ViT as one batch, and through its MLPs one view at
a time so their BatchNorm statistics are per view, as in the official code.

Momentum (``engine.ema.cosine_momentum``): m = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2, from m0 to 1 over the T epochs,
stepped per iteration (t = epoch + i / iterations per epoch). The official code updates the momentum branch at
the start of each step, before its keys; we update it after each optimizer step with the t of the next step:
the same sequence of values and updates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import is_resnet, require
from sslpt.engine.data.views import two_views
from sslpt.engine.distributed import negatives_group
from sslpt.engine.ema import EMATeacher, cosine_momentum
from sslpt.engine.models.contrastive import ContrastiveNet, ContrastiveSettings
from sslpt.engine.registry import register

from .base import Objective, StepContext


@dataclass(kw_only=True)
class MoCoV3Settings(ContrastiveSettings):
    pred_hidden: int = 4096         # the 2-layer predictor of the base branch
    momentum: float = 0.99          # momentum encoder: cosine from this to 1 (momentum_cosine)
    momentum_cosine: bool = True
    stop_grad_patch_embed: bool = False  # a random, frozen patch projection (stabilises ViT training)

    def check(self, cfg) -> None:
        super().check(cfg)
        require(self.pred_hidden >= 1, f"{self.key('pred_hidden')} must be >= 1, got {self.pred_hidden}")
        require(0.0 <= self.momentum <= 1.0, f"{self.key('momentum')} must be in [0, 1], got {self.momentum}")
        require(not (self.stop_grad_patch_embed and is_resnet(cfg.model)), f"{self.key('stop_grad_patch_embed')} "
                f"freezes a ViT's patch embedding; model.arch={cfg.model.arch!r} is a ResNet: set it to false")


@register
class MoCoV3(Objective):
    name = "mocov3"
    Settings = MoCoV3Settings
    presets = ("mocov3_digits",)

    def __init__(self, settings: MoCoV3Settings, model):
        super().__init__(settings, model)
        self.temperature = settings.temperature
        self.views = settings.view_specs()
        self.model = ContrastiveNet(settings, model, pred_hidden=settings.pred_hidden,
                                    frozen_patch_embed=settings.stop_grad_patch_embed)
        self.teacher = EMATeacher(self.model, skip=("predictor",))   # the momentum encoder + projector

    def momentum(self, progress: float, epochs: int) -> float:
        return cosine_momentum(progress, epochs, self.settings.momentum, self.settings.momentum_cosine)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.teacher.update(self.momentum((ctx.step + 1) / ctx.steps_per_epoch, ctx.epochs))

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return 2 * self.temperature * kernels.info_nce(q, k, self.temperature, group=negatives_group())

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        view1, view2 = two_views(imgs, ctx.generator, *self.views)
        both = torch.cat([view1, view2])
        net = self.model
        q1, q2 = (net.predictor(net.projector(h)) for h in net.features(both).chunk(2))
        with torch.no_grad():
            teacher = self.teacher.model
            teacher.train(self.training)   # batch statistics in the momentum branch's BatchNorms
            k1, k2 = (teacher.projector(h) for h in teacher.features(both).chunk(2))
        loss = self.contrast(q1, k2) + self.contrast(q2, k1)
        with torch.no_grad():
            positive_cos = 0.5 * (F.cosine_similarity(q1.float(), k2.float(), dim=1).mean()
                                  + F.cosine_similarity(q2.float(), k1.float(), dim=1).mean())
        # the momentum the keys were computed with (the update after the previous step used this step's t)
        momentum = self.momentum(ctx.progress, ctx.epochs)
        return loss, {"loss_contrastive": loss.detach(), "positive_cos": positive_cos,
                      "momentum": torch.tensor(momentum, device=loss.device)}

    def flops_per_image(self) -> float:
        return 2 * (3 * self.model.flops() + self.model.flops(with_predictor=False))
