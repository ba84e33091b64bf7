"""scikit-learn's digits: 1,797 real 8x8 handwritten digits that ship inside the package (no download).

The embedded default data set. Pixels are 0..16 integers; we hold out a fixed stratified validation split
for the linear probe and normalise every split with the *train* split's scalar mean and std, as ImageNet
pipelines normalise with statistics of the training images.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

SPLITS = ("train", "val", "all")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: round(n_c * val_fraction) of each class go to val. Sorted indices."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        num_val = int(round(len(members) * val_fraction))
        val_idx.append(members[:num_val])
        train_idx.append(members[num_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError("the 'digits' data set ships with scikit-learn: `pip install scikit-learn`") from err
    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    return images, bunch.target.astype(np.int64)


def load_digits(split: str, val_fraction: float = 0.2, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N,1,8,8] float32, labels [N] int64) of one split, normalised by train statistics.

    Args:
        split: "train", "val" or "all" (all 1,797 images, still normalised with the train statistics).
        val_fraction: fraction of every class held out for validation.
        split_seed: seed of the (fixed) stratified split; keep the default so pre-training and probing agree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _raw_digits()
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    train_pixels = images[train_idx]
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    idx = {"train": train_idx, "val": val_idx, "all": np.arange(len(labels))}[split]
    imgs = torch.from_numpy((images[idx] - mean) / std).unsqueeze(1).contiguous()
    return imgs, torch.from_numpy(labels[idx].copy())
