"""CPU cost of the image input pipeline per image: decoders, image folder against tar shards.

    python -m benchmarks.bench_data [--images 48] [--repeat 5] [--size 224] [--json out.json]

Writes ImageNet-like JPEGs (500 x 375, quality 90, photo-like content: gratings, blobs, noise) to a temporary
folder in two classes, shards them, and times one process on one thread (what one DataLoader worker does):
CPU milliseconds per image (process time, so other jobs on the machine count little) and images/s per core.

Pipelines:
- "float, pil (original)": what the folder path did before uint8: PIL decode, PIL bicubic crop-resize, float
  conversion and normalisation per image on the CPU;
- "uint8, <decoder>": decode, crop and resize on uint8; normalisation and flips are left to the device;
- folder (one file per image) and shards (tar files read whole, samples taken from memory).
The device-side normalisation, run on this CPU (what CPU-only training pays), is reported apart.
Each pass is a new epoch (new crops); the figure is the median pass.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslpt.engine.data.decode import ImageDecoder, _installed, normalise_batch
from sslpt.engine.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder
from sslpt.engine.data.shards import ShardReader, open_shards, shard_folder


@dataclass
class DataRow:
    source: str         # folder | shards | device
    pipeline: str       # "float, pil (original)", "uint8, turbojpeg", ...
    ms_per_image: float  # CPU ms per image, one thread
    images_per_s_per_core: float
    note: str = ""


def photo_like_jpeg(height: int, width: int, seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    freq = rng.uniform(0.01, 0.08, 3)
    pixels = np.stack([np.sin(x * freq[0] + y * freq[1] * 0.5) * 70 + 128,
                       np.cos(y * freq[1] - x * freq[2]) * 70 + 128,
                       np.sin((x + y) * freq[2]) * 60 + 120], axis=-1)
    for _ in range(4):   # soft coloured blobs
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        pixels += blob * rng.uniform(-80, 80, 3)
    pixels += rng.normal(0, 12, pixels.shape)   # texture: ~75 KB per image (ImageNet's mean is ~110 KB)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_images(root: Path, count: int, height: int, width: int) -> None:
    for i in range(count):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:04d}.jpg").write_bytes(photo_like_jpeg(height, width, seed=i))


def run(images: int = 48, height: int = 375, width: int = 500, size: int = 224, repeat: int = 5,
        decoders: tuple[str, ...] = ("pil", "turbojpeg")) -> list[DataRow]:
    """One row per pipeline: the median over `repeat` passes, the pipelines taking turns within each pass (so a
    change in the machine's load falls on all of them alike)."""
    torch.set_num_threads(1)
    decoders = tuple(d for d in decoders if d != "turbojpeg" or _installed("simplejpeg"))
    resize_note = {"pil": "PIL resize", "turbojpeg": "OpenCV resize" if _installed("cv2") else "PIL resize"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        write_images(root, images, height, width)
        (shards_dir, _), = shard_folder(str(root), Path(tmp) / "shards", shard_size=max(1, images // 4))
        shards = open_shards(str(shards_dir))
        original = ImageFolder(root, size, decoder="pil")
        cases = [("folder", "float, pil (original)", "PIL resize", images,
                  lambda e: [original.sample_with_skips(i, e) for i in range(images)])]
        for decoder in decoders:
            folder = ImageFolder(root, size, decoder=decoder)

            def read_shards(epoch: int, decoder: str = decoder) -> None:
                reader = ShardReader(shards, ImageDecoder(size, 3, decoder), train=True)   # nothing cached
                for shard, count in enumerate(shards.counts):
                    for position in range(count):
                        reader[(epoch, shard, position)]

            cases.append(("folder", f"uint8, {decoder}", resize_note[decoder], images,
                          lambda e, folder=folder: [folder.sample_uint8(i, e) for i in range(images)]))
            cases.append(("shards", f"uint8, {decoder}", resize_note[decoder] + "; tar read included", images,
                          read_shards))
        batch = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8)
        flips = torch.rand(64) < 0.5
        cases.append(("device", "normalise + flip (on this CPU)", "free on a GPU: runs on the device there", 64,
                      lambda e: normalise_batch(batch, IMAGENET_MEAN, IMAGENET_STD, flips)))
        passes: list[list[float]] = [[] for _ in cases]
        for epoch in range(repeat):
            for times, (_, _, _, count, work) in zip(passes, cases):
                start = time.process_time()
                work(epoch)
                times.append((time.process_time() - start) * 1e3 / count)
    return [_row(source, pipeline, statistics.median(times), note)
            for times, (source, pipeline, note, _, _) in zip(passes, cases)]


def _row(source: str, pipeline: str, ms: float, note: str = "") -> DataRow:
    return DataRow(source, pipeline, round(ms, 3), round(1e3 / ms, 1) if ms > 0 else float("inf"), note)


def to_markdown(rows: list[DataRow]) -> str:
    lines = ["| source | pipeline | CPU ms / image | images/s per core | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.source} | {r.pipeline} | {r.ms_per_image:.2f} | {r.images_per_s_per_core:.0f} | {r.note} |"
              for r in rows]
    return "\n".join(lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    import PIL

    versions = f"torch {torch.__version__}, Pillow {PIL.__version__}"
    for module in ("simplejpeg", "cv2"):
        if _installed(module):
            versions += f", {module} {__import__(module).__version__}"
    return f"{model}; {versions}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="JPEGs to generate (default 48)")
    parser.add_argument("--repeat", type=int, default=5, help="passes (epochs) over them; the median is kept")
    parser.add_argument("--size", type=int, default=224, help="output side (default 224)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1 or args.size < 1:
        parser.error("--images, --repeat and --size must be >= 1")
    rows = run(args.images, size=args.size, repeat=args.repeat)
    print(machine())
    print(to_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
