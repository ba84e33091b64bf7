"""The training input pipeline: deterministic, per-rank, and resumable at any step.

Every random choice is a function of fixed numbers, never of RNG state carried across steps:
- epoch e's sample order is a permutation drawn from a generator seeded with (seed, e), the same on all ranks;
- global batch s is order[s*B*W : (s+1)*B*W] (B = per-rank batch, W = world size; the tail is dropped), and
  rank r takes its slice [r*B : (r+1)*B];
- tensor data sets (digits, synthetic) live on the device and are augmented there in one batched call with a
  generator seeded from (seed, e, s, r); image folders crop each sample from (seed, e, index);
- image folders and tar shards are decoded to uint8 by DataLoader workers (persistent across epochs), copied to
  the device on a side stream and normalised and flipped there; shards have their own per-rank, per-worker
  order (ShardTrainData), still a pure function of (seed, e) and the layout.
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
from .decode import ImageDecoder, normalise_batch
from .digits import load_digits
from .folder import (GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS, ImageFolder, find_samples,
                     warn_skipped)
from .shards import ShardReader, open_shards
from .synthetic import synthetic_images

DATASETS = ("digits", "folder", "synthetic", "webdataset")
SHARD_SALT = 0x5A4D   # keeps the shard permutations apart from the sample permutations of the same (seed, epoch)
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


def _folder_roots(path: str, name: str = "folder") -> tuple[Path, Path | None]:
    """(train root, val root or None): path/train and path/val when present, else path itself."""
    if not path:
        raise ValueError(f"data set {name!r} needs a path (the image folder)" if name == "folder" else
                         "data set 'webdataset' needs data.path: a folder of shards (with index.json, as "
                         "`python -m sslpt shard` writes) or a pattern such as /data/in1k/shard-{000000..001281}.tar")
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


def _collate_uint8(batch):
    """(uint8 images [B, C, S, S], labels [B], flips [B] bool, [(where, why) skipped while decoding this batch])."""
    imgs, labels, flips, skipped = zip(*batch)
    return (torch.stack(imgs), torch.tensor(labels), torch.tensor(flips),
            [item for items in skipped for item in items])


class _BatchKeys(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: the batches of sample keys of the current epoch, from its first step.
    Set before each iter(loader): one loader (and its persistent workers) serves every epoch."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _FolderByKey(torch.utils.data.Dataset):
    """An image folder addressed by (epoch, index): the key carries the epoch to the (persistent) workers."""

    def __init__(self, dataset: ImageFolder):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset.sample_uint8(key[1], key[0])


def feed_device(batches, device: torch.device, mean, std, on_skips) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 host batches -> (normalised, flipped float32 images, labels) on `device`.

    On CUDA the host-to-device copy of batch i+1 runs on a side stream while the caller computes on batch i; the
    compute stream waits for that copy's event only (not for later copies), and record_stream tells the caching
    allocator that memory allocated on the side stream is in use on the compute stream until it is done there.
    """
    if device.type != "cuda":
        for imgs, labels, flips, skipped in batches:
            on_skips(skipped)
            yield normalise_batch(imgs.to(device), mean, std, flips.to(device)), labels.to(device)
        return
    copy_stream = torch.cuda.Stream(device)
    mean_t = torch.tensor(mean, dtype=torch.float32).to(device)
    std_t = torch.tensor(std, dtype=torch.float32).to(device)

    def start(batch):
        imgs, labels, flips, skipped = batch
        on_skips(skipped)
        with torch.cuda.stream(copy_stream):
            moved = [t.to(device, non_blocking=True) for t in (imgs, labels, flips)]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return moved, ready

    def finish(moved, ready):
        compute = torch.cuda.current_stream(device)
        compute.wait_event(ready)
        for tensor in moved:
            tensor.record_stream(compute)
        imgs, labels, flips = moved
        return normalise_batch(imgs, mean_t, std_t, flips), labels

    pending = None
    for batch in batches:
        started = start(batch)
        if pending is not None:
            yield finish(*pending)
        pending = started
    if pending is not None:
        yield finish(*pending)


