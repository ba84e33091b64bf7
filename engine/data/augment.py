"""MAE's crop-and-flip augmentation, batched on the tensor's device (for data sets held as one tensor).

`random_resized_crop_batch` follows torchvision's RandomResizedCrop sampling (up to 10 tries of a box with
area in scale * image area and log-uniform aspect ratio, else a centre crop clamped to the ratio range), but
draws all tries for all samples at once and keeps the first valid one, so there is no Python loop over the
batch and no host sync. The crop and resize are one `grid_sample` through an affine grid; a horizontal flip
is a negative x scale. Unlike PIL's resize, `grid_sample` does not antialias when it shrinks a crop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_TRIES = 10
MODES = ("bilinear", "bicubic", "nearest")


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback: the whole image, trimmed to the nearest allowed aspect ratio. Returns (h, w)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def sample_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], hflip: float, generator: torch.Generator | None,
                      device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample crop boxes (top, left, h, w in pixels, float32 [B] each) and flip flags (bool [B])."""
    u = torch.rand(batch, 2 * NUM_TRIES + 3, generator=generator, device=device)
    u_area, u_ratio = u[:, :NUM_TRIES], u[:, NUM_TRIES:2 * NUM_TRIES]
    u_top, u_left, u_flip = u[:, -3], u[:, -2], u[:, -1]

    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    valid = (w_try >= 1) & (w_try <= width) & (h_try >= 1) & (h_try <= height)  # [B, tries]
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first valid try (0 if none)
    found = valid.any(dim=1)

    fallback_h, fallback_w = _fallback_box(height, width, ratio)
    h = torch.where(found, h_try.gather(1, first).squeeze(1), float(fallback_h))
    w = torch.where(found, w_try.gather(1, first).squeeze(1), float(fallback_w))
    top = torch.where(found, torch.floor(u_top * (height - h + 1)), float((height - fallback_h) // 2))
    left = torch.where(found, torch.floor(u_left * (width - w + 1)), float((width - fallback_w) // 2))
    return top, left, h, w, u_flip < hflip


def random_resized_crop_batch(imgs: torch.Tensor, out_size: int, scale: tuple[float, float] = (0.2, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                              generator: torch.Generator | None = None, mode: str = "bicubic") -> torch.Tensor:
    """Random resized crop + horizontal flip of every image of a batch, each with its own box.

    Args:
        imgs: [B, C, H, W] floating point, on any device.
        out_size: side of the square output.
        scale: range of the crop's area as a fraction of the image's area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip: probability of a horizontal flip.
        generator: a torch.Generator on imgs.device, for reproducible draws (None: the global RNG).
        mode: interpolation of `grid_sample` ("bicubic" as MAE's PIL pipeline, "bilinear" or "nearest").

    Returns:
        [B, C, out_size, out_size], same dtype and device as imgs.
    """
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or not imgs.is_floating_point():
        raise ValueError(f"imgs must be a floating point [B, C, H, W] tensor, got {getattr(imgs, 'shape', imgs)}")
    if out_size < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batch, channels, height, width = imgs.shape
    top, left, h, w, flip = sample_crop_boxes(batch, height, width, scale, ratio, hflip, generator, imgs.device)

    # affine_grid maps output coordinates in [-1, 1] (pixel edges, align_corners=False) to input coordinates:
    # x_in = sx * x_out + tx, with sx the crop's share of the width and tx the crop centre, both normalised.
    scale_x = torch.where(flip, -w / width, w / width)
    scale_y = h / height
    shift_x = (2 * left + w) / width - 1
    shift_y = (2 * top + h) / height - 1
    zeros = torch.zeros_like(scale_y)
    theta = torch.stack([torch.stack([scale_x, zeros, shift_x], dim=1),
                         torch.stack([zeros, scale_y, shift_y], dim=1)], dim=1).to(imgs.dtype)  # [B, 2, 3]
    grid = F.affine_grid(theta, [batch, channels, out_size, out_size], align_corners=False)
    return F.grid_sample(imgs, grid, mode=mode, padding_mode="border", align_corners=False)
