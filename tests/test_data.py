"""Data: digits split and normalisation, synthetic images, image folders (bad files included), batched
crop/flip, and the resumable per-rank training pipeline."""
import io
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sslpt.engine.data import (ImageFolder, build_eval_data, build_train_data, load_digits, random_resized_crop_batch,
                         synthetic_images)
from sslpt.engine.data import digits as digits_module
from sslpt.engine.data.augment import _fallback_box, sample_crop_boxes
from sslpt.engine.data.digits import stratified_split
from sslpt.engine.data.folder import MAX_CONSECUTIVE_FAILURES


# ----------------------------------------------------------------------------------------------- digits
def test_digits_shapes_and_dtypes():
    train_x, train_y = load_digits("train")
    val_x, val_y = load_digits("val")
    assert train_x.shape[1:] == (1, 8, 8) and val_x.shape[1:] == (1, 8, 8)
    assert len(train_x) + len(val_x) == 1797
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(range(10)) == set(val_y.tolist())


def test_digits_split_is_disjoint_stratified_and_fixed():
    _, labels = load_digits("all")
    train_idx, val_idx = stratified_split(labels.numpy(), 0.2, seed=0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert np.array_equal(np.union1d(train_idx, val_idx), np.arange(1797))
    val_counts = np.bincount(labels.numpy()[val_idx], minlength=10)
    all_counts = np.bincount(labels.numpy(), minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * all_counts) <= 0.5 + 1e-9)  # round() per class
    all_x, _ = load_digits("all")
    train_x, train_y = load_digits("train")
    assert torch.equal(all_x[torch.from_numpy(train_idx)], train_x)
    assert torch.equal(labels[torch.from_numpy(train_idx)], train_y)
    assert torch.equal(load_digits("val")[0], load_digits("val")[0])


def test_digits_normalised_with_train_statistics():
    train_x, _ = load_digits("train")
    assert abs(train_x.mean().item()) < 1e-5
    assert abs(train_x.std(unbiased=False).item() - 1) < 1e-5
    val_x, _ = load_digits("val")
    assert abs(val_x.mean().item()) < 0.1  # same distribution, not exactly zero


def test_digits_errors():
    with pytest.raises(ValueError, match="split"):
        load_digits("test")
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits("train", val_fraction=1.0)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    digits_module._raw_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            load_digits("train")
    finally:
        digits_module._raw_digits.cache_clear()


# -------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_normalised_and_labelled():
    a_x, a_y = synthetic_images(64, 3, 16, seed=5)
    b_x, b_y = synthetic_images(64, 3, 16, seed=5)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert a_x.shape == (64, 3, 16, 16) and a_y.dtype == torch.int64
    assert abs(a_x.mean().item()) < 1e-4 and abs(a_x.std().item() - 1) < 1e-4
    assert not torch.equal(synthetic_images(64, 3, 16, seed=6)[0], a_x)
    assert a_y.min() >= 0 and a_y.max() < 10 and len(a_y.unique()) > 5


def test_synthetic_images_are_smooth():
    imgs, _ = synthetic_images(32, 1, 32, seed=0)
    neighbour_diff = (imgs[..., 1:] - imgs[..., :-1]).abs().mean()
    assert neighbour_diff < 0.3 * imgs.std()  # structure, not noise