class _WorkerTrainData(TrainData):
    """Images decoded to uint8 by DataLoader workers (persistent across epochs), normalised and flipped on the
    device; subclasses say which sample keys make each step's batch."""

    counts_skips = True

    def __init__(self, keyed_dataset, *, num_workers: int, **common):
        super().__init__(**common)
        self.keyed_dataset, self.num_workers = keyed_dataset, num_workers
        self._skipped: dict[int, int] = {}
        self._keys = _BatchKeys()
        self._loader = None

    @property
    def num_skipped(self) -> int:
        """Images skipped so far by this rank, workers included (they report each skip with its batch)."""
        return sum(self._skipped.values())

    def skipped_in_epoch(self, epoch: int) -> int:
        return self._skipped.get(epoch, 0)

    def _note_skips(self, epoch: int, skipped: list[tuple[str, str]]) -> None:
        """Count per epoch; warn once per file per run (here, in the main process, not in each worker copy)."""
        if skipped:
            self._skipped[epoch] = self._skipped.get(epoch, 0) + len(skipped)
            warn_skipped(skipped)

    def batch_keys(self, epoch: int, start_step: int) -> list[list]:
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must lie in [0, {self.steps_per_epoch}], got {start_step}")
        self._keys.batches = self.batch_keys(epoch, start_step)
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.keyed_dataset, batch_sampler=self._keys, num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda", collate_fn=_collate_uint8,
                persistent_workers=self.num_workers > 0)
        yield from feed_device(self._loader, self.device, self.mean, self.std,
                               lambda skipped: self._note_skips(epoch, skipped))


