"""The training input pipeline: deterministic, per-rank, and resumable at any step.

Every random choice is a function of fixed numbers, never of RNG state carried across steps:
- epoch e's sample order is a permutation drawn from a generator seeded with (seed, e), the same on all ranks;
- global batch s is order[s*B*W : (s+1)*B*W] (B = per-rank batch, W = world size; the tail is dropped), and
  rank r takes its slice [r*B : (r+1)*B];
- tensor data sets (digits, synthetic) live on the device and are augmented there in one batched call with a
  generator seeded from (seed, e, s, r); image folders crop each sample from (seed, e, index).
So `batches(e, start_step=k)` yields exactly what an uninterrupted epoch yields from step k on, and a resumed
run needs only (epoch, step) from its checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .augment import random_resized_crop_batch
from .digits import load_digits, stratified_split
from .folder import MAX_IMAGE_PIXELS, ImageFolder, find_samples, warn_skipped
from .synthetic import synthetic_images

DATASETS = ("digits", "folder", "synthetic")
DIGITS_SIZE = 8
SYNTHETIC_TRAIN_SEED, SYNTHETIC_VAL_SEED = 0, 1  # the synthetic images are fixed; `seed` drives order/augmentation


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _upsample(imgs: torch.Tensor, img_size: int) -> torch.Tensor:
    if imgs.shape[-1] == img_size:
        return imgs
    return F.interpolate(imgs, size=(img_size, img_size), mode="bicubic", align_corners=False)


def _digits(split: str, img_size: int, channels: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits at img_size (>= 8, bicubic upsampling) with 1 or 3 (repeated gray) channels."""
    if img_size < DIGITS_SIZE:
        raise ValueError(f"img_size must be at least {DIGITS_SIZE} for digits (native 8x8), got {img_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 for digits (grayscale, repeated for 3), got {channels}")
    imgs, labels = load_digits(split, val_fraction)
    return _upsample(imgs, img_size).repeat(1, channels, 1, 1), labels


def _folder_roots(path: str) -> tuple[Path, Path | None]:
    """(train root, val root or None): path/train and path/val when present, else path itself."""
    if not path:
        raise ValueError("data set 'folder' needs a path (the image folder)")
    root = Path(path)
    if (root / "train").is_dir():
        return root / "train", (root / "val") if (root / "val").is_dir() else None
    return root, None


