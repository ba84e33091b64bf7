"""WebDataset-style tar shards: writing them from an image folder (or digits), and reading them back.

Format (what the `webdataset` library reads too): plain tar files; a sample is the members sharing a key (the
name up to its first dot), here `<key>.<image extension>` holding the encoded image as it was on disk and
`<key>.cls` holding the label as decimal text. Next to the shards, `index.json` records each shard's sample
count and the class names: the reader plans an epoch from the counts without opening a shard. A folder with
`train/` and `val/` is written as `OUT/train/` and `OUT/val/`, as the image folder reader expects.

The writer shuffles the samples (seeded) before cutting them into shards: an ImageNet folder is sorted by
class, and a shard of one class would make whole batches of one class.

Reading is Python's `tarfile`, not the `webdataset` package: the reader must know where every sample of an
epoch goes (rank, worker, step) to resume mid-epoch bit-identically, which a streaming pipeline does not
expose; the format needs nothing more than tarfile, and this keeps the dependency list short. Shards are read
from a filesystem (local or shared: NFS, Lustre, a FUSE mount of an object store); URLs are not fetched.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import to_chw
from .folder import find_samples

INDEX = "index.json"
FORMAT = "sslpt-shards-1"
SHARD_NAME = "shard-{:06d}.tar"
LABEL_EXT = "cls"
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "ppm")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ------------------------------------------------------------------ writing
def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444   # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(samples: list[tuple[str, bytes | Path, int]], out: Path, classes: list[str],
                 shard_size: int = 1000, seed: int = 0) -> dict:
    """Write `samples` ([(image extension, bytes or a file to copy, label)]) as shuffled shards of `shard_size`
    samples in `out`, with index.json. Returns the index."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not samples:
        raise ValueError(f"nothing to write to {out}: no samples")
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(samples))
    shards = []
    for first in range(0, len(order), shard_size):
        name = SHARD_NAME.format(len(shards))
        chunk = order[first:first + shard_size]
        with tarfile.open(out / f"{name}.partial", "w") as tar:   # renamed when complete: no half shard listed
            for key in chunk:
                ext, source, label = samples[key]
                payload = source if isinstance(source, bytes) else Path(source).read_bytes()
                _add(tar, f"{key:09d}.{ext}", payload)
                _add(tar, f"{key:09d}.{LABEL_EXT}", str(label).encode())
        os.replace(out / f"{name}.partial", out / name)
        shards.append({"name": name, "samples": len(chunk)})
    index = {"format": FORMAT, "classes": classes, "shards": shards}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


def folder_samples(root: Path, classes: list[str] | None = None) -> tuple[list[str], list]:
    """(class names, [(extension, path, label)]) of an image folder, as the folder data set scans it."""
    names, found = find_samples(root, classes)
    return names, [(path.suffix.lower().lstrip("."), path, label) for path, label in found]


def digits_samples(split: str) -> tuple[list[str], list]:
    """The digits set's split as 8x8 grayscale PNGs (0..16 scaled to 0..255), labels 0-9."""
    from PIL import Image

    from .digits import _raw_digits, stratified_split

    images, labels = _raw_digits()
    train_idx, val_idx = stratified_split(labels, 0.2, 0)
    out = []
    for i in (train_idx if split == "train" else val_idx):
        buf = io.BytesIO()
        Image.fromarray(np.round(images[i] * (255 / 16)).astype(np.uint8), "L").save(buf, "PNG")
        out.append(("png", buf.getvalue(), int(labels[i])))
    return [str(c) for c in range(10)], out


def shard_folder(source: str, out: Path, shard_size: int = 1000, seed: int = 0) -> list[tuple[Path, dict]]:
    """`python -m sslpt shard SOURCE OUT`: an image folder (with train/ and val/ if it has them), or "digits"
    (its fixed train/val split). Returns [(written folder, index)]."""
    root = Path(source)
    if source == "digits" and not root.exists():
        splits = [("train", *digits_samples("train")), ("val", *digits_samples("val"))]
    elif (root / "train").is_dir():
        classes, train = folder_samples(root / "train")
        splits = [("train", classes, train)]
        if (root / "val").is_dir():
            splits.append(("val", *folder_samples(root / "val", classes)))
    else:
        splits = [("", *folder_samples(root))]
    return [(out / name, write_shards(samples, out / name, classes, shard_size, seed))
            for name, classes, samples in splits]


# ------------------------------------------------------------------ reading
@dataclass
class ShardSet:
    """Shard files, their sample counts and the class names (empty where the shards do not say)."""
    paths: list[Path]
    counts: list[int]
    classes: list[str]

    @property
    def offsets(self) -> list[int]:
        """Global index of each shard's first sample."""
        return [0, *np.cumsum(self.counts)[:-1].tolist()]

    def __len__(self) -> int:
        return int(sum(self.counts))


