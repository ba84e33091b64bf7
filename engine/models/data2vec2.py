"""data2vec 2.0's image model (Baevski et al., 2022; github.com/facebookresearch/fairseq, examples/data2vec):
a post-LN (BERT-style) ViT whose blocks also return their FFN output, and the grouped-convolution decoder.

Differences from ``engine.models.vit.VisionTransformer`` (MAE's pre-LN ViT), all as the official model:

- each block is ``x = LN1(x + attn(x)); t = mlp(x); x = LN2(x + t)`` and ``t`` (the FFN output before the
  residual add) is what the teacher's targets are built from;
- a LayerNorm over the input tokens before the first block, and no final LayerNorm;
- the cls ("extra") token gets no position embedding and starts as N(0, 1); Linear weights start as N(0, 0.02).

The blocks are ``engine.models.vit.Block`` subclasses with the same parameter names, so activation checkpointing,
torch.compile and FSDP wrap them like every other block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels

from .vit import Block, drop_path, encoder_flops, sincos_pos_embed


class PostLNBlock(Block):
    """A BERT-style block; ``return_ffn=True`` also returns the FFN output before the residual add (and before
    stochastic depth, which fine-tuning may set)."""

    def forward(self, x: torch.Tensor, return_ffn: bool = False, **attn_masks):
        x = self.norm1(x + drop_path(self.attn(x, **attn_masks), self.drop_path, self.training))
        ffn = self.mlp(x)
        x = self.norm2(x + drop_path(ffn, self.drop_path, self.training))
        return (x, ffn) if return_ffn else x


def init_bert_weights(module: nn.Module) -> None:
    """BERT's init, as data2vec 2.0 applies it: Linear weights N(0, 0.02) with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Data2Vec2Encoder(nn.Module):
    """Patch embedding + fixed sin-cos positions, an extra (cls) token, input LayerNorm and post-LN blocks.
    ``forward(imgs, ids_keep)`` returns [B, 1 + K, D] (cls first), like the engine's ViT; ``features`` is what
    the probe calls. ``prenet_depth`` of the blocks are the official "context encoder" (they never give
    targets); the rest are the main blocks."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, attn_backend: str = "auto", prenet_depth: int = 0):
        super().__init__()
        if not 0 <= prenet_depth < depth:
            raise ValueError(f"prenet_depth must be in [0, depth={depth}), got {prenet_depth}")
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.embed_dim = embed_dim
        self.prenet_depth = prenet_depth
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid, cls_token=False))
        self.input_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.blocks = nn.ModuleList(PostLNBlock(embed_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        init_bert_weights(self)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=1.0)

    @property
    def main_depth(self) -> int:
        return len(self.blocks) - self.prenet_depth

    def embed(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with position embedding: all of them, or only ``ids_keep``'s."""
        if ids_keep is None:
            x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
            return x + self.pos_embed.to(x.dtype)
        return kernels.embed_visible_patches(imgs, ids_keep, self.patch_embed.weight, self.patch_embed.bias,
                                             self.pos_embed, self.patch_size)

    def encode_tokens(self, x: torch.Tensor, return_ffn: bool = False):
        """[B, K, D] embedded patches -> [B, 1 + K, D]; with ``return_ffn`` also the main blocks' FFN outputs
        (a list of [B, 1 + K, D], first block first)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.input_norm(x)
        ffn_outputs = []
        for i, block in enumerate(self.blocks):
            if return_ffn and i >= self.prenet_depth:
                x, ffn = block(x, return_ffn=True)
                ffn_outputs.append(ffn)
            else:
                x = block(x)
        return (x, ffn_outputs) if return_ffn else x

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_tokens(self.embed(imgs, ids_keep))

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """[B, D] image features for probes: mean of the patch tokens, or the cls token."""
        tokens = self.forward(imgs)
        return tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]

    def flops(self, tokens: int, patches: int) -> float:
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / self.embed_dim
        return encoder_flops(self.embed_dim, len(self.blocks), mlp_ratio, tokens, self.patch_embed.weight[0].numel(),
                             patches)


class ConvDecoder2d(nn.Module):
    """``depth`` blocks of grouped Conv2d (k x k, same padding) -> LayerNorm over channels (no affine) -> GELU,
    each followed by a residual add (the first only when the widths match), then a Linear to ``out_dim``.
    Input [B, L, in_dim] in raster order; output [B, L, out_dim]. No position embedding: the convolutions see
    the layout. Convolutions and the final Linear keep PyTorch's default init, as the official decoder."""

    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, out_dim: int, kernel: int = 3, groups: int = 16):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd (same padding), got {kernel}")
        if in_dim % groups or dim % groups:
            raise ValueError(f"groups={groups} must divide the encoder width {in_dim} and the decoder width {dim}")
        self.grid = grid
        self.convs = nn.ModuleList(nn.Conv2d(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                             groups=groups) for i in range(depth))
        self.first_residual = in_dim == dim
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, self.grid, self.grid)
        for i, conv in enumerate(self.convs):
            y = conv(x)
            y = F.layer_norm(y.transpose(1, 3), y.shape[1:2]).transpose(1, 3)   # over channels, per position
            y = F.gelu(y)
            x = y + x if (i > 0 or self.first_residual) else y
        return self.proj(x.flatten(2).transpose(1, 2))

    def flops(self) -> float:
        """Forward FLOPs per sample."""
        positions = self.grid ** 2
        conv = sum(2 * c.weight.numel() * positions for c in self.convs)
        return conv + 2 * self.proj.weight.numel() * positions


class Data2Vec2Model(nn.Module):
    """The student: encoder + decoder (the EMA teacher copies the encoder only)."""

    def __init__(self, cfg, prenet_depth: int, decoder_kernel: int, decoder_groups: int):
        super().__init__()
        width = cfg.dims[0]
        self.encoder = build_data2vec2_encoder(cfg, prenet_depth)
        self.decoder = ConvDecoder2d(self.encoder.grid, width, cfg.decoder_dim, cfg.decoder_depth, width,
                                     decoder_kernel, decoder_groups)


def build_data2vec2_encoder(cfg, prenet_depth: int) -> Data2Vec2Encoder:
    width, depth, heads = cfg.dims
    return Data2Vec2Encoder(cfg.img_size, cfg.patch_size, cfg.in_chans, width, depth, heads, cfg.mlp_ratio,
                            cfg.attn_backend, prenet_depth)


__all__ = ["PostLNBlock", "Data2Vec2Encoder", "ConvDecoder2d", "Data2Vec2Model", "build_data2vec2_encoder",
           "init_bert_weights"]
