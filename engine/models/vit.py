"""Vision Transformer encoder as MAE builds it (timm 0.3.2 pre-norm blocks).

The encoder runs on the visible tokens only: ``kernels.embed_visible_patches`` embeds
just those patches straight from the image, instead of embedding all of them and
discarding 75% as the official code does.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, [1, (1 +) grid*grid, dim].

    The first half of the channels encodes the column index, the second half the row
    (``meshgrid(grid_w, grid_h)`` in MAE's ``util/pos_embed.py``); the cls entry is zero.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention through ``kernels.attention`` (``backend``: one of kernels.ATTENTION_BACKENDS;
    ``auto`` follows the process-wide kernels default, i.e. ``train.backend``, where attention implements it).
    ``x`` is [B, N, D], or packed [T, D] with ``cu_seqlens``; ``order``/``strict`` give SemAIM's per-sample
    order mask (see ``kernels.sparse_attention``)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend = kernels.check_attention_backend(backend, "attn_backend")
        self._call_backend = None if backend == "auto" else backend   # None: the process default
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, order: torch.Tensor | None = None, strict: bool = False,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        if x.dim() == 2:  # packed samples [T, D]
            tokens, dim = x.shape
            q, k, v = self.qkv(x).reshape(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
            out = kernels.attention(q, k, v, backend=self._call_backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            return self.proj(out.reshape(tokens, dim))
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)   # each [B, H, N, Dh]
        out = kernels.attention(q, k, v, backend=self._call_backend, order=order, strict=strict)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random ``prob`` of the samples (rescaling the others)."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - prob)
    return x * keep / (1.0 - prob)


class Block(nn.Module):
    drop_path: float = 0.0   # stochastic depth of both residual branches (fine-tuning sets it per block)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, **attn_masks) -> torch.Tensor:
        """``attn_masks``: Attention's order / strict / cu_seqlens / max_seqlen."""
        x = x + drop_path(self.attn(self.norm1(x), **attn_masks), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT encoder; ``forward(imgs, ids_keep)`` returns [B, 1 + K, D] (cls first), normalised."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto"):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid))  # frozen, as in MAE
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_mae_weights(self)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def patch_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """[1, L, D] position embedding of the patches of a ``height`` x ``width`` image: the stored one at the
        training size, else bicubically resampled to the other grid (DINO's local crops, fine-tuning at a new
        resolution), as DINO and timm interpolate theirs."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} must be a multiple of the patch size {self.patch_size}")
        rows, cols = height // self.patch_size, width // self.patch_size
        pos = self.pos_embed[:, 1:]
        if (rows, cols) == (self.grid, self.grid):
            return pos
        grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(pos.dtype)

    def embed(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with position embedding: all of them, or only ``ids_keep``'s; any image size that is a
        multiple of the patch size."""
        pos = self.patch_pos_embed(imgs.shape[-2], imgs.shape[-1])
        if ids_keep is None:
            x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
            return x + pos.to(x.dtype)
        return kernels.embed_visible_patches(imgs, ids_keep, self.patch_embed.weight, self.patch_embed.bias,
                                             pos, self.patch_size)

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_tokens(self.embed(imgs, ids_keep))

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K, D] embedded patch tokens (positions already added, or not: DropPos) -> [B, 1 + K, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """[B, D] image features for probes: mean of the patch tokens, or the cls token."""
        tokens = self.forward(imgs)
        return tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]


def build_vit(model, frozen_patch_embed: bool = False) -> VisionTransformer:
    """The encoder a ModelConfig describes (every objective builds its ViT here, so ``model.attn_backend`` and
    the architecture reach every encoder). ``frozen_patch_embed``: MoCo v3's fixed random patch projection."""
    width, depth, heads = model.dims
    encoder = VisionTransformer(model.img_size, model.patch_size, model.in_chans, width, depth, heads,
                                model.mlp_ratio, model.attn_backend)
    if frozen_patch_embed:
        encoder.patch_embed.requires_grad_(False)
    return encoder


def vit_flops(encoder: VisionTransformer, tokens: int | None = None) -> float:
    """Forward FLOPs per image of ``encoder`` on all its patches (or ``tokens`` tokens)."""
    mlp_ratio = encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim if len(encoder.blocks) else 0.0
    patch_dim = encoder.patch_embed.weight[0].numel()
    tokens = encoder.num_patches + 1 if tokens is None else tokens
    return encoder_flops(encoder.embed_dim, len(encoder.blocks), mlp_ratio, tokens, patch_dim, tokens - 1)


def flops_per_token_block(dim: int, mlp_ratio: float, tokens: int) -> float:
    """Forward FLOPs of one block per token: 2 * (4 D^2 + 2 r D^2) + attention 4 N D."""
    return 2 * (4 + 2 * mlp_ratio) * dim * dim + 4 * tokens * dim


def encoder_flops(dim: int, depth: int, mlp_ratio: float, tokens: int, patch_dim: int, patches: int) -> float:
    """Forward FLOPs per image of the encoder on ``tokens`` tokens (embedding ``patches``)."""
    return depth * tokens * flops_per_token_block(dim, mlp_ratio, tokens) + 2 * patches * patch_dim * dim


__all__ = ["VisionTransformer", "Block", "build_vit", "vit_flops", "sincos_pos_embed", "init_mae_weights", "encoder_flops",
           "flops_per_token_block"]
