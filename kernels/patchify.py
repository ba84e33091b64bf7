"""MAE's patch layout: raster order of patches, (row, col, channel) inside a patch.

These are pure layout changes (a reshape and a permute), fused by the ops that need
them (``embed_visible_patches``, ``patch_loss``), so they have no kernel of their own.
"""
from __future__ import annotations

import torch

from ._validate import check_tensor


def _check_patch_size(patch_size: int) -> int:
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    return int(patch_size)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] with L = (H/p)*(W/p), patches in raster order.

    Backends: none (a reshape and a permute, then one copy); any dtype and device. Limits: p divides H and W.
    """
    check_tensor("imgs", imgs, ndim=4)
    p = _check_patch_size(patch_size)
    n, c, height, width = imgs.shape
    if height % p or width % p:
        raise ValueError(f"patch_size={p} must divide the image size, got {height}x{width}")
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int,
               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the inverse of ``patchify``.

    ``grid`` = (patch rows, patch columns); defaults to a square grid.
    Backends: none (a reshape and a permute, then one copy); any dtype and device.
    """
    check_tensor("x", x, ndim=3)
    p = _check_patch_size(patch_size)
    n, num_patches, dim = x.shape
    if dim != p * p * channels:
        raise ValueError(f"x's last dimension must be patch_size**2 * channels = {p * p * channels}, got {dim}")
    if grid is None:
        h = w = int(round(num_patches ** 0.5))
        if h * w != num_patches:
            raise ValueError(f"x has {num_patches} patches, not a square grid: pass grid=(rows, cols)")
    else:
        h, w = grid
        if h * w != num_patches:
            raise ValueError(f"grid={grid} holds {h * w} patches, x has {num_patches}")
    x = x.reshape(n, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, h * p, w * p)
