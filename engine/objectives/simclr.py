"""SimCLR (Chen et al., 2020) on a ViT: two augmented views of every image, the encoder's pooled feature (cls
token or mean of the patch tokens), a projection MLP, and NT-Xent over the 2N views (``kernels.nt_xent``,
which never forms the 2N x 2N similarity matrix on its Triton path).

The views are made here, on the device, from the batch the loop hands over, with the step's generator
(``engine.data.views``): the data pipeline's own crop should be off (``data.crop_scale = [1, 1]``,
``data.hflip = 0``). Both views go through the encoder and the projector as one batch of 2N, as SimCLR's code
does, so the projector's BatchNorm sees both. Under torch.distributed the negatives are all ranks' views.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.data.views import ViewAugment, two_views
from engine.models.heads import mlp_flops, mlp_head, sync_batchnorm_if_distributed
from engine.models.vit import VisionTransformer, encoder_flops

from . import register
from .base import Objective, StepContext


def build_encoder(cfg) -> VisionTransformer:
    """The ViT that the probe evaluates (same construction as the MAE encoder, so the random baseline matches)."""
    m = cfg.model
    width, depth, heads = m.dims
    encoder = VisionTransformer(m.img_size, m.patch_size, m.in_chans, width, depth, heads, m.mlp_ratio)
    if cfg.objective.stop_grad_patch_embed:  # MoCo v3's random, frozen patch projection
        encoder.patch_embed.requires_grad_(False)
    return encoder


def view_specs(o) -> tuple[ViewAugment, ViewAugment]:
    """The two views' augmentations from the objective config (only blur and solarisation differ per view)."""
    brightness, contrast, saturation, hue = o.jitter
    common = dict(crop_scale=tuple(o.view_crop_scale), hflip=o.view_hflip, jitter_prob=o.jitter_prob,
                  brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                  grayscale_prob=o.grayscale_prob, blur_sigma=tuple(o.blur_sigma))
    return tuple(ViewAugment(**common, blur_prob=o.blur_prob[i], solarize_prob=o.solarize_prob[i]) for i in (0, 1))


def pooled(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, D] from the encoder's [B, 1 + L, D]: the cls token, or the mean of the patch tokens."""
    return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)


def distributed_group():
    """The default process group when several ranks train together (negatives from every rank), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def uses_gpu(cfg) -> bool:
    return cfg.train.device != "cpu" and torch.cuda.is_available()


class ContrastiveNet(nn.Module):
    """Encoder -> pooled feature -> projector (-> predictor, MoCo v3's query branch only)."""

    def __init__(self, cfg, predictor: bool = False):
        super().__init__()
        o = cfg.objective
        self.pooling = o.pooling
        self.encoder = build_encoder(cfg)
        width = self.encoder.embed_dim
        self.projector = mlp_head(width, o.proj_hidden, o.proj_dim, o.proj_layers)
        self.predictor = mlp_head(o.proj_dim, o.pred_hidden, o.proj_dim, 2) if predictor else None

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        return pooled(self.encoder(imgs), self.pooling)

    def encoder_flops(self) -> float:
        e = self.encoder
        mlp_ratio = e.blocks[0].mlp.fc1.out_features / e.embed_dim if len(e.blocks) else 0.0
        patch_dim = e.patch_embed.weight[0].numel()
        return encoder_flops(e.embed_dim, len(e.blocks), mlp_ratio, e.num_patches + 1, patch_dim, e.num_patches)


@register("simclr")
class SimCLR(Objective):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.temperature = cfg.objective.temperature
        self.views = view_specs(cfg.objective)
        self.model = sync_batchnorm_if_distributed(ContrastiveNet(cfg), uses_gpu(cfg))

    @property
    def trainable(self) -> nn.Module:
        return self.model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        view1, view2 = two_views(imgs, ctx.generator, *self.views)
        z1, z2 = self.model.projector(self.model.features(torch.cat([view1, view2]))).chunk(2)
        loss = kernels.nt_xent(z1, z2, self.temperature, group=distributed_group())
        with torch.no_grad():
            positive_cos = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
        return loss, {"loss_contrastive": loss.detach(), "positive_cos": positive_cos}

    def flops_per_image(self) -> float:
        return 3 * 2 * (self.model.encoder_flops() + mlp_flops(self.model.projector))
