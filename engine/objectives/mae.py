"""MAE (He et al., 2022; github.com/facebookresearch/mae): random masking, the encoder on the visible
patches only, a light decoder over all positions, and per-patch (normalised-)pixel MSE on the masked patches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sslpt import kernels
from sslpt.engine.config import ObjectiveSettings, require, require_vit
from sslpt.engine.models.mae import MaskedAutoencoder
from sslpt.engine.models.vit import build_vit, encoder_flops
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext


@dataclass(kw_only=True)
class MAESettings(ObjectiveSettings):
    mask_ratio: float = 0.75
    norm_pix: bool = False          # targets standardised per patch (MAE's released ViT recipes: true)

    def check(self, cfg) -> None:
        require_vit(cfg, self.name)
        m = cfg.model
        require(0.0 < self.mask_ratio < 1.0, f"{self.key('mask_ratio')} must be in (0, 1), got {self.mask_ratio}: "
                f"with no masked patch there is nothing to reconstruct (the loss would be 0)")
        require(kernels.masking.num_visible(m.num_patches, self.mask_ratio) >= 1,
                f"{self.key('mask_ratio')}={self.mask_ratio} leaves no visible patch of {m.num_patches}")
        require(not self.norm_pix or m.patch_dim >= 2,
                f"{self.key('norm_pix')} needs at least 2 values per patch (model.patch_size**2 * in_chans)")


def decoder_flops(model, tokens: int) -> float:
    d = model.decoder_dim
    per_token = 2 * (4 + 2 * model.mlp_ratio) * d * d + 4 * tokens * d
    return model.decoder_depth * tokens * per_token + 2 * tokens * d * model.patch_dim


@register
class MAE(Objective):
    name = "mae"
    Settings = MAESettings
    presets = ("mae_digits", "mae_vit_base_1600ep")
    loss_predictor = False

    def __init__(self, settings: MAESettings, model):
        super().__init__(settings, model)
        self.mask_ratio = settings.mask_ratio
        self.norm_pix = settings.norm_pix
        self.model = MaskedAutoencoder(model, loss_predictor=self.loss_predictor)

    @classmethod
    def random_encoder(cls, settings, model):
        return build_vit(model)   # what MaskedAutoencoder builds first, without its decoders

    def masking(self, imgs: torch.Tensor, ctx: StepContext) -> kernels.Masking:
        return kernels.random_masking(imgs.shape[0], self.model.num_patches, self.mask_ratio,
                                      generator=ctx.generator, device=imgs.device)

    def reconstruct(self, imgs: torch.Tensor, masking: kernels.Masking):
        """(pred [B,L,P], per-patch loss [B,L], mean masked loss, decoder input)."""
        latent = self.model.encode(imgs, masking.ids_keep)
        h = self.model.decoder_input(latent, masking.ids_keep)
        pred = self.model.reconstruct(h)
        # the targets are read straight from the images (no patchified fp32 copy per step)
        loss, per_patch = kernels.patch_loss(pred, imgs, masking.mask, norm_pix=self.norm_pix,
                                             patch_size=self.model.patch_size)
        return pred, per_patch, loss, h

    def forward(self, imgs, ctx):
        masking = self.masking(imgs, ctx)
        _, _, loss, _ = self.reconstruct(imgs, masking)
        return loss, {"loss_rec": loss.detach()}

    def flops_per_image(self) -> float:
        m = self.model_cfg
        width, depth, _ = m.dims
        keep = kernels.masking.num_visible(m.num_patches, self.mask_ratio)
        fwd = encoder_flops(width, depth, m.mlp_ratio, keep + 1, m.patch_dim, keep)
        fwd += decoder_flops(m, m.num_patches + 1)
        return 3 * fwd

    def eval_masking(self, imgs: torch.Tensor, generator: torch.Generator) -> kernels.Masking:
        return kernels.random_masking(imgs.shape[0], self.model.num_patches, self.mask_ratio,
                                      generator=generator, device=imgs.device)

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        masking = self.eval_masking(imgs, generator)
        pred, per_patch, loss, _ = self.reconstruct(imgs, masking)
        return EvalOutput(metrics={"val_loss_rec": float(loss), "mask_ratio": self.mask_ratio}, images=imgs, mask=masking.mask, prediction=pred,
                          prediction_normalized=self.norm_pix, patch_losses=per_patch)
