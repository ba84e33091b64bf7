"""Per-sample random masking, as MAE draws it (``models_mae.random_masking``).

Each row gets uniform noise; the patches with the lowest noise are kept. Keeping the
draw in this form means hard-patch masking only has to raise the noise of the hard
patches (see ``hard_patch_masking``) to reuse everything here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._validate import check_ratio


class Masking(NamedTuple):
    """A mask over ``L`` patches per sample; K = number of visible patches.

    ids_keep:    [B, K] int64, visible patches in the order the encoder sees them
    ids_restore: [B, L] int64, position of each patch in the shuffled order
    mask:        [B, L] bool, True = removed (masked)
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def ids_shuffle(self) -> torch.Tensor:
        """[B, L]: kept patches first, then masked ones (inverse of ids_restore)."""
        order = torch.arange(self.ids_restore.shape[1], device=self.ids_restore.device)
        return torch.empty_like(self.ids_restore).scatter_(
            1, self.ids_restore, order.expand_as(self.ids_restore))

    @property
    def ids_masked(self) -> torch.Tensor:
        """[B, L - K]: the masked patches, in shuffled order."""
        return self.ids_shuffle[:, self.ids_keep.shape[1]:]


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's ``len_keep = int(L * (1 - mask_ratio))``."""
    return int(num_patches * (1 - mask_ratio))


def check_masking_args(num_patches: int, mask_ratio: float) -> int:
    if int(num_patches) != num_patches or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches}")
    check_ratio("mask_ratio", mask_ratio)
    keep = num_visible(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> Masking:
    """Keep the ``len_keep`` lowest-noise patches of each row. noise: [B, L]."""
    ids_shuffle = torch.argsort(noise, dim=1)
    # MAE's second argsort inverts a permutation: a scatter does it in O(L), with the same result
    order = torch.arange(noise.shape[1], device=noise.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, order)
    ids_keep = ids_shuffle[:, :len_keep]
    # mask is True at the positions whose rank in the shuffle is >= len_keep
    mask = ids_restore >= len_keep
    return Masking(ids_keep, ids_restore, mask)


def random_masking(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Masking:
    """Draw an independent uniformly random mask for each of ``batch`` samples.

    Exactly ``num_patches - int(num_patches * (1 - mask_ratio))`` patches are masked in
    every row. ``generator`` (on ``device``) makes the draw reproducible.
    Backends: none (torch.rand, one argsort per row, no host sync). Limits: mask_ratio in [0, 1).
    """
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    keep = check_masking_args(num_patches, mask_ratio)
    if generator is not None and device is None:
        device = generator.device
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return masking_from_noise(noise, keep)
