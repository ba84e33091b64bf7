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


def _check_grid(batch: int, grid: int) -> None:
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer (patches per side), got {grid}")


def blocks_from_centres(centres: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """[B, grid*grid] float 0/1: a ``block`` x ``block`` square around each of ``centres`` [B, C] (flat patch
    indices), clipped at the border (offsets -(block//2) .. block-1-block//2, clamped into the grid)."""
    rows, cols = centres // grid, centres % grid
    offsets = torch.arange(block, device=centres.device) - block // 2
    r = (rows[..., None, None] + offsets[:, None]).clamp(0, grid - 1)           # [B, C, block, 1]
    c = (cols[..., None, None] + offsets[None, :]).clamp(0, grid - 1)           # [B, C, 1, block]
    flat = (r * grid + c).reshape(centres.shape[0], -1)
    out = torch.zeros(centres.shape[0], grid * grid, device=centres.device)
    return out.scatter_(1, flat, 1.0)


def inverse_block_masking(batch: int, grid: int, mask_ratio: float, block: int = 3, adjust: float = 0.07,
                          generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> Masking:
    """data2vec 2.0's inverse block mask: the *visible* set is grown from square blocks, the rest is masked.

    With ``p = 1 - mask_ratio`` (the visible fraction): ``int(L * (p + adjust) / block**2)`` centres are drawn
    uniformly with replacement, each turns on its clipped ``block`` x ``block`` square, then random cells are
    turned off (or, when short, random others on) until exactly ``int(L * p)`` are on. Those are kept; every
    row masks the same ``L - int(L * p)`` patches (ViT-B/16 at 0.8: 39 visible, 157 masked of 196).
    Backends: none (vectorised torch on ``device``, no host sync). ``ids_keep`` is in random order.
    """
    _check_grid(batch, grid)
    check_ratio("mask_ratio", mask_ratio)
    if int(block) != block or block < 1:
        raise ValueError(f"block must be a positive integer, got {block}")
    if adjust < 0:
        raise ValueError(f"adjust must be >= 0, got {adjust}")
    num_patches = grid * grid
    keep_fraction = 1 - mask_ratio
    keep = int(num_patches * keep_fraction)
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}")
    if generator is not None and device is None:
        device = generator.device
    num_centres = int(num_patches * ((keep_fraction + adjust) / block ** 2))
    centres = torch.randint(num_patches, (batch, max(num_centres, 0)), generator=generator, device=device)
    on = blocks_from_centres(centres, grid, block)
    # cells already on rank first (in random order among themselves), then the others: the top ``keep`` are
    # ``keep`` random "on" cells when there are too many, all of them plus random others when too few
    score = on * 2 + torch.rand(batch, num_patches, generator=generator, device=device)
    return masking_from_noise(-score, keep)


def block_wise_masking(batch: int, grid: int, num_masked: int, min_block: int = 16, min_aspect: float = 0.3,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Masking:
    """BEiT's block-wise mask: rectangles of area ~U[min_block, remaining] and log-uniform aspect ratio in
    [min_aspect, 1/min_aspect] are placed (10 tries each, counting newly masked cells only) until
    ``num_masked`` cells are masked or no rectangle fits; then random cells are unmasked (or masked) so that
    every row masks exactly ``num_masked`` of ``grid * grid``.
    Backends: none. The rectangles are drawn on the host from a seed taken from ``generator`` (one host sync per
    call), so the draw is reproducible; the mask is then moved to ``device``.
    """
    import math
    import random

    _check_grid(batch, grid)
    num_patches = grid * grid
    if int(num_masked) != num_masked or not 1 <= num_masked < num_patches:
        raise ValueError(f"num_masked must be an integer in [1, {num_patches - 1}], got {num_masked}")
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    if generator is not None and device is None:
        device = generator.device
    gen_device = generator.device if generator is not None else device
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=gen_device))
    rng = random.Random(seed)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    rows = []
    for _ in range(batch):
        mask = [[0] * grid for _ in range(grid)]
        count = 0
        while count < num_masked:
            budget, delta = num_masked - count, 0
            for _attempt in range(10):
                area = rng.uniform(min_block, budget)
                aspect = math.exp(rng.uniform(*log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < grid and h < grid:
                    top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                    covered = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                    if 0 < h * w - covered <= budget:
                        for i in range(top, top + h):
                            for j in range(left, left + w):
                                if not mask[i][j]:
                                    mask[i][j], delta = 1, delta + 1
                    if delta > 0:
                        break
            if delta == 0:
                break
            count += delta
        rows.append([v for row in mask for v in row])
    on = torch.tensor(rows, dtype=torch.float32)
    score = on * 2 + torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(seed))
    # the top ``num_masked`` scores are masked; masking_from_noise keeps the lowest noise, i.e. the others
    return masking_from_noise(score.to(device), num_patches - num_masked)
