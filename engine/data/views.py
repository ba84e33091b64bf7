"""Views for contrastive and self-distillation objectives (SimCLR and MoCo v3's two views, DINO's multi-crop of
global and smaller local views), batched on the tensor's device.

Per view, in order (SimCLR's pipeline; MoCo v3 uses BYOL's asymmetric probabilities, one spec per view):
random resized crop + horizontal flip (`augment.random_resized_crop_batch`, bilinear), colour jitter with
probability `jitter_prob` (brightness, contrast, then saturation and hue where there are 3 channels), random
grayscale (3 channels only), Gaussian blur, solarisation. Every sample draws its own parameters from one
`torch.Generator`, so a step's views are a function of that generator's seed alone (exact resume).

Images arrive normalised (digits: scalar standardisation; folders: ImageNet mean/std). The colour operations
are defined on [0, 1] pixels, so each channel is mapped to [0, 1] by the batch's per-channel min and max
(for normalised 8-bit images these are the normalised values of pixel 0 and 1 up to a few levels), jittered
and clamped there as torchvision does, and mapped back. Departures from torchvision, to stay batched: the
jitter runs in a fixed order (torchvision shuffles it per image); hue is a rotation of the chroma plane in
YIQ space (torchvision shifts H in HSV: the same near the grey axis, smoother on saturated colours); the
blur kernel's radius is ceil(3 * max sigma) (torchvision: a fixed kernel size, 10% of the image in SimCLR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import random_resized_crop_batch

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# uniforms per sample per view: jitter?, brightness, contrast, saturation, hue, gray?, blur?, sigma, solarize?
NUM_DRAWS = 9


@dataclass(frozen=True)
class ViewAugment:
    """One view's augmentation. Defaults: BYOL / MoCo v3's first view at ImageNet scale."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4     # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1            # rotation of up to hue * 360 degrees, hue <= 0.5
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels
    solarize_prob: float = 0.0

    def __post_init__(self):
        for name in ("hflip", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")


def _factor(u: torch.Tensor, strength: float, apply: torch.Tensor) -> torch.Tensor:
    """A factor uniform in [max(0, 1 - s), 1 + s] where ``apply``, else 1; shaped [B, 1, 1, 1]."""
    lo = max(0.0, 1.0 - strength)
    factor = lo + (1.0 + strength - lo) * u
    return torch.where(apply, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma of [B, 3, H, W] (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _hue_rotation(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of every RGB image by ``turns`` [B] of a full circle."""
    to_yiq = torch.tensor(RGB_TO_YIQ, dtype=x.dtype, device=x.device)
    angle = 2 * math.pi * turns.to(x.dtype)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(turns), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrix, x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma [B] (identity where not ``apply``), reflect padding."""
    batch, channels, height, width = x.shape
    radius = min(math.ceil(3 * max_sigma), height - 1, width - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma.to(x.dtype).view(-1, 1).square()))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply.view(-1, 1), kernel, identity)  # [B, K]
    kernel = kernel.repeat_interleave(channels, dim=0)  # [B*C, K]: one filter per (sample, channel)
    y = x.reshape(1, batch * channels, height, width)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(-1, 1, 2 * radius + 1, 1),
                 groups=batch * channels)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, 2 * radius + 1),
                 groups=batch * channels)
    return y.view(batch, channels, height, width)


