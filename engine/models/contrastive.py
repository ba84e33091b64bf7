"""What the two-view contrastive objectives (SimCLR, MoCo v3) share: their settings (temperature, pooling,
projector, the two views' augmentations) and their network (encoder -> pooled feature -> projector, and
MoCo v3's predictor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from sslpt.engine.config import ObjectiveSettings, require, require_probability, require_range
from sslpt.engine.data.views import ViewAugment

from .heads import mlp_flops, mlp_head
from .backbones import backbone_flops, build_backbone, global_feature
from .backbones import pool_tokens as pooled   # a ViT's [B, 1 + L, D] -> [B, D]


@dataclass(kw_only=True)
class ViewSettings(ObjectiveSettings):
    """The two (global) views' augmentations, made by the objective on the device (engine/data/views.py).
    Defaults are BYOL's / MoCo v3's asymmetric views at ImageNet scale (DINO's global crops are the same)."""
    view_crop_scale: tuple[float, float] = (0.08, 1.0)
    view_hflip: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2     # 3-channel images only
    blur_prob: tuple[float, float] = (1.0, 0.1)       # per view (BYOL / MoCo v3: asymmetric)
    blur_sigma: tuple[float, float] = (0.1, 2.0)      # pixels
    solarize_prob: tuple[float, float] = (0.0, 0.2)   # per view

    def check(self, cfg) -> None:
        key = self.key
        require_range(self.view_crop_scale, key("view_crop_scale"))
        for name in ("view_hflip", "jitter_prob", "grayscale_prob"):
            require_probability(getattr(self, name), key(name))
        for name in ("blur_prob", "solarize_prob"):
            require(all(0 <= p <= 1 for p in getattr(self, name)),
                    f"{key(name)} must be two probabilities in [0, 1], got {list(getattr(self, name))}")
        require(all(v >= 0 for v in self.jitter[:3]) and 0 <= self.jitter[3] <= 0.5,
                f"{key('jitter')} (brightness, contrast, saturation, hue) must be >= 0 with hue <= 0.5, "
                f"got {list(self.jitter)}")
        require_range(self.blur_sigma, key("blur_sigma"), upper=None)
        # the objective makes both views from the batch: a crop or flip in the data pipeline would be applied
        # once, identically, to both views, and shrink what the views can differ in
        require(tuple(cfg.data.crop_scale) == (1.0, 1.0) and cfg.data.hflip == 0,
                f"{self.name} makes its own two views (objective.{self.name}.view_crop_scale, view_hflip): set "
                f"data.crop_scale = [1.0, 1.0] and data.hflip = 0, got {list(cfg.data.crop_scale)} and "
                f"{cfg.data.hflip}")

    def view_specs(self) -> tuple[ViewAugment, ViewAugment]:
        """The two views' augmentations (only blur and solarisation differ per view)."""
        brightness, contrast, saturation, hue = self.jitter
        common = dict(crop_scale=tuple(self.view_crop_scale), hflip=self.view_hflip, jitter_prob=self.jitter_prob,
                      brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                      grayscale_prob=self.grayscale_prob, blur_sigma=tuple(self.blur_sigma))
        return tuple(ViewAugment(**common, blur_prob=self.blur_prob[i], solarize_prob=self.solarize_prob[i])
                     for i in (0, 1))


@dataclass(kw_only=True)
class ContrastiveSettings(ViewSettings):
    """Defaults are MoCo v3's ViT recipe at ImageNet scale."""
    temperature: float = 0.2
    pooling: Literal["cls", "mean"] = "cls"   # encoder feature fed to the heads
    proj_layers: int = 3            # projector: Linear-BN-ReLU x (layers - 1), Linear, BN without affine
    proj_hidden: int = 4096
    proj_dim: int = 256

    def check(self, cfg) -> None:
        super().check(cfg)
        require(self.temperature > 0, f"{self.key('temperature')} must be > 0, got {self.temperature}")
        for name in ("proj_layers", "proj_hidden", "proj_dim"):
            require(getattr(self, name) >= 1, f"{self.key(name)} must be >= 1, got {getattr(self, name)}")


class ContrastiveNet(nn.Module):
    """Encoder -> pooled feature -> projector (-> predictor, MoCo v3's query branch only)."""

    def __init__(self, settings: ContrastiveSettings, model, pred_hidden: int | None = None,
                 frozen_patch_embed: bool = False):
        super().__init__()
        self.pooling = settings.pooling
        self.img_size = model.img_size
        self.encoder = build_backbone(model, frozen_patch_embed=frozen_patch_embed)   # a ViT or a ResNet
        self.projector = mlp_head(self.encoder.embed_dim, settings.proj_hidden, settings.proj_dim,
                                  settings.proj_layers)
        self.predictor = (mlp_head(settings.proj_dim, pred_hidden, settings.proj_dim, 2)
                          if pred_hidden is not None else None)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        return global_feature(self.encoder, imgs, self.pooling)

    def flops(self, with_predictor: bool = True) -> float:
        """Forward FLOPs per view."""
        heads = mlp_flops(self.projector)
        if with_predictor and self.predictor is not None:
            heads += mlp_flops(self.predictor)
        return backbone_flops(self.encoder, self.img_size) + heads


__all__ = ["ViewSettings", "ContrastiveSettings", "ContrastiveNet", "pooled"]
