"""Patch embedding of the visible patches only, straight from the image.

MAE embeds all L patches with a stride-p convolution and then keeps K of them; this op
patchifies only the K visible patches and projects them (a [B*K, p*p*C] x [p*p*C, D]
matmul instead of [B*L, ...]), then adds their position embedding:

    out[b, k] = patch(imgs[b], ids_keep[b, k]) @ W^T + bias + pos_embed[ids_keep[b, k]]

with W the conv weight [D, C, p, p] laid out as (row, col, channel) to match patchify.
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_shape, check_tensor
from .gather_tokens import gather_tokens_ref
from .patchify import patchify


def conv_weight_as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[D, C, p, p] conv weight -> [D, p*p*C] in patchify's (row, col, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def embed_visible_patches_ref(imgs, ids_keep, weight, bias, pos_embed, patch_size):
    patches = gather_tokens_ref(patchify(imgs, patch_size), ids_keep)  # [B, K, p*p*C]
    out = torch.nn.functional.linear(patches, conv_weight_as_matrix(weight), bias)
    return out + gather_tokens_ref(pos_embed.expand(imgs.shape[0], -1, -1), ids_keep).to(out.dtype)


_IMPLS = {"reference": embed_visible_patches_ref}


def embed_visible_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, pos_embed: torch.Tensor, patch_size: int,
                          *, backend: str | None = None) -> torch.Tensor:
    """Embed the visible patches of each image and add their position embedding.

    Args:
        imgs: [B, C, H, W].
        ids_keep: [B, K] patch indices (raster order) to embed.
        weight: [D, C, p, p] patch-embedding conv weight; bias: [D] or None.
        pos_embed: [1, L, D] or [L, D] position embedding of the patches (no cls entry).
    Returns:
        [B, K, D], differentiable in weight, bias and pos_embed (and imgs).
    """
    check_tensor("imgs", imgs, ndim=4, dtypes=FLOAT_DTYPES)
    device = imgs.device
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    p = int(patch_size)
    dim, channels = weight.shape[:2]
    check_shape("weight", weight, [dim, imgs.shape[1], p, p])
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=device)
        check_shape("bias", bias, [dim])
    check_tensor("pos_embed", pos_embed, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device)
    if imgs.shape[2] % p or imgs.shape[3] % p:
        raise ValueError(f"patch_size={p} must divide the image size, got {imgs.shape[2]}x{imgs.shape[3]}")
    num_patches = (imgs.shape[2] // p) * (imgs.shape[3] // p)
    pos = pos_embed.reshape(1, *pos_embed.shape[-2:])
    check_shape("pos_embed", pos, [1, num_patches, dim])
    if ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(f"ids_keep must have batch size {imgs.shape[0]} like imgs, got {ids_keep.shape[0]}")
    check_indices("ids_keep", ids_keep, num_patches)
    impl = dispatch("embed_visible_patches", backend, device, _IMPLS)
    return impl(imgs, ids_keep, weight, bias, pos, p)
