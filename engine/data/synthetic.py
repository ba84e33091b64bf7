"""Deterministic synthetic images with learnable structure, for benchmarks and tests (no files needed).

Each image is a coloured sinusoidal grating plus a few coloured Gaussian blobs. The label is the grating's
orientation bucket (NUM_CLASSES buckets over 180 degrees), so a linear probe has something real to find, and
the smooth content makes masked patches predictable from their neighbours, so reconstruction is learnable.
"""
from __future__ import annotations

import math

import torch

NUM_CLASSES = 10
NUM_BLOBS = 3


def synthetic_images(n: int, channels: int, img_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [n, channels, img_size, img_size] float32, labels [n] int64), on the CPU.

    The same (n, channels, img_size, seed) always gives the same tensors. Images are normalised to zero mean
    and unit standard deviation over the whole set (one scalar each).
    """
    if n < 1 or channels < 1 or img_size < 1:
        raise ValueError(f"n, channels and img_size must be positive, got {n}, {channels}, {img_size}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    bucket = math.pi / NUM_CLASSES
    theta = (labels.float() + 0.5 + 0.6 * (torch.rand(n, generator=g) - 0.5)) * bucket  # stays in its bucket
    cycles = 1.0 + 1.5 * torch.rand(n, generator=g)  # grating periods across the image
    phase = 2 * math.pi * torch.rand(n, generator=g)
    grating_colour = 0.5 + 0.5 * torch.rand(n, channels, generator=g)
    centres = 2 * torch.rand(n, NUM_BLOBS, 2, generator=g) - 1
    sigma = 0.15 + 0.35 * torch.rand(n, NUM_BLOBS, generator=g)
    blob_colour = torch.randn(n, NUM_BLOBS, channels, generator=g)

    # Both parts are separable in (row, col): cos(u + v) = cos u cos v - sin u sin v for the grating, and a
    # Gaussian is a product of two 1-D Gaussians. So each image is a rank-(2 + NUM_BLOBS) matrix product.
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size * 2 - 1  # pixel centres in [-1, 1]
    freq = math.pi * cycles[:, None]
    u = freq * theta[:, None].cos() * coords + phase[:, None]  # [n, S] along the columns (x)
    v = freq * theta[:, None].sin() * coords  # [n, S] along the rows (y)
    blob_y = torch.exp(-(coords - centres[:, :, 1, None]) ** 2 / (2 * sigma[:, :, None] ** 2))  # [n, K, S]
    blob_x = torch.exp(-(coords - centres[:, :, 0, None]) ** 2 / (2 * sigma[:, :, None] ** 2))
    row_terms = torch.cat([
        grating_colour[:, :, None, None] * torch.stack([v.cos(), -v.sin()], dim=1)[:, None],  # [n, C, 2, S]
        blob_colour.transpose(1, 2)[..., None] * blob_y[:, None]], dim=2)  # [n, C, 2+K, S]
    col_terms = torch.cat([torch.stack([u.cos(), u.sin()], dim=1), blob_x], dim=1)  # [n, 2+K, S]
    rows = row_terms.transpose(2, 3).reshape(n, channels * img_size, 2 + NUM_BLOBS)  # [n, C*S, 2+K]
    imgs = torch.bmm(rows, col_terms).view(n, channels, img_size, img_size)
    mean, std = imgs.mean(), imgs.std().clamp_min(1e-6)
    imgs.sub_(mean).div_(std)
    return imgs, labels