# ------------------------------------------------------------------------------------------ image folder
def _png(path, size=(40, 30), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _jpeg_bytes(size=(48, 36), seed=0):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_NAMES = {"c_truncated.jpg", "d_empty.png", "e_text.png"}


@pytest.fixture
def image_root(tmp_path):
    """cat/ (3 good + 3 bad files, one upper-case extension), dog/ (4 good), a stray .txt."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    _png(root / "cat" / "a.png", seed=1)
    (root / "cat" / "b.JPG").write_bytes(_jpeg_bytes(seed=2))
    (root / "cat" / "c_truncated.jpg").write_bytes(_jpeg_bytes(size=(64, 64), seed=3)[:600])
    (root / "cat" / "d_empty.png").write_bytes(b"")
    (root / "cat" / "e_text.png").write_text("this is not an image\n")
    _png(root / "cat" / "f.bmp", seed=4)
    for i in range(3):
        _png(root / "dog" / f"{i}.png", size=(30 + 7 * i, 50), seed=10 + i)
    _png(root / "dog" / "nested" / "deep.png", seed=20, mode="L")
    (root / "dog" / "readme.txt").write_text("not listed")
    return root


def test_folder_scan(image_root):
    ds = ImageFolder(image_root, img_size=16)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 10
    names = [p.name for p, _ in ds.samples]
    assert "b.JPG" in names and "deep.png" in names and "readme.txt" not in names
    assert ds.targets == [0] * 6 + [1] * 4


def test_folder_skips_bad_files_counts_and_warns_once(image_root):
    ds = ImageFolder(image_root, img_size=16)
    bad = [p.name in BAD_NAMES for p, _ in ds.samples]
    # skips when reading index i = the run of bad files starting at i
    expected_skips = sum(next(k for k in range(len(ds)) if not bad[(i + k) % len(ds)]) for i in range(len(ds)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == expected_skips == 6  # 3 + 2 + 1 from the three bad indices in a row
    messages = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(messages) == 3 and all(any(n in m for m in messages) for n in BAD_NAMES)
    for img, label in items:
        assert img.shape == (3, 16, 16) and torch.isfinite(img).all() and label in (0, 1)


def test_folder_too_many_consecutive_bad_files_raise(tmp_path):
    for i in range(MAX_CONSECUTIVE_FAILURES + 1):
        (tmp_path / f"{i:03d}.png").write_bytes(b"")
    _png(tmp_path / "zzz.png")
    ds = ImageFolder(tmp_path, img_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="consecutive"):
            ds[0]
        assert ds[2][0].shape == (3, 8, 8)  # 19 bad, then the good one


def test_folder_missing_and_empty_roots_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(missing, img_size=8)
    empty = tmp_path / "empty_root"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_root") as info:
        ImageFolder(empty, img_size=8)
    assert ".png" in str(info.value) and ".jpg" in str(info.value)


def test_folder_images_in_root_are_one_class(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", seed=i)
    ds = ImageFolder(tmp_path, img_size=8, channels=1)
    assert ds.targets == [0, 0, 0]
    img, label = ds[0]
    assert img.shape == (1, 8, 8) and label == 0


def test_folder_augmentation_is_a_function_of_seed_epoch_index(image_root):
    ds = ImageFolder(image_root, img_size=16, seed=3)
    first = ds[7][0]
    assert torch.equal(first, ImageFolder(image_root, img_size=16, seed=3)[7][0])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[7][0])
    ds.set_epoch(0)
    assert torch.equal(first, ds[7][0])


def test_folder_eval_transform_is_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    ds = ImageFolder(tmp_path, img_size=35, train=False)  # 35 * 8/7 = 40: no resize, centre crop only
    img, _ = ds[0]
    expected = torch.from_numpy(pixels[2:37, 14:49].astype(np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(img, (expected - mean) / std)
    assert ImageFolder(tmp_path, img_size=16, train=False)[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------ batched crop / flip
def test_crop_batch_shapes_and_determinism():
    imgs = torch.randn(6, 3, 20, 24)
    out = random_resized_crop_batch(imgs, 16, generator=torch.Generator().manual_seed(1))
    again = random_resized_crop_batch(imgs, 16, generator=torch.Generator().manual_seed(1))
    other = random_resized_crop_batch(imgs, 16, generator=torch.Generator().manual_seed(2))
    assert out.shape == (6, 3, 16, 16) and out.dtype == imgs.dtype
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_crop_batch_full_scale_without_flip_is_identity():
    imgs = torch.randn(5, 2, 12, 12)
    out = random_resized_crop_batch(imgs, 12, scale=(1.0, 1.0), hflip=0.0, generator=torch.Generator())
    torch.testing.assert_close(out, imgs, atol=1e-5, rtol=1e-5)


def test_crop_batch_always_flip_mirrors():
    imgs = torch.randn(5, 1, 10, 10)
    out = random_resized_crop_batch(imgs, 10, scale=(1.0, 1.0), hflip=1.0, generator=torch.Generator())
    torch.testing.assert_close(out, imgs.flip(-1), atol=1e-5, rtol=1e-5)


def test_crop_boxes_follow_torchvision_bounds():
    g = torch.Generator().manual_seed(0)
    top, left, h, w, flip = sample_crop_boxes(4000, 30, 40, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, g, torch.device("cpu"))
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 30) & (left + w <= 40)).all())
    assert bool(((h >= 1) & (w >= 1)).all())
    assert torch.equal(top, top.floor()) and torch.equal(h, h.round())
    area = h * w / (30 * 40)
    assert area.min() > 0.15 and 0.4 < flip.float().mean() < 0.6
    # no valid try for a 2x40 strip with a large area: centre crop trimmed to ratio 4/3
    top, left, h, w, _ = sample_crop_boxes(8, 2, 40, (0.9, 1.0), (3 / 4, 4 / 3), 0.5, g, torch.device("cpu"))
    assert _fallback_box(2, 40, (3 / 4, 4 / 3)) == (2, 3)
    assert torch.equal(w, torch.full((8,), 3.0)) and torch.equal(left, torch.full((8,), 18.0))


def test_crop_batch_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_batch(torch.randn(1, 1, 4, 4), 4, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        random_resized_crop_batch(torch.randn(1, 1, 4, 4), 4, hflip=2.0)


# ------------------------------------------------------------------------------------------------ loader
def _digits_data(**kw):
    args = dict(img_size=8, channels=1, batch_size=64, seed=0, device="cpu")
    args.update(kw)
    return build_train_data("digits", **args)


def _all_batches(data, epoch, start=0):
    return list(data.batches(epoch, start_step=start))


def test_loader_steps_and_shapes():
    data = _digits_data()
    assert data.num_samples == len(load_digits("train")[0])
    assert data.steps_per_epoch == data.num_samples // 64
    batches = _all_batches(data, 0)
    assert len(batches) == data.steps_per_epoch
    imgs, labels = batches[0]
    assert imgs.shape == (64, 1, 8, 8) and imgs.dtype == torch.float32 and labels.dtype == torch.int64
    big = _digits_data(img_size=16, channels=3, batch_size=8)
    assert next(big.batches(0))[0].shape == (8, 3, 16, 16)


def test_loader_resume_matches_uninterrupted_epoch():
    data = _digits_data()
    full = _all_batches(data, 3)
    resumed = _all_batches(_digits_data(), 3, start=5)  # a fresh pipeline, as after a restart
    assert len(resumed) == len(full) - 5
    for (a_x, a_y), (b_x, b_y) in zip(full[5:], resumed):
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert _all_batches(data, 3, start=data.steps_per_epoch) == []


def test_loader_epochs_differ():
    data = _digits_data()
    (x0, y0), (x1, y1) = next(data.batches(0)), next(data.batches(1))
    assert not torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_loader_ranks_split_every_global_batch():
    # identity augmentation, so the two ranks' images can be compared with one rank's double batch
    ranks = [_digits_data(batch_size=16, rank=r, world_size=2, crop_scale=(1.0, 1.0), hflip=0.0) for r in range(2)]
    single = _digits_data(batch_size=32, crop_scale=(1.0, 1.0), hflip=0.0)
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == single.steps_per_epoch
    for step in (0, 7):
        idx = [d.rank_indices(1)[step] for d in ranks]
        assert len(np.intersect1d(idx[0].numpy(), idx[1].numpy())) == 0
        assert torch.equal(torch.cat(idx), single.rank_indices(1)[step])
    per_rank = [_all_batches(d, 1) for d in ranks]
    for step, (x, y) in enumerate(_all_batches(single, 1)):
        torch.testing.assert_close(torch.cat([per_rank[0][step][0], per_rank[1][step][0]]), x, atol=1e-5, rtol=0)
        assert torch.equal(torch.cat([per_rank[0][step][1], per_rank[1][step][1]]), y)


def test_loader_errors():
    with pytest.raises(ValueError, match="batch_size"):
        _digits_data(batch_size=5000)
    with pytest.raises(ValueError, match="digits, folder, synthetic"):
        build_train_data("imagenet", img_size=8, batch_size=4, seed=0, device="cpu")
    with pytest.raises(ValueError, match="synthetic"):
        build_eval_data("imagenet", img_size=8)


def test_synthetic_loader_and_eval_data():
    data = build_train_data("synthetic", img_size=16, channels=3, batch_size=8, seed=1, device="cpu",
                            synthetic_size=40)
    assert data.steps_per_epoch == 5 and data.channels == 3
    assert next(data.batches(0))[0].shape == (8, 3, 16, 16)
    train_x, train_y, val_x, val_y = build_eval_data("synthetic", img_size=16, channels=3, synthetic_size=40)
    assert train_x.shape == (40, 3, 16, 16) and val_x.shape == (8, 3, 16, 16)
    assert len(train_y) == 40 and len(val_y) == 8


def test_digits_eval_data_is_the_fixed_split():
    train_x, train_y, val_x, val_y = build_eval_data("digits", img_size=8, channels=1)
    assert torch.equal(train_x, load_digits("train")[0]) and torch.equal(val_y, load_digits("val")[1])
    capped = build_eval_data("digits", img_size=16, channels=3, max_images=100)
    assert capped[0].shape == (100, 3, 16, 16) and capped[2].shape == (100, 3, 16, 16)


def test_folder_loader_resume_and_workers(image_root):
    args = dict(path=str(image_root), img_size=16, batch_size=2, seed=4, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_train_data("folder", **args)
        assert data.steps_per_epoch == 5
        full = _all_batches(data, 2)
        resumed = _all_batches(build_train_data("folder", **args), 2, start=3)
        workers = _all_batches(build_train_data("folder", num_workers=2, **args), 2)
    for (a_x, a_y), (b_x, b_y) in zip(full[3:], resumed):
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    for (a_x, a_y), (b_x, b_y) in zip(full, workers):
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert data.num_skipped > 0


def test_folder_eval_data_with_and_without_val_folder(tmp_path, image_root):
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            for i in range(count):
                _png(tmp_path / "ds" / split / cls / f"{i}.png", seed=i)
    train_x, train_y, val_x, val_y = build_eval_data("folder", path=str(tmp_path / "ds"), img_size=8)
    assert train_x.shape == (8, 3, 8, 8) and val_x.shape == (4, 3, 8, 8)
    assert train_y.tolist() == [0] * 4 + [1] * 4 and val_y.tolist() == [0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = build_eval_data("folder", path=str(image_root), img_size=8, val_fraction=0.25)
    assert len(split[0]) + len(split[2]) == 10 and len(split[2]) == 3  # round(6/4) + round(4/4)


@pytest.mark.gpu
def test_tensor_pipeline_on_cuda_never_syncs_with_the_host():
    data = _digits_data(img_size=16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = _all_batches(data, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    imgs, labels = batches[0]
    assert imgs.is_cuda and labels.is_cuda and imgs.shape == (64, 1, 16, 16)
    resumed = _all_batches(data, 0, start=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[4:], resumed))
