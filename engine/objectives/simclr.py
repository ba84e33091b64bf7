"""SimCLR (Chen et al., 2020; github.com/google-research/simclr) on a ViT: two augmented views of every image,
the encoder's pooled feature (cls token or mean of the patch tokens), a projection MLP, and NT-Xent over the 2N
views (``kernels.nt_xent``, which never forms the 2N x 2N similarity matrix on its Triton path).

The views are made here, on the device, from the batch the loop hands over, with the step's generator, so the
data pipeline's own crop must be off. Both views go through the encoder and the projector as one batch of 2N,
as SimCLR's code does, so the projector's BatchNorm sees both. Under torch.distributed the negatives are all
ranks' views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.data.views import two_views
from sslpt.engine.distributed import negatives_group
from sslpt.engine.models.contrastive import ContrastiveNet, ContrastiveSettings
from sslpt.engine.registry import register

from .base import Objective, StepContext


@dataclass(kw_only=True)
class SimCLRSettings(ContrastiveSettings):
    pass


@register
class SimCLR(Objective):
    name = "simclr"
    Settings = SimCLRSettings
    presets = ("simclr_digits",)

    def __init__(self, settings: SimCLRSettings, model):
        super().__init__(settings, model)
        self.temperature = settings.temperature
        self.views = settings.view_specs()
        self.model = ContrastiveNet(settings, model)

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        view1, view2 = two_views(imgs, ctx.generator, *self.views)
        z1, z2 = self.model.projector(self.model.features(torch.cat([view1, view2]))).chunk(2)
        loss = kernels.nt_xent(z1, z2, self.temperature, group=negatives_group())
        with torch.no_grad():
            positive_cos = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
        return loss, {"loss_contrastive": loss.detach(), "positive_cos": positive_cos}

    def flops_per_image(self) -> float:
        return 3 * 2 * self.model.flops()