def augment_view(imgs: torch.Tensor, spec: ViewAugment, generator: torch.Generator | None,
                 pixel_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out_size: int | None = None) -> torch.Tensor:
    """One augmented view of every image of ``imgs`` [B, C, H, W] (C = 1 or 3), same dtype and device, of
    side ``out_size`` (default H: the shape of ``imgs``).

    ``pixel_range``: per-channel values [1, C, 1, 1] of black and white; default the batch's min and max.
    """
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or not imgs.is_floating_point():
        raise ValueError(f"imgs must be a floating point [B, C, H, W] tensor, got {getattr(imgs, 'shape', imgs)}")
    batch, channels, height, width = imgs.shape
    if channels not in (1, 3):
        raise ValueError(f"imgs must have 1 or 3 channels, got {channels}")
    if height != width:
        raise ValueError(f"imgs must be square, got {height}x{width}")
    lo, hi = pixel_range if pixel_range is not None else batch_pixel_range(imgs)
    span = (hi - lo).clamp_min(1e-6)

    x = random_resized_crop_batch(imgs, out_size or height, scale=spec.crop_scale, ratio=spec.crop_ratio,
                                  hflip=spec.hflip, generator=generator, mode="bilinear")
    x = ((x - lo) / span).clamp(0, 1)
    u = torch.rand(batch, NUM_DRAWS, generator=generator, device=imgs.device, dtype=torch.float32)
    jitter = u[:, 0] < spec.jitter_prob
    x = (x * _factor(u[:, 1], spec.brightness, jitter)).clamp(0, 1)
    c = _factor(u[:, 2], spec.contrast, jitter)
    x = (c * x + (1 - c) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    if channels == 3:
        s = _factor(u[:, 3], spec.saturation, jitter)
        x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)
        turns = torch.where(jitter, (2 * u[:, 4] - 1) * spec.hue, torch.zeros_like(u[:, 4]))
        x = _hue_rotation(x, turns).clamp(0, 1)
        gray = (u[:, 5] < spec.grayscale_prob).view(-1, 1, 1, 1)
        x = torch.where(gray, _gray(x).expand_as(x), x)
    lo_sigma, hi_sigma = spec.blur_sigma
    x = _gaussian_blur(x, lo_sigma + (hi_sigma - lo_sigma) * u[:, 7], u[:, 6] < spec.blur_prob, hi_sigma)
    solarize = (u[:, 8] < spec.solarize_prob).view(-1, 1, 1, 1)
    x = torch.where(solarize & (x >= 0.5), 1 - x, x)
    return x * span + lo


def batch_pixel_range(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) over the batch, [1, C, 1, 1] each: the values that stand for black and white."""
    flat = imgs.detach().transpose(0, 1).reshape(imgs.shape[1], -1)
    return flat.amin(dim=1).view(1, -1, 1, 1), flat.amax(dim=1).view(1, -1, 1, 1)


def two_views(imgs: torch.Tensor, generator: torch.Generator | None, first: ViewAugment,
              second: ViewAugment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of a batch (``second`` defaults to ``first``), drawn in order from
    ``generator``. Both views share the batch's pixel range, so the same image maps to the same pixels."""
    pixel_range = batch_pixel_range(imgs)
    view1 = augment_view(imgs, first, generator, pixel_range)
    view2 = augment_view(imgs, second or first, generator, pixel_range)
    return view1, view2


def multi_crop(imgs: torch.Tensor, generator: torch.Generator | None, global_views: tuple[ViewAugment, ...],
               global_size: int, local_view: ViewAugment | None = None, num_local: int = 0,
               local_size: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DINO's multi-crop: one view per spec of ``global_views`` at ``global_size`` and ``num_local`` views of
    ``local_view`` at ``local_size``, drawn in that order from ``generator`` and sharing the batch's pixel
    range. Returns (global views, local views), each a list of [B, C, side, side]; callers batch each list
    with ``torch.cat`` into DINO's crop-major order [g1 | g2 | l1 .. ln] (row v * B + b is crop v of image b).
    """
    if num_local < 0:
        raise ValueError(f"num_local must be >= 0, got {num_local}")
    if num_local and (local_view is None or not local_size):
        raise ValueError("local views need local_view and local_size")
    pixel_range = batch_pixel_range(imgs)
    globals_ = [augment_view(imgs, spec, generator, pixel_range, global_size) for spec in global_views]
    locals_ = [augment_view(imgs, local_view, generator, pixel_range, local_size) for _ in range(num_local)]
    return globals_, locals_


__all__ = ["ViewAugment", "augment_view", "two_views", "multi_crop", "batch_pixel_range"]
