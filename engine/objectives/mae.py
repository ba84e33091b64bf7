"""MAE (OBJECTIVES.md section 1): random masking, encoder on the visible patches, an
MAE decoder, per-patch (normalised-)pixel MSE on the masked patches."""
from __future__ import annotations

import torch

import kernels
from engine.models.mae import MaskedAutoencoder
from engine.models.vit import encoder_flops

from . import register
from .base import Objective, StepContext


def decoder_flops(cfg, tokens: int) -> float:
    m = cfg.model
    d = m.decoder_dim
    per_token = 2 * (4 + 2 * m.mlp_ratio) * d * d + 4 * tokens * d
    return m.decoder_depth * tokens * per_token + 2 * tokens * d * m.patch_dim


@register("mae")
class MAE(Objective):
    loss_predictor = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.mask_ratio = cfg.objective.mask_ratio
        self.norm_pix = cfg.objective.norm_pix
        self.model = MaskedAutoencoder(cfg.model, loss_predictor=self.loss_predictor)

    @property
    def trainable(self):
        return self.model

    @property
    def encoder(self):
        return self.model.encoder

    def masking(self, imgs: torch.Tensor, ctx: StepContext) -> kernels.Masking:
        return kernels.random_masking(imgs.shape[0], self.model.num_patches, self.mask_ratio,
                                      generator=ctx.generator, device=imgs.device)

    def reconstruct(self, imgs: torch.Tensor, masking: kernels.Masking):
        """(pred [B,L,P], per-patch loss [B,L], mean masked loss, decoder input)."""
        latent = self.model.encode(imgs, masking.ids_keep)
        h = self.model.decoder_input(latent, masking.ids_keep)
        pred = self.model.reconstruct(h)
        target = kernels.patchify(imgs, self.model.patch_size)
        loss, per_patch = kernels.patch_loss(pred, target, masking.mask, norm_pix=self.norm_pix)
        return pred, per_patch, loss, h

    def forward(self, imgs, ctx):
        masking = self.masking(imgs, ctx)
        _, _, loss, _ = self.reconstruct(imgs, masking)
        return loss, {"loss_rec": loss.detach()}

    def flops_per_image(self) -> float:
        m = self.cfg.model
        width, depth, _ = m.dims
        keep = kernels.masking.num_visible(m.num_patches, self.mask_ratio)
        fwd = encoder_flops(width, depth, m.mlp_ratio, keep + 1, m.patch_dim, keep)
        fwd += decoder_flops(self.cfg, m.num_patches + 1)
        return 3 * fwd

    @torch.no_grad()
    def evaluate(self, imgs, generator):
        masking = kernels.random_masking(imgs.shape[0], self.model.num_patches, self.mask_ratio,
                                         generator=generator, device=imgs.device)
        pred, per_patch, loss, _ = self.reconstruct(imgs, masking)
        return {"imgs": imgs, "mask": masking.mask, "pred": pred, "true_loss": per_patch,
                "metrics": {"val_loss_rec": float(loss)}}
