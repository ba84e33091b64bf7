"""One entry point for every encoder a ModelConfig can name: the ViT (``model.arch = vit_*``) or a ResNet
(``resnet18``/``34``/``50``/``101``), with what objectives need to treat both alike: one global feature per
image and the forward FLOPs."""
from __future__ import annotations

import torch
import torch.nn as nn

from sslpt.engine.config import ConfigError, is_resnet

from .resnet import ResNet, build_resnet, resnet_flops
from .vit import VisionTransformer, build_vit, vit_flops

POOLINGS = ("cls", "mean")


def build_backbone(model_cfg, **vit_kwargs) -> nn.Module:
    """The encoder ``model_cfg`` describes. ``vit_kwargs`` go to ``build_vit`` (e.g. ``frozen_patch_embed``);
    a ResNet takes none (a true one is an error naming the option)."""
    if not is_resnet(model_cfg):
        return build_vit(model_cfg, **vit_kwargs)
    given = sorted(name for name, value in vit_kwargs.items() if value)
    if given:
        raise ConfigError(f"{', '.join(given)} applies to ViT encoders only; model.arch={model_cfg.arch!r} is a "
                          f"ResNet")
    return build_resnet(model_cfg.arch, in_chans=model_cfg.in_chans, stem=model_cfg.resnet_stem,
                        img_size=model_cfg.img_size, width=model_cfg.resnet_width)


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, D] from a ViT's [B, 1 + L, D]: the cls token, or the mean of the patch tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)


def global_feature(encoder: nn.Module, imgs: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """[B, D] per image, with gradient. ViT: the cls token or the mean of the patch tokens. ResNet: its
    global-average-pooled layer4 whatever ``pooling`` says (a ResNet has no cls token)."""
    if isinstance(encoder, ResNet):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        return encoder.forward_features(imgs)
    return pool_tokens(encoder(imgs), pooling)


def backbone_flops(encoder: nn.Module, img_size: int) -> float:
    """Forward FLOPs per image at ``img_size`` (a ViT's own: its patch grid fixes the resolution)."""
    if isinstance(encoder, ResNet):
        return resnet_flops(encoder, img_size)
    if isinstance(encoder, VisionTransformer):
        return vit_flops(encoder)
    raise TypeError(f"encoder must be a VisionTransformer or a ResNet, got {type(encoder).__name__}")


__all__ = ["build_backbone", "is_resnet", "global_feature", "pool_tokens", "backbone_flops", "POOLINGS"]
