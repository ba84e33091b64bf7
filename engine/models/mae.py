"""Masked autoencoder (MAE) with an optional HPM loss-predictor decoder.

Both decoders share ``decoder_embed``, the mask token and the fixed decoder position
embedding and read the identical sequence [cls, patches in raster order]; HPM's
predictor ends in Linear(decoder_dim -> patch_dim) averaged to one score per patch,
the official parameterisation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import ModelConfig

from .vit import Block, build_vit, init_mae_weights, sincos_pos_embed


class DecoderStack(nn.Module):
    """Transformer blocks, a LayerNorm and a linear head; the cls output is dropped.

    ``fp32_head``: the head runs in fp32 even under autocast (and with bf16 FSDP parameters). HPM ranks its
    loss predictor's scores: in bf16 they collapse onto a few values (13-16 distinct among 16 patches on the
    digits preset), and tied scores make the hard-patch choice arbitrary."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0,
                 attn_backend: str = "auto", fp32_head: bool = False):
        super().__init__()
        self.fp32_head = fp32_head
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.fp32_head:
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.head.bias is None else self.head.bias.float()
                return F.linear(x.float(), self.head.weight.float(), bias)[:, 1:]
        return self.head(x)[:, 1:]


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_predictor: bool = False):
        super().__init__()
        width = cfg.dims[0]
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.encoder = build_vit(cfg)
        self.num_patches = self.encoder.num_patches
        self.decoder_embed = nn.Linear(width, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(cfg.decoder_dim, self.encoder.grid))
        self.decoder = DecoderStack(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.patch_dim,
                                    cfg.mlp_ratio, cfg.attn_backend)
        self.loss_predictor = (DecoderStack(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.patch_dim,
                                            cfg.mlp_ratio, cfg.attn_backend, fp32_head=True)
                               if loss_predictor else None)
        init_mae_weights(self.decoder_embed)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + K, D]; all patches when ``ids_keep`` is None."""
        return self.encoder(imgs, ids_keep)

    def decoder_input(self, latent: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + L, decoder_dim]: visible tokens at their positions, the mask token elsewhere."""
        x = self.decoder_embed(latent)
        patches = x[:, 1:]
        if ids_keep is not None:
            patches = kernels.scatter_tokens(patches, ids_keep, self.num_patches, self.mask_token)
        x = torch.cat([x[:, :1], patches], dim=1)
        return x + self.decoder_pos_embed.to(x.dtype)

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """[B, L, patch_dim] predicted patches."""
        return self.decoder(h)

    def predict_loss(self, h: torch.Tensor) -> torch.Tensor:
        """[B, L] HPM's predicted reconstruction difficulty per patch, in fp32 (see DecoderStack)."""
        if self.loss_predictor is None:
            raise RuntimeError("this model was built without a loss predictor (loss_predictor=False)")
        return self.loss_predictor(h).mean(dim=-1)
