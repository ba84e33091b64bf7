"""The unaugmented evaluation data of every data set (linear probe, kNN, few-shot probe, fine-tuning's val split):
whole splits decoded into memory on the CPU, optionally capped by a seeded random subset."""
from __future__ import annotations

import math

import numpy as np
import torch

from .decode import ImageDecoder, normalise_batch, to_chw
from .digits import stratified_split
from .folder import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS, ImageFolder, warn_skipped
from .loader import SYNTHETIC_TRAIN_SEED, SYNTHETIC_VAL_SEED, _check_name, _digits, _folder_roots, _shard_roots
from .shards import ShardReader, open_shards
from .synthetic import synthetic_images


def _read_shards(path: str, count: int | None, img_size: int, channels: int, decoder: str,
                 max_image_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` usable samples (all if None) in stored order (the writer shuffled it), unaugmented and
    normalised; unusable samples are left out and warned about (once per sample per run)."""
    reader = ShardReader(open_shards(path), ImageDecoder(img_size, channels, decoder, max_image_pixels), train=False)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
    imgs, labels, skipped = [], [], []
    for shard, shard_path in enumerate(reader.shards.paths):
        for sample in reader.samples(shard):
            if count is not None and len(imgs) >= count:
                break
            try:
                if sample.image is None:
                    raise ValueError(sample.problem)
                imgs.append(to_chw(reader.decoder.eval_crop(sample.image)))
                labels.append(sample.label)
            except Exception as err:   # noqa: BLE001 - codecs raise anything on broken bytes
                skipped.append((f"{shard_path}:{sample.key}", f"{type(err).__name__}: {err}"))
    warn_skipped(skipped)
    if not imgs:
        raise ValueError(f"{path}: no usable samples in the shards")
    return normalise_batch(torch.stack(imgs), mean, std), torch.tensor(labels)


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
                    num_workers: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS, decoder: str = "auto"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unaugmented (train_imgs, train_labels, val_imgs, val_labels) on the CPU, for linear probe and kNN.

    digits: the fixed stratified split. synthetic: the pre-training images and `synthetic_size * val_fraction`
    fresh ones. folder: path/train and path/val if both exist, else a stratified `val_fraction` split of path
    (whose images pre-training also saw, without labels). `max_images` caps each split (a seeded random
    subset); folder images are all decoded into memory, so cap large folders. webdataset: as folder, where the
    cap takes the first samples in shard order (already shuffled by the writer), so only those shards are read.
    """
    _check_name(name)
    if name == "webdataset":
        train_path, val_path = _shard_roots(path)
        read = dict(img_size=img_size, channels=channels, decoder=decoder, max_image_pixels=max_image_pixels)
        if val_path is not None:
            train = _read_shards(train_path, max_images, **read)
            val = _read_shards(val_path, max_images, **read)
        else:   # enough for both capped splits of a stratified split
            wanted = None if max_images is None else math.ceil(max_images / min(val_fraction, 1 - val_fraction))
            imgs, labels = _read_shards(train_path, wanted, **read)
            train_idx, val_idx = stratified_split(labels.numpy(), val_fraction, seed)
            if len(val_idx) == 0 or len(train_idx) == 0:
                raise ValueError(f"{train_path}: too few samples for a train/val split; add samples or a val/ split")
            train, val = (imgs[train_idx], labels[train_idx]), (imgs[val_idx], labels[val_idx])
    elif name == "digits":
        train = _digits("train", img_size, channels, val_fraction)
        val = _digits("val", img_size, channels, val_fraction)
    elif name == "synthetic":
        train = synthetic_images(synthetic_size, channels, img_size, SYNTHETIC_TRAIN_SEED)
        val = synthetic_images(max(1, int(round(synthetic_size * val_fraction))), channels, img_size,
                               SYNTHETIC_VAL_SEED)
    else:
        train_root, val_root = _folder_roots(path)
        train_set = ImageFolder(train_root, img_size, channels, train=False, max_image_pixels=max_image_pixels,
                                decoder=decoder)
        if val_root is not None:
            val_set = ImageFolder(val_root, img_size, channels, train=False, classes=train_set.classes,
                                  max_image_pixels=max_image_pixels, decoder=decoder)
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