class FolderTrainData(_WorkerTrainData):
    """An image folder; the sampler hands over this rank's indices from a step (the order is the base class's,
    independent of the number of workers)."""

    def __init__(self, dataset: ImageFolder, *, batch_size: int, seed: int, device, rank: int, world_size: int,
                 num_workers: int):
        super().__init__(_FolderByKey(dataset), num_workers=num_workers, num_samples=len(dataset),
                         batch_size=batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.channels, self.img_size = dataset.channels, dataset.img_size
        self.mean, self.std = dataset.mean, dataset.std

    def batch_keys(self, epoch: int, start_step: int) -> list[list]:
        return [[(epoch, i) for i in row] for row in self.rank_indices(epoch, start_step).tolist()]


class ShardTrainData(_WorkerTrainData):
    """Tar shards, split per rank and per worker ("stream"), each read in order, once per epoch.

    Epoch e: the shards in a permutation seeded with (seed, e); rank r takes every world_size-th from r, and its
    k-th stream (k < streams = max(1, num_workers)) every streams-th of those; a stream's samples are its shards
    one after the other, each shuffled (seeded with (seed, e, shard)), cut into batches. Step i is batch i //
    streams of stream i % streams: the DataLoader hands the epoch's batches to its workers in turn, so each
    worker reads one stream's shards only (a resumed epoch changes which worker that is, never what a batch
    holds: the keys alone say that). Every stream yields the same number of batches, the most that any
    assignment of shards guarantees (a stream's last partial batch, and any surplus, is left out of that epoch). The order depends on
    (seed, epoch, world size, num_workers): resume with the same ones (a resumed run of the CLI does).
    """

    def __init__(self, reader: ShardReader, *, channels: int, img_size: int, batch_size: int, seed: int, device,
                 rank: int, world_size: int, num_workers: int):
        super().__init__(reader, num_workers=num_workers, num_samples=len(reader.shards), batch_size=batch_size,
                         seed=seed, device=device, rank=rank, world_size=world_size)
        self.reader, self.streams = reader, max(1, num_workers)
        self.channels, self.img_size = channels, img_size
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
        counts = reader.shards.counts
        per_stream = len(counts) // (world_size * self.streams)
        if per_stream == 0:
            raise ValueError(f"{len(counts)} shards cannot be split over {world_size} processes x {self.streams} "
                             f"loader workers (data.num_workers): write at least {world_size * self.streams} shards "
                             f"(a smaller --shard-size) or use fewer workers")
        guaranteed = sum(sorted(counts)[:per_stream]) // batch_size
        if guaranteed == 0:
            raise ValueError(f"train.batch_size={batch_size} exceeds the {sum(sorted(counts)[:per_stream])} samples "
                             f"each of the {world_size * self.streams} shard streams (processes x data.num_workers) "
                             f"is sure to get: lower train.batch_size, data.num_workers or --shard-size")
        self.batches_per_stream = guaranteed
        self.steps_per_epoch = guaranteed * self.streams

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's shard permutation (the same on every rank)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, SHARD_SALT))
        return torch.randperm(len(self.reader.shards.counts), generator=g).tolist()

    def stream_samples(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Per stream of this rank: its (shard, position) pairs in reading order, as far as its batches need."""
        counts, need = self.reader.shards.counts, self.batches_per_stream * self.batch_size
        mine = self.shard_order(epoch)[self.rank::self.world_size]
        streams = []
        for k in range(self.streams):
            samples: list[tuple[int, int]] = []
            for shard in mine[k::self.streams]:
                if len(samples) >= need:
                    break
                perm = np.random.default_rng([self.seed, epoch, shard, SHARD_SALT]).permutation(counts[shard])
                samples.extend((shard, int(p)) for p in perm)
            streams.append(samples[:need])
        return streams

    def batch_keys(self, epoch: int, start_step: int) -> list[list]:
        streams, size = self.stream_samples(epoch), self.batch_size
        keys = []
        for step in range(start_step, self.steps_per_epoch):
            stream, batch = streams[step % self.streams], step // self.streams
            keys.append([(epoch, shard, pos) for shard, pos in stream[batch * size:(batch + 1) * size]])
        return keys


def build_train_data(name: str, *, path: str = "", img_size: int, channels: int = 3,
                     crop_scale=(0.2, 1.0), hflip: float = 0.5, val_fraction: float = 0.2, batch_size: int,
                     seed: int, device, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     synthetic_size: int = 2048, max_image_pixels: int = MAX_IMAGE_PIXELS,
                     decoder: str = "auto") -> TrainData:
    """The pre-training input pipeline of data set `name` ("digits", "folder", "synthetic" or "webdataset").

    digits: the train split only (the val split is held out for the probe), upsampled to img_size if larger.
    folder: path/train if it exists, else path. synthetic: `synthetic_size` fixed generated images.
    webdataset: tar shards, path/train if it exists, else path (a shard folder or a brace pattern).
    decoder: JPEG decoder of folders and shards ("auto", "pil", "turbojpeg"; engine/data/decode.py).
    """
    _check_name(name)
    common = dict(batch_size=batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
    if name == "webdataset":
        train_root, _ = _shard_roots(path)
        reader = ShardReader(open_shards(str(train_root)), ImageDecoder(img_size, channels, decoder, max_image_pixels),
                             train=True, crop_scale=crop_scale, hflip=hflip, seed=seed)
        return ShardTrainData(reader, channels=channels, img_size=img_size, num_workers=num_workers, **common)
    if name == "folder":
        train_root, val_root = _folder_roots(path)
        dataset = ImageFolder(train_root, img_size, channels, train=True, crop_scale=crop_scale, hflip=hflip,
                              seed=seed, max_image_pixels=max_image_pixels, decoder=decoder)
        if val_root is not None:   # the probe reads it at the end: refuse a layout it cannot label now
            find_samples(val_root, dataset.classes)
        return FolderTrainData(dataset, num_workers=num_workers, **common)
    if name == "digits":
        imgs, labels = _digits("train", img_size, channels, val_fraction)
    else:
        imgs, labels = synthetic_images(synthetic_size, channels, img_size, SYNTHETIC_TRAIN_SEED)
    return TensorTrainData(imgs, labels, img_size=img_size, crop_scale=crop_scale, hflip=hflip, **common)


def _shard_roots(path: str) -> tuple[str, str | None]:
    """(train shards, val shards or None): path/train and path/val when they are folders, else path itself."""
    if not path:
        _folder_roots(path, "webdataset")   # raises the message that says what data.path should be
    root = Path(path)
    if (root / "train").is_dir():
        return str(root / "train"), str(root / "val") if (root / "val").is_dir() else None
    return path, None