def _expand(pattern: str) -> list[str]:
    """`a-{000..012}.tar` -> a-000.tar ... a-012.tar (zero padding kept); several braces multiply."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for i in range(int(lo), int(hi) + 1) for name in _expand(f"{head}{i:0{width}d}{tail}")]


def count_samples(path: Path) -> int:
    """Samples in a shard, by reading its member headers (tarfile seeks over the data of a local file)."""
    with tarfile.open(path, "r:") as tar:
        return len({_key(m.name) for m in tar if m.isfile()})


def open_shards(path: str) -> ShardSet:
    """A folder with index.json (written by `shard`), a folder of .tar files, or a brace pattern of files."""
    if not path:
        raise ValueError("data set 'webdataset' needs data.path: a folder of shards (with index.json, as "
                         "`python -m sslpt shard` writes) or a pattern such as /data/in1k/shard-{000000..001281}.tar")
    root = Path(path)
    if root.is_dir() and (root / INDEX).is_file():
        index = json.loads((root / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{root / INDEX}: not a shard index written by `python -m sslpt shard` "
                             f"(format {index.get('format')!r}, expected {FORMAT!r})")
        paths = [root / s["name"] for s in index["shards"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shards listed in {root / INDEX} are missing, e.g. {missing[0]}")
        return ShardSet(paths, [int(s["samples"]) for s in index["shards"]], list(index.get("classes", [])))
    if root.is_dir():
        paths = sorted(root.glob("*.tar"))
    else:
        paths = [Path(p) for p in _expand(path)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.path={path!r}: {len(missing)} of its {len(paths)} shards do not exist, "
                                    f"e.g. {missing[0]}")
    if not paths:
        raise FileNotFoundError(f"data.path={path!r}: no .tar shards found")
    return ShardSet(paths, [count_samples(p) for p in paths], [])


def _key(name: str) -> str:
    directory, _, base = name.rpartition("/")
    return f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]


@dataclass
class ShardSample:
    """One sample as read from its shard: image bytes (None if the shard lacks them) and label."""
    key: str
    image: bytes | None
    label: int
    problem: str = ""   # why the sample cannot be used, when image is None


def read_shard(path: Path, expected: int) -> list[ShardSample]:
    """Every sample of a shard, in stored order; exactly `expected` entries: a shard cut short (truncated file,
    read error) keeps what it read and pads with unusable samples, which the reader skips and counts."""
    grouped: dict[str, dict[str, bytes]] = {}
    problem = ""
    try:   # one sequential read of the whole file (what a network filesystem does best), then parse in memory
        with tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                ext = member.name.rsplit("/", 1)[-1].split(".", 1)[-1].lower()
                grouped.setdefault(_key(member.name), {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        problem = f"shard {path} unreadable after {len(grouped)} samples: {type(err).__name__}: {err}"
    samples = []
    for key, parts in grouped.items():
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        try:
            label = int(parts[LABEL_EXT].decode().strip()) if LABEL_EXT in parts else 0
        except ValueError:
            image, label = None, 0
        why = "" if image is not None else f"{path}:{key} has no readable image and label"
        samples.append(ShardSample(key, image, label, why))
    samples = samples[:expected]
    while len(samples) < expected:
        samples.append(ShardSample(f"#{len(samples)}", None, -1, problem or f"shard {path} holds fewer samples "
                                   f"than its index says ({len(grouped)} < {expected})"))
    return samples


MAX_CONSECUTIVE_FAILURES = 20


class ShardReader:
    """Samples of a shard set by key (epoch, shard, position), decoded and cropped to uint8; a map-style data
    set for the DataLoader. Each process (worker) keeps the last two shards it read in memory: the loader plans
    the batches so that a worker reads its shards in order, each once per epoch.

    A sample that cannot be used (bad image bytes, no image, a shard cut short) is replaced by the next one of
    the same shard with the same label (else any label), its crop drawn as the bad one's would have been; the
    skipped samples are reported with the batch, as the image folder does.
    """

    def __init__(self, shards: ShardSet, decoder, *, train: bool, crop_scale=(0.2, 1.0), hflip: float = 0.5,
                 seed: int = 0):
        self.shards, self.decoder, self.train = shards, decoder, train
        self.crop_scale, self.hflip, self.seed = tuple(crop_scale), hflip, seed
        self.offsets = shards.offsets
        self._cache: dict[int, list[ShardSample]] = {}

    def samples(self, shard: int) -> list[ShardSample]:
        if shard not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))   # oldest first (dicts keep insertion order)
            self._cache[shard] = read_shard(self.shards.paths[shard], self.shards.counts[shard])
        return self._cache[shard]

    def _candidates(self, samples: list[ShardSample], position: int):
        yield position
        ring = [(position + k) % len(samples) for k in range(1, len(samples))]
        label = samples[position].label
        if label < 0:   # lost with the end of its shard: the label is unknown too
            yield from ring
            return
        yield from (i for i in ring if samples[i].label == label)
        yield from (i for i in ring if samples[i].label != label)

    def __getitem__(self, key: tuple[int, int, int]):
        """(uint8 [C, S, S], label, flip?, [(where, why) skipped])."""
        epoch, shard, position = key
        samples = self.samples(shard)
        skipped = []
        for attempt, i in enumerate(self._candidates(samples, position)):
            if attempt == MAX_CONSECUTIVE_FAILURES:
                break
            sample = samples[i]
            rng = np.random.default_rng([self.seed, epoch, self.offsets[shard] + position])
            try:
                if sample.image is None:
                    raise ValueError(sample.problem)
                if self.train:
                    pixels, flip = self.decoder.train_crop(sample.image, rng, self.crop_scale, self.hflip)
                else:
                    pixels, flip = self.decoder.eval_crop(sample.image), False
            except Exception as err:   # noqa: BLE001 - codecs raise anything on broken bytes
                skipped.append((f"{self.shards.paths[shard]}:{sample.key}", f"{type(err).__name__}: {err}"))
                continue
            return to_chw(pixels), sample.label, flip, skipped
        raise RuntimeError(f"{len(skipped)} consecutive samples of shard {self.shards.paths[shard]} from position "
                           f"{position} could not be used (last: {skipped[-1][0]}: {skipped[-1][1]}); the shard "
                           f"looks broken")