class TrainData:
    """One epoch at a time of (images [B, C, S, S] float32, labels [B] int64), both on the device."""

    steps_per_epoch: int
    num_samples: int
    channels: int
    img_size: int
    # per-channel statistics the images were normalised with (None: already standardised, e.g. digits)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_skipped: int = 0  # unreadable images skipped (image folders)
    counts_skips = False  # True where images can be unreadable (image folders): see skipped_in_epoch

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int, device):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size * world_size > num_samples:
            raise ValueError(f"train.batch_size={batch_size} x {world_size} processes exceeds the {num_samples} "
                             f"training images: lower train.batch_size to at most {num_samples // world_size} "
                             f"(or use more images)")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.steps_per_epoch = num_samples // (batch_size * world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global sample order of an epoch (CPU int64), identical on every rank."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def rank_indices(self, epoch: int, start_step: int = 0) -> torch.Tensor:
        """This rank's sample indices for steps start_step..steps_per_epoch-1, as [steps, B]."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must lie in [0, {self.steps_per_epoch}], got {start_step}")
        global_batch = self.batch_size * self.world_size
        order = self.epoch_order(epoch)[: self.steps_per_epoch * global_batch]
        order = order.view(self.steps_per_epoch, self.world_size, self.batch_size)
        return order[start_step:, self.rank]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def skipped_in_epoch(self, epoch: int) -> int:
        """Images of ``epoch`` (as far as this process has read it) that could not be used and were replaced."""
        return 0


class TensorTrainData(TrainData):
    """A data set held as one tensor on the device, augmented on the device in one call per step."""

    def __init__(self, imgs: torch.Tensor, labels: torch.Tensor, *, img_size: int, crop_scale, hflip: float,
                 batch_size: int, seed: int, device, rank: int, world_size: int):
        super().__init__(len(imgs), batch_size, seed, rank, world_size, device)
        self.imgs = imgs.to(self.device, torch.float32)
        self.labels = labels.to(self.device, torch.int64)
        self.channels, self.img_size = imgs.shape[1], img_size
        self.crop_scale, self.hflip = tuple(crop_scale), hflip

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.rank_indices(epoch, start_step)
        if self.device.type == "cuda":
            indices = indices.pin_memory()  # so the copy below is asynchronous
        indices = indices.to(self.device, non_blocking=True)
        for offset, idx in enumerate(indices):
            step = start_step + offset
            g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, epoch, step, self.rank))
            imgs = random_resized_crop_batch(self.imgs[idx], self.img_size, scale=self.crop_scale,
                                             hflip=self.hflip, generator=g)
            yield imgs, self.labels[idx]


class _EpochView(torch.utils.data.Dataset):
    """An image folder frozen at one epoch: workers get the epoch with their copy, whatever set_epoch does later."""

    def __init__(self, dataset: ImageFolder, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        return self.dataset.sample_with_skips(index, self.epoch)


def _collate_with_skips(batch):
    """(images, labels, [(path, why) skipped while decoding this batch])."""
    imgs, labels, skipped = zip(*batch)
    return torch.stack(imgs), torch.tensor(labels), [item for items in skipped for item in items]


class FolderTrainData(TrainData):
    """An image folder decoded by DataLoader workers; the sampler hands over this rank's indices from a step."""

    def __init__(self, dataset: ImageFolder, *, batch_size: int, seed: int, device, rank: int, world_size: int,
                 num_workers: int):
        super().__init__(len(dataset), batch_size, seed, rank, world_size, device)
        self.dataset, self.num_workers = dataset, num_workers
        self.channels, self.img_size = dataset.channels, dataset.img_size
        self.mean, self.std = dataset.mean, dataset.std
        self._skipped: dict[int, int] = {}

    counts_skips = True

    @property
    def num_skipped(self) -> int:
        """Images skipped so far by this rank, workers included (they report each skip with its batch)."""
        return sum(self._skipped.values())

    def skipped_in_epoch(self, epoch: int) -> int:
        return self._skipped.get(epoch, 0)

    def _note_skips(self, epoch: int, skipped: list[tuple[str, str]]) -> None:
        """Count per epoch; warn once per file per run (here, in the main process, not in each worker copy)."""
        self._skipped[epoch] = self._skipped.get(epoch, 0) + len(skipped)
        warn_skipped(skipped)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.rank_indices(epoch, start_step)
        loader = torch.utils.data.DataLoader(
            _EpochView(self.dataset, epoch), batch_size=self.batch_size, sampler=indices.flatten().tolist(),
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", drop_last=False,
            collate_fn=_collate_with_skips)
        for imgs, labels, skipped in loader:
            if skipped:
                self._note_skips(epoch, skipped)
            yield imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def build_train_data(name: str, *, path: str = "", img_size: int, channels: int = 3,
                     crop_scale=(0.2, 1.0), hflip: float = 0.5, val_fraction: float = 0.2, batch_size: int,
                     seed: int, device, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     synthetic_size: int = 2048, max_image_pixels: int = MAX_IMAGE_PIXELS) -> TrainData:
    """The pre-training input pipeline of data set `name` ("digits", "folder" or "synthetic").

    digits: the train split only (the val split is held out for the probe), upsampled to img_size if larger.
    folder: path/train if it exists, else path. synthetic: `synthetic_size` fixed generated images.
    """
    _check_name(name)
    common = dict(batch_size=batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
    if name == "folder":
        train_root, val_root = _folder_roots(path)
        dataset = ImageFolder(train_root, img_size, channels, train=True, crop_scale=crop_scale, hflip=hflip,
                              seed=seed, max_image_pixels=max_image_pixels)
        if val_root is not None:   # the probe reads it at the end: refuse a layout it cannot label now
            find_samples(val_root, dataset.classes)
        return FolderTrainData(dataset, num_workers=num_workers, **common)
    if name == "digits":
        imgs, labels = _digits("train", img_size, channels, val_fraction)
    else:
        imgs, labels = synthetic_images(synthetic_size, channels, img_size, SYNTHETIC_TRAIN_SEED)
    return TensorTrainData(imgs, labels, img_size=img_size, crop_scale=crop_scale, hflip=hflip, **common)


def _load_all(dataset: ImageFolder, indices: np.ndarray, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(indices) == 0:
        raise ValueError(f"{dataset.root}: too few images for a train/val split; add images or a val folder")
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=num_workers)
    imgs, labels = zip(*loader)
    return torch.cat(imgs), torch.cat(labels)


def _pick(num: int, max_images: int | None, seed: int) -> np.ndarray:
    if max_images is None or num <= max_images:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).permutation(num)[:max_images])


def build_eval_data(name: str, *, path: str = "", img_size: int, channels: int = 3, val_fraction: float = 0.2,
                    seed: int = 0, synthetic_size: int = 2048, max_images: int | None = None,
                    num_workers: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unaugmented (train_imgs, train_labels, val_imgs, val_labels) on the CPU, for linear probe and kNN.

    digits: the fixed stratified split. synthetic: the pre-training images and `synthetic_size * val_fraction`
    fresh ones. folder: path/train and path/val if both exist, else a stratified `val_fraction` split of path
    (whose images pre-training also saw, without labels). `max_images` caps each split (a seeded random
    subset); folder images are all decoded into memory, so cap large folders.
    """
    _check_name(name)
    if name == "digits":
        train = _digits("train", img_size, channels, val_fraction)
        val = _digits("val", img_size, channels, val_fraction)
    elif name == "synthetic":
        train = synthetic_images(synthetic_size, channels, img_size, SYNTHETIC_TRAIN_SEED)
        val = synthetic_images(max(1, int(round(synthetic_size * val_fraction))), channels, img_size,
                               SYNTHETIC_VAL_SEED)
    else:
        train_root, val_root = _folder_roots(path)
        train_set = ImageFolder(train_root, img_size, channels, train=False, max_image_pixels=max_image_pixels)
        if val_root is not None:
            val_set = ImageFolder(val_root, img_size, channels, train=False, classes=train_set.classes,
                                  max_image_pixels=max_image_pixels)
            train_idx, val_idx = np.arange(len(train_set)), np.arange(len(val_set))
        else:
            val_set = train_set
            train_idx, val_idx = stratified_split(np.asarray(train_set.targets), val_fraction, seed)
        train_idx = train_idx[_pick(len(train_idx), max_images, seed)]
        val_idx = val_idx[_pick(len(val_idx), max_images, seed + 1)]
        return (*_load_all(train_set, train_idx, num_workers), *_load_all(val_set, val_idx, num_workers))
    train_keep = torch.from_numpy(_pick(len(train[0]), max_images, seed))
    val_keep = torch.from_numpy(_pick(len(val[0]), max_images, seed + 1))
    return train[0][train_keep], train[1][train_keep], val[0][val_keep], val[1][val_keep]
