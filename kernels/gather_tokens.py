"""Select the visible tokens: out[b, k] = x[b, ids_keep[b, k]].

Gradient: dx[b, ids_keep[b, k]] += dout[b, k]; ids_keep holds distinct indices per row
(a subset of a permutation), so the backward is a plain scatter without atomics.
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_tensor


def gather_tokens_ref(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


_IMPLS = {"reference": gather_tokens_ref}


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Visible tokens of each sample, differentiable in ``x``.

    Args:
        x: [B, L, D] tokens.
        ids_keep: [B, K] indices into L, distinct within a row.
    Returns:
        [B, K, D], same dtype as ``x``.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if ids_keep.shape[0] != x.shape[0]:
        raise ValueError(f"ids_keep must have batch size {x.shape[0]} like x, got {ids_keep.shape[0]}")
    check_indices("ids_keep", ids_keep, x.shape[1])
    return dispatch("gather_tokens", backend, x.device, _IMPLS)(x, ids_keep)
