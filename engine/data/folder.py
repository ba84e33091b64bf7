"""An image folder data set (class subfolders) with MAE's train transform and a standard eval transform.

Layout: `root/<class>/**/<image>`; the label is the index of `<class>` among the sorted class folders. A root
holding its images directly (and no class folders with images) is one class, label 0 (unlabelled
pre-training); a labelled split (`classes` given, e.g. a `val/` folder next to `train/`) must have the class
folders: flat images there are refused, since every label would silently be 0.

Decoding (engine/data/decode.py, `decoder`): libjpeg-turbo or PIL, then crop and resize, all on uint8;
`sample_uint8` is what the training loader's workers call (normalisation and flips happen on the device),
`sample`/`sample_with_skips`/`__getitem__` return the normalised float tensor (evaluation, tests).

Robustness: the full decode happens inside the `try`. A file that fails to decode
(any exception PIL or a codec raises, fuzzed files included) or has more than `max_image_pixels` pixels (a
decompression bomb) is skipped and replaced by the next image of the same class; `sample_with_skips` reports
the skipped paths so the caller can count them per epoch and warn once per file per run (the training loader
does this in the main process, whatever the number of workers); `sample` counts them in `num_skipped` and warns
once per file itself. 20 bad files in a row raise, since that means a broken data set rather than a few bad
files. 16-bit images (PNG/TIFF `I;16`, `I`) are scaled by their bit depth, not clipped at 255.

Determinism: each sample's crop and flip come from a numpy generator seeded with (seed, epoch, index), fresh
for each file tried (a replacement image gets the draws the bad one would have had): call
`set_epoch` before each epoch (before a DataLoader iterator is created, as workers copy the data set), or use
`sample(index, epoch)`. A resumed run then sees the same crops.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .decode import ImageDecoder, normalise_batch, random_resized_crop_params, to_8bit, to_chw

__all__ = ["ImageFolder", "find_samples", "warn_skipped", "to_8bit", "random_resized_crop_params"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale has no agreed statistics; 0.5/0.5 maps [0, 1] to [-1, 1].
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
MAX_CONSECUTIVE_FAILURES = 20
MAX_IMAGE_PIXELS = 89_478_485   # PIL's own default: 1024 x 1024 x 1024 / 4 / 3


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def find_samples(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Scan `root`; return (class names, [(path, label)]). `classes` fixes the names/labels (e.g. a val split)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    per_class = {name: _images_under(root / name) for name in subdirs}
    per_class = {name: files for name, files in per_class.items() if files}
    direct = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name))
    if per_class:
        if direct:
            warnings.warn(f"{root}: {len(direct)} images directly in the root are ignored, "
                          f"the class folders {sorted(per_class)} are used", stacklevel=3)
        names = sorted(per_class) if classes is None else list(classes)
        unknown = sorted(set(per_class) - set(names))
        if unknown:
            raise ValueError(f"{root}: class folders {unknown} are not among the expected classes {names}")
        samples = [(path, names.index(name)) for name in sorted(per_class) for path in per_class[name]]
        return names, samples
    if direct and classes is not None:
        raise ValueError(f"{root} holds {len(direct)} images directly, without class folders, but it is a labelled "
                         f"split: the expected layout is {root}/<class>/<image> with the class folders of the train "
                         f"split ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}); move each image "
                         f"into its class folder (for ImageNet's flat val/, sort it by the ground-truth labels)")
    if direct:
        return [root.name], [(p, 0) for p in direct]
    raise ValueError(f"no images found in {str(root)!r} (looked for extensions {', '.join(IMG_EXTENSIONS)}, "
                     f"any case, directly or in class subfolders)")


_warned: set[str] = set()   # files warned about in this process (a run): each is named once, whatever reads it


def warn_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, why in skipped:
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"skipping unreadable image {path}: {why} (replaced by an image of its class)",
                          stacklevel=3)


class ImageFolder(torch.utils.data.Dataset):
    """Images of `root` as (tensor [C, img_size, img_size] float32 normalised, label int).

    Args:
        root: folder with one subfolder per class (or the images directly).
        img_size: output side in pixels.
        channels: 3 (RGB, ImageNet mean/std) or 1 (grayscale, mean 0.5, std 0.5).
        train: MAE's RandomResizedCrop + flip if True, else resize (shorter side to img_size * 8/7) + centre crop.
        crop_scale: area range of the random crop.
        hflip: probability of a horizontal flip (train only).
        seed: base seed of the per-sample randomness.
        classes: fixed class names (label = position), e.g. the train split's classes for the val split.
        max_image_pixels: images with more pixels are skipped (decompression bombs); PIL's cap is raised to match.
        decoder: "auto", "pil" or "turbojpeg" (engine/data/decode.py).
    """

    def __init__(self, root: str | os.PathLike, img_size: int, channels: int = 3, train: bool = True,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, seed: int = 0,
                 classes: list[str] | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS, decoder: str = "auto"):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.root = Path(root)
        self.classes, self.samples = find_samples(self.root, classes)
        self.targets = [label for _, label in self.samples]
        self.img_size, self.channels, self.train = img_size, channels, train
        self.crop_scale, self.hflip, self.seed = tuple(crop_scale), hflip, seed
        self.mean = IMAGENET_MEAN if channels == 3 else GRAY_MEAN
        self.std = IMAGENET_STD if channels == 3 else GRAY_STD
        self.epoch = 0
        self.num_skipped = 0
        self.max_image_pixels = max_image_pixels
        self.decoder = ImageDecoder(img_size, channels, decoder, max_image_pixels)
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(self.targets):
            by_class.setdefault(label, []).append(i)
        self._same_class = [None] * len(self.samples)
        for members in by_class.values():
            for k, i in enumerate(members):
                self._same_class[i] = (members, k)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        """Sample `index` as epoch `epoch` sees it (what __getitem__ returns after set_epoch(epoch))."""
        img, label, skipped = self.sample_with_skips(index, epoch)
        self.num_skipped += len(skipped)
        warn_skipped(skipped)
        return img, label

    def sample_with_skips(self, index: int, epoch: int) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        """(normalised float image, label, [(path, why) of the files skipped on the way])."""
        pixels, label, flip, skipped = self.sample_uint8(index, epoch)
        img = normalise_batch(pixels[None], self.mean, self.std, torch.tensor([flip]))[0]
        return img, label, skipped

    def sample_uint8(self, index: int, epoch: int) -> tuple[torch.Tensor, int, bool, list[tuple[str, str]]]:
        """(uint8 [C, S, S] crop, label, flip?, [(path, why) skipped]): an image that cannot be decoded is
        replaced by the next one of the same class. The flip is the caller's to apply (on the device)."""
        members, position = self._same_class[index]
        skipped = []
        for attempt in range(min(MAX_CONSECUTIVE_FAILURES, len(members))):
            path, label = self.samples[members[(position + attempt) % len(members)]]
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                data = path.read_bytes()
                if self.train:
                    pixels, flip = self.decoder.train_crop(data, rng, self.crop_scale, self.hflip)
                else:
                    pixels, flip = self.decoder.eval_crop(data), False
            except Exception as err:   # noqa: BLE001 - codecs raise anything on a broken file (SyntaxError, ...)
                skipped.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            return to_chw(pixels), label, flip, skipped
        raise RuntimeError(f"{len(skipped)} consecutive images of class {self.classes[label]!r} from index {index} "
                           f"of {self.root} failed to decode (last: {skipped[-1][0]}: {skipped[-1][1]}); the data set "
                           f"looks broken")
