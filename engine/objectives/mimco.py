"""MimCo-style masked image modelling with a frozen contrastive teacher (after Zhou, Yu, Luo, Wang and Li, "MimCo:
Masked Image Modeling Pre-training with Contrastive Teacher", ACM MM 2022).

RECONSTRUCTED, NOT REPRODUCED. No code was released. What the paper's abstract states, and this follows: two
stages; stage 1 pre-trains a contrastive model (here: a MoCo v3 run of this engine, ``mocov3_digits``); stage 2
freezes it as the teacher of a masked-image-modelling student trained with a patch-level and an image-level
reconstruction loss. Everything below that is a design choice of this engine, not a detail taken from the paper:

- the student: the engine's ViT with a learned [MASK] token, all tokens encoded; BEiT's block-wise mask at 40%;
- the teacher's features: its output patch tokens (after the final LayerNorm) and its cls token;
- patch level: for each masked token, InfoNCE (cosine / ``patch_temperature``) between ``patch_head(student
  token)`` and the teacher's token at the same position, the negatives being the teacher's other tokens of the
  same image (``patch_negatives = "image"``, one batched matmul of the small per-image logits) or of the whole
  local batch (``"batch"``, ``kernels.info_nce``);
- image level: InfoNCE between ``image_head(student cls)`` and the teacher's cls token, the other images' teacher
  cls tokens (of every rank under DDP) as negatives;
- loss = patch + ``image_weight`` * image; heads: a Linear (patch) and a 2-layer MLP (image) to the teacher width.

Call results "MimCo-style". docs/methods/mimco.md lists what to check against the paper before claiming more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import require
from sslpt.engine.distributed import negatives_group
from sslpt.engine.models.vit import vit_flops
from sslpt.engine.registry import register

from .base import EvalOutput, StepContext
from .maskdistill import FrozenTeacherObjective, FrozenTeacherSettings


@dataclass(kw_only=True)
class MimCoSettings(FrozenTeacherSettings):
    teacher_tokens: Literal["output", "pre_norm"] = "output"
    patch_temperature: float = 0.2
    image_temperature: float = 0.2
    image_weight: float = 1.0
    patch_negatives: Literal["image", "batch"] = "image"

    def check(self, cfg) -> None:
        super().check(cfg)
        key = self.key
        for name in ("patch_temperature", "image_temperature"):
            require(getattr(self, name) > 0, f"{key(name)} must be > 0, got {getattr(self, name)}")
        require(self.image_weight >= 0, f"{key('image_weight')} must be >= 0, got {self.image_weight}")


def patch_info_nce(q: torch.Tensor, k_masked: torch.Tensor, k_visible: torch.Tensor, temperature: float,
                   negatives: str) -> torch.Tensor:
    """Mean InfoNCE of the masked tokens' queries q [B, N_m, D] against the teacher's tokens: the positive is
    ``k_masked`` at the same position, the negatives the teacher's other masked and the visible (``k_visible``
    [B, K, D]) tokens of the same image (``"image"``) or of every image of the batch (``"batch"``)."""
    if negatives == "batch":
        return kernels.info_nce(q.flatten(0, 1), k_masked.flatten(0, 1), temperature,
                                queue=k_visible.flatten(0, 1))
    # Per image the logits are only N_m x L (L = tokens per image, ~200 for ViT-S/16): one batched matmul of
    # them costs less than B calls of the fused op, which pays off where the columns are many (the batch mode).
    # The same number of masked tokens in every image: the mean over all rows is the mean of per-image means.
    batch, rows = q.shape[:2]
    keys = F.normalize(torch.cat([k_masked, k_visible], dim=1).float(), dim=-1)
    logits = torch.bmm(F.normalize(q.float(), dim=-1), keys.transpose(1, 2)) / temperature   # [B, N_m, L]
    positives = torch.arange(rows, device=q.device).expand(batch, rows)
    return F.cross_entropy(logits.flatten(0, 1), positives.flatten())


@register
class MimCo(FrozenTeacherObjective):
    name = "mimco"
    Settings = MimCoSettings
    presets = ("mimco_digits", "mimco_vit_small_100ep")

    def __init__(self, settings: MimCoSettings, model):
        super().__init__(settings, model)
        width, teacher_dim = self.model.encoder.embed_dim, self.teacher.dim
        self.model.add_module("patch_head", nn.Linear(width, teacher_dim))
        self.model.add_module("image_head", nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                                          nn.Linear(width, teacher_dim)))

    def losses(self, imgs: torch.Tensor, generator: torch.Generator):
        """(loss, patch loss, image loss, mean cosine of masked predictions to their teacher tokens)."""
        s = self.settings
        masking = self.masking(imgs.shape[0], generator, imgs.device)
        t_patches, t_cls = self.teacher(imgs)
        t_patches, t_cls = t_patches.float(), t_cls.float()
        tokens = self.model(imgs, masking.mask)
        q = self.model.patch_head(kernels.gather_tokens(tokens[:, 1:], masking.ids_masked)).float()
        k_masked = kernels.gather_tokens(t_patches, masking.ids_masked)
        k_visible = kernels.gather_tokens(t_patches, masking.ids_keep)
        patch = patch_info_nce(q, k_masked, k_visible, s.patch_temperature, s.patch_negatives)
        image = kernels.info_nce(self.model.image_head(tokens[:, 0]).float(), t_cls, s.image_temperature,
                                 group=negatives_group())
        cosine = F.cosine_similarity(q.detach(), k_masked, dim=-1).mean()
        return patch + s.image_weight * image, patch, image, cosine

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        loss, patch, image, cosine = self.losses(imgs, ctx.generator)
        return loss, {"loss_patch": patch.detach(), "loss_image": image.detach(), "patch_cos": cosine}

    def flops_per_image(self) -> float:
        width, teacher_dim = self.model.encoder.embed_dim, self.teacher.dim
        heads = 2 * (self.num_masked * width * teacher_dim + width * width + width * teacher_dim)
        # the patch logits against one image's tokens (batch mode: against the batch's, batch x more)
        logits = 2 * self.num_masked * self.model.encoder.num_patches * teacher_dim
        return 3 * (vit_flops(self.model.encoder) + heads + logits) + self.teacher_flops()

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        loss, patch, image, cosine = self.losses(imgs, generator)
        return EvalOutput(metrics={"val_loss": float(loss), "val_loss_patch": float(patch),
                                   "val_loss_image": float(image), "val_patch_cos": float(cosine)})
