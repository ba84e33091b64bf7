"""Image folders that a long run meets: decompression bombs, fuzzed files of every format, 16-bit PNGs, flat
val/ folders (items 5, 6 and 11 of the reliability issue; docs/reliability.md)."""
import io
import json
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslpt.engine.cli import main
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.data.folder import ImageFolder, to_8bit

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "model.img_size=16", "model.patch_size=4", "train.batch_size=4",
        "train.log_every=1", "train.probe=false", "train.eval_every=0", "data.name=folder", "optim.warmup_epochs=1"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 13400) -> bytes:
    """A PNG header claiming side x side 8-bit gray pixels: a few hundred bytes on disk."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def save_png(path: Path, seed: int, size=(20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def folder_with_a_bomb(root: Path) -> Path:
    """a/ (bomb + 3 good), b/ (4 good)."""
    (root / "a").mkdir(parents=True)
    (root / "a" / "0_bomb.png").write_bytes(bomb_png())
    for i in range(3):
        save_png(root / "a" / f"{i + 1}.png", seed=i)
    for i in range(4):
        save_png(root / "b" / f"{i}.png", seed=10 + i)
    return root


# ------------------------------------------------------------------ 5. a bad image never ends the epoch
def test_decompression_bomb_is_skipped_and_replaced_by_its_class(tmp_path):
    ds = ImageFolder(folder_with_a_bomb(tmp_path / "imgs"), img_size=8)
    assert ds.samples[0][0].name == "0_bomb.png"
    img, label, skipped = ds.sample_with_skips(0, epoch=0)
    assert label == 0 and img.shape == (3, 8, 8) and len(skipped) == 1
    assert skipped[0][0].endswith("0_bomb.png") and "DecompressionBomb" in skipped[0][1]


def test_oversize_limit_is_configurable(tmp_path):
    root = folder_with_a_bomb(tmp_path / "imgs")
    ds = ImageFolder(root, img_size=8, max_image_pixels=300)   # 20 x 20 = 400 pixels: every image is too large
    with pytest.raises(RuntimeError, match="4 consecutive images of class 'b' .*exceed data.max_image_pixels=300"):
        ds.sample_with_skips(4, epoch=0)


FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "tif": "TIFF", "bmp": "BMP", "webp": "WEBP"}


def test_byte_flipped_files_of_every_format_never_escape(tmp_path):
    """900 files with 1-8 random bytes changed: each decodes or is skipped, nothing is raised."""
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    rng = random.Random(0)
    root = tmp_path / "fuzz"
    for ext, fmt in FORMATS.items():
        buf = io.BytesIO()
        base.save(buf, fmt)
        for k in range(150):
            data = bytearray(buf.getvalue())
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            (root / f"{ext}{k:03d}").mkdir(parents=True)   # a class each, with a good image to fall back on
            (root / f"{ext}{k:03d}" / f"a_fuzzed.{ext}").write_bytes(bytes(data))
            base.save(root / f"{ext}{k:03d}" / "b_good.png")
    ds = ImageFolder(root, img_size=8)
    skipped = 0
    for index in range(len(ds)):
        img, label, skips = ds.sample_with_skips(index, epoch=0)
        assert img.shape == (3, 8, 8) and ds.classes[label] == ds.samples[index][0].parent.name
        skipped += len(skips)
    assert skipped > 0


def test_training_on_a_folder_with_a_bomb_counts_skips_per_epoch(tmp_path, capsys):
    root = folder_with_a_bomb(tmp_path / "imgs")
    overrides = TINY + [f"data.path={json.dumps(str(root))}", "train.epochs=2", "data.num_workers=2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["pretrain", "mae_digits", "--quiet", "--run-dir", str(tmp_path / "run"),
                   *[arg for item in overrides for arg in ("--set", item)]])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["skipped_images"] for r in records if r["type"] == "data"]
    assert per_epoch == [1, 1]   # the bomb is read once per epoch (8 images, batch 4, every image each epoch)
    assert "skipped 2 unreadable or oversized images" in capsys.readouterr().out
    warned = [w for w in caught if "0_bomb.png" in str(w.message)]
    assert len(warned) == 1   # once per file per run, whatever the workers and epochs


def test_loader_reports_skips_from_workers(tmp_path):
    root = folder_with_a_bomb(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_train_data("folder", path=str(root), img_size=8, batch_size=4, seed=0, device="cpu",
                                num_workers=2)
        for epoch in range(2):
            for imgs, labels in data.batches(epoch):
                assert imgs.shape == (4, 3, 8, 8)
    assert [data.skipped_in_epoch(e) for e in range(2)] == [1, 1] and data.num_skipped == 2


# ------------------------------------------------------------------ 6. 16-bit PNGs
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_by_its_bit_depth(tmp_path, channels):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "imgs" / "a" / "deep.png")
    assert Image.open(tmp_path / "imgs" / "a" / "deep.png").mode.startswith("I")
    ds = ImageFolder(tmp_path / "imgs", img_size=32, channels=channels, train=False)
    img, _ = ds[0]   # resized to 37 and centre-cropped to 32: compare ranges, not pixels
    mean, std = torch.tensor(ds.mean).view(-1, 1, 1), torch.tensor(ds.std).view(-1, 1, 1)
    pixels = ((img * std + mean) * 255).round()
    assert (pixels >= 255).float().mean() < 0.02 and pixels.min() < 40 and pixels.max() > 215   # 99.5 % were 255
    with Image.open(tmp_path / "imgs" / "a" / "deep.png") as deep:
        eight = np.asarray(to_8bit(deep), dtype=np.float64)
    assert np.abs(eight - (ramp / 257.0).round()).max() <= 1


# ------------------------------------------------------------------ 11. a flat val/ folder
def test_flat_val_folder_is_refused_with_the_expected_layout(tmp_path, capsys):
    for cls in ("cat", "dog"):
        for i in range(4):
            save_png(tmp_path / "ds" / "train" / cls / f"{i}.png", seed=i)
    for i in range(4):
        save_png(tmp_path / "ds" / "val" / f"ILSVRC2012_val_{i:08d}.png", seed=20 + i)
    with pytest.raises(ValueError, match=r"without class folders.*expected layout is .*val/<class>/<image>"):
        build_eval_data("folder", path=str(tmp_path / "ds"), img_size=8)
    overrides = TINY + [f"data.path={json.dumps(str(tmp_path / 'ds'))}", "train.epochs=1"]
    assert main(["pretrain", "mae_digits", "--quiet", "--run-dir", str(tmp_path / "run"),
                 *[arg for item in overrides for arg in ("--set", item)]]) == 2   # before any training
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "without class folders" in err and "\n" not in err
