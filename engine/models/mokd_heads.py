"""MOKD's T-head: a small transformer over one network's spatial features, pooled onto K prototypes.

    tokens = input tokens + position embedding          (learnable, resampled bicubically to the crop's grid)
    pooled = mean over tokens of LayerNorm(blocks(tokens))
    logits = W pooled,   W_k = g_k v_k / |v_k|          (g trained: the logits are unbounded)

Input per network: a ResNet's layer4 map through a 1x1 convolution to the head's width (``in_channels``
set), or a ViT's patch tokens as they are. ``pooled(tokens, query)`` optionally prepends a query token (no
position) that takes part in the attention and is dropped before the pooling: MOKD's cross-attention feature
search. The loss never forms the logits: the objective hands ``pooled`` and ``last_layer.weight()`` to
``kernels.prototype_cross_entropy``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dino_head import WeightNormLinear
from .vit import Block, flops_per_token_block


class THead(nn.Module):
    """``dim``-wide T-head with ``depth`` blocks of ``heads`` heads and a ``grid`` x ``grid`` position table
    (the input's grid at the training resolution); ``in_channels``: a conv feature map's channels (None: the
    input is already tokens of width ``dim``)."""

    def __init__(self, dim: int, out_dim: int, grid: int, depth: int = 3, heads: int = 6, mlp_ratio: float = 4.0,
                 in_channels: int | None = None, attn_backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"T-head width {dim} must be divisible by its {heads} heads")
        if grid < 1 or depth < 1:
            raise ValueError(f"grid and depth must be >= 1, got grid={grid}, depth={depth}")
        self.grid = grid
        self.reduce = nn.Conv2d(in_channels, dim, kernel_size=1) if in_channels else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.last_layer = WeightNormLinear(dim, out_dim, train_scale=True)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.blocks.modules():   # the official init: trunc-normal Linear weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position(self, rows: int, cols: int) -> torch.Tensor:
        """[1, rows * cols, dim]: the table itself at its own grid, else resampled bicubically."""
        if (rows, cols) == (self.grid, self.grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)

    def embed_map(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A conv map [B, C, h, w] -> (tokens with positions [B, h * w, dim], the reduced map's mean [B, dim]:
        the CNN's query vector)."""
        if self.reduce is None:
            raise ValueError("this T-head takes tokens (it was built without in_channels)")
        x = self.reduce(feature_map)
        query = x.mean(dim=(2, 3))
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        return x + self.position(rows, cols).to(x.dtype), query

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, L, dim] of a square grid -> the same with positions."""
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"T-head tokens must form a square grid, got {tokens.shape[1]}")
        return tokens + self.position(side, side).to(tokens.dtype)

    def pooled(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """[B, dim]: the blocks over ``tokens`` (embedded), with ``query`` [B, dim] prepended if given, then the
        LayerNorm and the mean over the input tokens (the query excluded)."""
        x = tokens if query is None else torch.cat([query.to(tokens.dtype).unsqueeze(1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return (x if query is None else x[:, 1:]).mean(dim=1)

    def flops(self, tokens: int) -> float:
        """Forward FLOPs per sequence of ``tokens`` tokens (the 1x1 reduction excluded), prototypes included."""
        dim = self.pos_embed.shape[-1]
        ratio = self.blocks[0].mlp.fc1.out_features / dim
        blocks = len(self.blocks) * tokens * flops_per_token_block(dim, ratio, tokens)
        return blocks + 2.0 * self.last_layer.weight_v.numel()


def conv_grid(size: int, halvings: int) -> int:
    """The side of a ResNet map after ``halvings`` stride-2 stages (each 3x3/1x1 conv with padding: ceil(n / 2))."""
    for _ in range(halvings):
        size = -(-size // 2)
    return size


__all__ = ["THead", "conv_grid"]
