"""SemAIM's two-stream autoregressive ViT (Song et al., AAAI 2024; github.com/skyoux/SemAIM).

The content stream ``h`` is the encoder itself (``build_vit``) run over cls + every patch under the order mask
"query i sees key j iff order[j] <= order[i]"; the query stream ``g`` starts from the fixed sin-cos position
embedding and, after every ``depth // query_depth``-th content block, takes one cross-attention block whose keys
and values are that block's output, under the strict mask ``order[j] < order[i]``. The cls token gets an order
below every patch, so every token sees it and, in the content stream, it sees only itself. Both streams call
``kernels.attention`` with ``order=`` (``strict=True`` for ``g``): no [B, 1, N, N] mask is built on the Triton path.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sslpt import kernels
from sslpt.engine.config import ModelConfig

from .vit import Attention, Block, Mlp, build_vit, init_mae_weights


class CrossAttention(Attention):
    """Attention of the queries of one stream to the keys and values of another (same length, per-sample order
    mask): separate q / k / v projections, as the official ``Attention_SelfCrossMask``."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        nn.Module.__init__(self)   # not Attention's fused qkv projection
        self.num_heads = num_heads
        self.backend = kernels.check_attention_backend(backend, "attn_backend")
        self._call_backend = None if backend == "auto" else backend
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, order: torch.Tensor | None = None,
                strict: bool = False) -> torch.Tensor:
        batch, tokens, dim = x.shape
        heads = lambda t: t.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        out = kernels.attention(q, k, v, backend=self._call_backend, order=order, strict=strict)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class QueryBlock(Block):
    """A pre-norm block whose attention reads another stream: ``g + attn(norm1(g), norm1(h))``, then the MLP.
    One ``norm1`` normalises both the queries and the keys/values (the official ``Block_SelfCrossMask``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto"):
        nn.Module.__init__(self)   # Block's layout, with a cross-attention
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, g: torch.Tensor, h: torch.Tensor, **attn_masks) -> torch.Tensor:
        g = g + self.attn(self.norm1(g), self.norm1(h), **attn_masks)
        return g + self.mlp(self.norm2(g))


def token_order(perm: torch.Tensor) -> torch.Tensor:
    """[B, L] patch orders -> [B, 1 + L] token orders, cls first with an order below every patch's."""
    perm = perm if perm.is_floating_point() else perm.float()
    return torch.cat([perm.amin(dim=1, keepdim=True) - 1.0, perm], dim=1)


class SemAIMNet(nn.Module):
    """Encoder (content stream), query blocks, and the prediction head (after the encoder's own final norm,
    which the official model shares between the two streams)."""

    def __init__(self, cfg: ModelConfig, query_depth: int, out_dim: int, mlp_head: bool = True):
        super().__init__()
        width, depth, heads = cfg.dims
        if query_depth < 1 or depth % query_depth:
            raise ValueError(f"query_depth {query_depth} must divide the encoder depth {depth}")
        self.encoder = build_vit(cfg)
        self.step = depth // query_depth
        self.query_blocks = nn.ModuleList(QueryBlock(width, heads, cfg.mlp_ratio, cfg.attn_backend)
                                          for _ in range(query_depth))
        hidden = int(width * cfg.mlp_ratio)
        self.head = (nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim)) if mlp_head
                     else nn.Linear(width, out_dim))
        init_mae_weights(self.query_blocks)
        init_mae_weights(self.head)

    def forward(self, imgs: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """[B, L, out_dim]: each patch predicted from the patches before it in ``perm`` ([B, L], smaller first)."""
        enc = self.encoder
        x = enc.embed(imgs)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        h = torch.cat([cls, x], dim=1)
        g = enc.pos_embed.expand(h.shape[0], -1, -1).to(h.dtype)
        order = token_order(perm)
        for i, block in enumerate(enc.blocks):
            h = block(h, order=order)
            if (i + 1) % self.step == 0:
                g = self.query_blocks[i // self.step](g, h, order=order, strict=True)
        return self.head(enc.norm(g))[:, 1:]


__all__ = ["CrossAttention", "QueryBlock", "SemAIMNet", "token_order"]
