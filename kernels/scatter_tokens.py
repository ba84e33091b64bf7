"""Put visible tokens back at their positions and ``fill`` (the mask token) elsewhere.

out[b, l] = x_vis[b, k] if ids_keep[b, k] == l else fill. Gradients: dx_vis[b, k] =
dout[b, ids_keep[b, k]]; dfill = sum of dout over the positions not in ids_keep.
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_shape, check_tensor


def scatter_tokens_ref(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int,
                       fill: torch.Tensor) -> torch.Tensor:
    batch, _, dim = x_vis.shape
    base = fill.to(x_vis.dtype).reshape(1, 1, dim).expand(batch, num_patches, dim)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, dim)
    return base.scatter(1, index, x_vis)


_IMPLS = {"reference": scatter_tokens_ref}


def scatter_tokens(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, fill: torch.Tensor,
                   *, backend: str | None = None) -> torch.Tensor:
    """Tokens back in patch order with ``fill`` at the masked positions.

    Args:
        x_vis: [B, K, D] visible tokens.
        ids_keep: [B, K] their positions, distinct within a row, in [0, num_patches).
        num_patches: L, the length of the output.
        fill: [D] (or anything with D elements, e.g. a [1, 1, D] mask token).
    Returns:
        [B, L, D] in ``x_vis``'s dtype; differentiable in ``x_vis`` and ``fill``.
    """
    check_tensor("x_vis", x_vis, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x_vis.device)
    check_shape("ids_keep", ids_keep, x_vis.shape[:2])
    check_tensor("fill", fill, dtypes=FLOAT_DTYPES, device=x_vis.device)
    if fill.numel() != x_vis.shape[-1]:
        raise ValueError(f"fill must have {x_vis.shape[-1]} elements (x_vis's width), got shape {list(fill.shape)}")
    if int(num_patches) != num_patches or num_patches < x_vis.shape[1]:
        raise ValueError(f"num_patches must be an integer >= K={x_vis.shape[1]}, got {num_patches}")
    check_indices("ids_keep", ids_keep, int(num_patches))
    impl = dispatch("scatter_tokens", backend, x_vis.device, _IMPLS)
    return impl(x_vis, ids_keep, int(num_patches), fill.reshape(-1))
