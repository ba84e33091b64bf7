"""HPM's easy-to-hard mask (``generate_mask`` of the official code), vectorised.

The official code loops over samples in numpy: it masks the ``num_hard`` patches with
the highest predicted loss, and fills the rest of the masked set with patches drawn
uniformly from the others. Giving the hard patches noise 2 (above any U[0,1) draw)
and keeping the lowest-noise patches yields the same distribution with no host sync.
"""
from __future__ import annotations

import torch

from ._validate import FLOAT_DTYPES, check_tensor
from .masking import Masking, check_masking_args, masking_from_noise


def hard_patch_masking(pred_score: torch.Tensor, mask_ratio: float, num_hard: int,
                       generator: torch.Generator | None = None) -> Masking:
    """Mask the ``num_hard`` highest-scored patches of each row, plus random others.

    Args:
        pred_score: [B, L] predicted per-patch difficulty (higher = harder).
        mask_ratio: fraction of patches removed, as in ``random_masking``.
        num_hard: how many of the masked patches are the top-scored ones; 0 gives a
            plain random mask. At most the number of masked patches.
        generator: random generator on ``pred_score``'s device.
    """
    check_tensor("pred_score", pred_score, ndim=2, dtypes=FLOAT_DTYPES)
    batch, num_patches = pred_score.shape
    keep = check_masking_args(num_patches, mask_ratio)
    num_masked = num_patches - keep
    if int(num_hard) != num_hard or not 0 <= num_hard <= num_masked:
        raise ValueError(f"num_hard must be an integer in [0, {num_masked}] (the number of masked "
                         f"patches), got {num_hard}")
    noise = torch.rand(batch, num_patches, generator=generator, device=pred_score.device)
    if num_hard > 0:
        hard = torch.topk(pred_score.detach().float(), int(num_hard), dim=1).indices
        noise.scatter_(1, hard, 2.0)
    return masking_from_noise(noise, keep)
