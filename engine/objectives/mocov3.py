"""MoCo v3 (Chen, Xie and He, 2021) on a ViT: no queue, in-batch keys, a momentum encoder and a predictor.

Per step: two views (BYOL's asymmetric augmentations); the base branch (encoder -> 3-layer projector ->
2-layer predictor) gives queries q1, q2; the momentum branch (encoder -> projector, an exponential moving
average of the base ones, no predictor) gives keys k1, k2 without gradient. As the official code:

    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2 tau * InfoNCE(q, k)   (tau = 0.2)

with the keys of all ranks as negatives under torch.distributed (``kernels.info_nce(group=...)``). Two
one-direction calls, not ``symmetric=True``: that would also contrast k2 against q1 as keys, a different loss.
The momentum branch runs with batch statistics in its BatchNorms, as the official one does (it is a module in
training mode there); the views go through each branch's ViT as one batch, and through its MLPs one view at
a time so their BatchNorm statistics are per view, as in the official code.

Momentum schedule (``moco_momentum``): m = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2, from m0 to 1, with T the
number of epochs. The official code steps it per iteration (t = epoch + i / iterations per epoch) and updates
the momentum branch at the start of each step, before its keys; we update after each optimizer step with the
t of the next step, the same sequence of values and updates. The loop does not tell objectives how many steps
an epoch has: where it sets ``steps_per_epoch`` the schedule is per iteration, otherwise per epoch (t = epoch,
the value of the epoch's first step; the difference is under (1 - m0) * pi / T per step).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.data.views import two_views
from engine.ema import EMATeacher
from engine.models.heads import mlp_flops, sync_batchnorm_if_distributed

from . import register
from .base import Objective, StepContext
from .simclr import ContrastiveNet, distributed_group, uses_gpu, view_specs


def moco_momentum(progress: float, total: float, base: float, cosine: bool = True) -> float:
    """MoCo v3's momentum at ``progress`` (epochs, may be fractional) of ``total``: cosine from ``base`` to 1."""
    if not cosine:
        return base
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * min(progress / total, 1.0))) / 2


@register("mocov3")
class MoCoV3(Objective):
    steps_per_epoch: int | None = None  # set by the loop for a per-iteration momentum schedule

    def __init__(self, cfg):
        super().__init__()
        o = cfg.objective
        self.cfg = cfg
        self.temperature = o.temperature
        self.base_momentum, self.cosine = o.momentum, o.momentum_cosine
        self.total_epochs = cfg.train.epochs
        self.views = view_specs(o)
        self.model = sync_batchnorm_if_distributed(ContrastiveNet(cfg, predictor=True), uses_gpu(cfg))
        self.teacher = EMATeacher(self.model, skip=("predictor",))   # the momentum encoder + projector
        self.momentum = moco_momentum(0, self.total_epochs, self.base_momentum, self.cosine)
        self._last_step = -1

    @property
    def trainable(self) -> nn.Module:
        return self.model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def on_epoch_start(self, epoch: int) -> None:
        if self.steps_per_epoch is None:
            self.momentum = moco_momentum(epoch, self.total_epochs, self.base_momentum, self.cosine)

    def after_optimizer_step(self, epoch: int) -> None:
        if self.steps_per_epoch is not None:
            progress = (self._last_step + 1) / self.steps_per_epoch
            self.momentum = moco_momentum(progress, self.total_epochs, self.base_momentum, self.cosine)
        self.teacher.update(self.momentum)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return 2 * self.temperature * kernels.info_nce(q, k, self.temperature, group=distributed_group())

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        self._last_step = ctx.step
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
        return loss, {"loss_contrastive": loss.detach(), "positive_cos": positive_cos,
                      "momentum": torch.tensor(self.momentum, device=loss.device)}

    def flops_per_image(self) -> float:
        net = self.model
        student = net.encoder_flops() + mlp_flops(net.projector) + mlp_flops(net.predictor)
        teacher = net.encoder_flops() + mlp_flops(net.projector)
        return 2 * (3 * student + teacher)
