"""The image input pipeline that feeds a GPU: uint8 decoding (libjpeg-turbo or PIL), normalisation and flips on
the device, tar shards (writer, reader, per-rank/per-worker order, resume, bad samples), decoder settings."""
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslpt.engine.cli import main
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.data import decode as decode_module
from sslpt.engine.data.decode import ImageDecoder, normalise_batch
from sslpt.engine.data.folder import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_params
from sslpt.engine.data.shards import digits_samples, open_shards, read_shard, shard_folder
from test_resume import TINY as RESUME_TINY
from test_resume import kill_and_resume

TINY_MODEL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16",
              "model.decoder_depth=1", "model.decoder_heads=2"]


def photo_jpeg(height: int = 120, width: int = 160, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth, photo-like JPEG (gratings + noise), so JPEG tolerance means something."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([np.sin(x / (9 + seed)) * 90 + 128, np.cos(y / 7) * 90 + 128, (x + y + 13 * seed) % 256], -1)
    pixels = pixels + np.random.default_rng(seed).normal(0, 10, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def jpeg_folder(tmp_path) -> Path:
    """cat/ and dog/, 8 JPEGs each (different sizes)."""
    root = tmp_path / "jpegs"
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            (root / cls / f"{i}.jpg").write_bytes(photo_jpeg(40 + 4 * i, 56 - 2 * i, seed=8 * c + i))
    return root


# ------------------------------------------------------------------ uint8 decoding
@pytest.mark.parametrize("channels", [1, 3])
def test_libjpeg_turbo_decode_equals_pil_within_jpeg_tolerance(channels):
    data = photo_jpeg()
    turbo = ImageDecoder(16, channels, "turbojpeg").decode(data).astype(int)
    pil = ImageDecoder(16, channels, "pil").decode(data).astype(int)
    assert turbo.shape == pil.shape == (120, 160, channels)
    assert np.abs(turbo - pil).max() <= 3 and np.abs(turbo - pil).mean() < 0.1
    half_turbo = ImageDecoder(16, channels, "turbojpeg").decode(data, 60, 80)   # decoded at 1/2 scale
    half_pil = ImageDecoder(16, channels, "pil").decode(data, 60, 80)
    assert half_turbo.shape == half_pil.shape == (60, 80, channels)
    assert np.abs(half_turbo.astype(int) - half_pil.astype(int)).max() <= 3
    buf = io.BytesIO()   # a CMYK JPEG: libjpeg-turbo converts it or refuses it (then PIL decodes it)
    Image.open(io.BytesIO(data)).convert("CMYK").save(buf, "JPEG", quality=90)
    cmyk_turbo = ImageDecoder(16, channels, "turbojpeg").decode(buf.getvalue()).astype(int)
    cmyk_pil = ImageDecoder(16, channels, "pil").decode(buf.getvalue()).astype(int)
    assert cmyk_turbo.shape == (120, 160, channels) and np.abs(cmyk_turbo - cmyk_pil).mean() < 2


@pytest.mark.parametrize("decoder", ["pil", "turbojpeg"])
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_is_uint8_of_the_output_size_and_draws_the_same_randomness(decoder, channels):
    data = photo_jpeg(375, 500)   # large next to the 24-pixel output: decoded at reduced scale
    rng = np.random.default_rng(5)
    pixels, flip = ImageDecoder(24, channels, decoder).train_crop(data, rng, (0.2, 1.0), 0.5)
    assert pixels.dtype == np.uint8 and pixels.shape == (24, 24, channels) and isinstance(flip, bool)
    reference = np.random.default_rng(5)
    random_resized_crop_params(reference, 375, 500, (0.2, 1.0))
    assert flip == (reference.random() < 0.5) and rng.random() == reference.random()   # crop, flip, nothing else
    full = ImageDecoder(24, channels, decoder).eval_crop(data)
    assert full.dtype == np.uint8 and full.shape == (24, 24, channels)


def _old_float_sample(path: Path, index: int, epoch: int, seed: int, size: int, hflip: float) -> torch.Tensor:
    """The original per-image float pipeline (PIL decode, PIL bicubic crop-resize, flip, /255, normalise)."""
    rng = np.random.default_rng([seed, epoch, index])
    img = Image.open(path).convert("RGB")
    top, left, h, w = random_resized_crop_params(rng, img.height, img.width, (0.2, 1.0))
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((pixels - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1))


def test_device_normalisation_equals_the_old_float_path(jpeg_folder):
    # img_size 32: no crop of these <= 68-pixel images can be decoded at half scale, so PIL decodes as it did
    args = dict(path=str(jpeg_folder), img_size=32, batch_size=4, seed=3, device="cpu", hflip=0.5)
    pil = build_train_data("folder", decoder="pil", **args)
    turbo = build_train_data("folder", decoder="turbojpeg", **args)
    order = pil.rank_indices(0).flatten().tolist()
    expected = torch.stack([_old_float_sample(pil.dataset.samples[i][0], i, 0, 3, 32, 0.5) for i in order])
    got_pil = torch.cat([imgs for imgs, _ in pil.batches(0)])
    got_turbo = torch.cat([imgs for imgs, _ in turbo.batches(0)])
    assert got_pil.dtype == torch.float32 and torch.equal(got_pil, expected)   # PIL: the same pixels, bit for bit
    assert (got_turbo - expected).abs().mean() < 0.1   # OpenCV's resize vs PIL's, in normalised units
    flips = torch.tensor([True, False])
    u8 = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalise_batch(u8, IMAGENET_MEAN, IMAGENET_STD, flips)
    plain = normalise_batch(u8, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(out[0], plain[0].flip(-1)) and torch.equal(out[1], plain[1])


# ------------------------------------------------------------------ shards
def test_shard_round_trip_keeps_labels_and_images(jpeg_folder, tmp_path):
    (written, index), = shard_folder(str(jpeg_folder), tmp_path / "shards", shard_size=5)
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 1] and index["classes"] == ["cat", "dog"]
    shards = open_shards(str(written))
    stored = {(s.image, s.label) for p, n in zip(shards.paths, shards.counts) for s in read_shard(p, n)}
    on_disk = {(p.read_bytes(), ["cat", "dog"].index(p.parent.name)) for p in jpeg_folder.rglob("*.jpg")}
    assert stored == on_disk
    pattern = open_shards(str(written / "shard-{000000..000003}.tar"))   # no index: counted from the headers
    assert pattern.counts == shards.counts and pattern.paths == shards.paths
    train_x, train_y, val_x, val_y = build_eval_data("webdataset", path=str(written), img_size=16, val_fraction=0.25)
    assert train_x.shape == (12, 3, 16, 16) and val_x.shape == (4, 3, 16, 16)   # 2 of each class held out
    assert sorted(val_y.tolist()) == [0, 0, 1, 1] and sorted(train_y.tolist()) == [0] * 6 + [1] * 6


def _even_shards(tmp_path: Path, shards: int = 8, per_shard: int = 4) -> Path:
    samples = digits_samples("train")[1][:shards * per_shard]
    from sslpt.engine.data.shards import write_shards

    write_shards(samples, tmp_path / "even", [str(c) for c in range(10)], shard_size=per_shard)
    return tmp_path / "even"


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_order_is_deterministic_and_ranks_split_it_disjoint_and_complete(tmp_path, workers):
    path = str(_even_shards(tmp_path))

    def data(rank, seed=0):
        return build_train_data("webdataset", path=path, img_size=8, channels=1, batch_size=4, seed=seed,
                                device="cpu", rank=rank, world_size=2, num_workers=workers)

    ranks = [data(0), data(1)]
    assert ranks[0].steps_per_epoch == 4
    for epoch in range(2):
        keys = [[k[1:] for batch in r.batch_keys(epoch, 0) for k in batch] for r in ranks]
        assert set(keys[0]).isdisjoint(keys[1]) and len(set(keys[0]) | set(keys[1])) == 32   # all 8 x 4 samples
        assert [k for b in data(0).batch_keys(epoch, 0) for k in b] == [k for b in ranks[0].batch_keys(epoch, 0)
                                                                          for k in b]
        assert ranks[0].batch_keys(epoch, 2) == ranks[0].batch_keys(epoch, 0)[2:]
    assert ranks[0].batch_keys(0, 0) != [[(0, *k[1:]) for k in b] for b in ranks[0].batch_keys(1, 0)]
    assert ranks[0].batch_keys(0, 0) != data(0, seed=1).batch_keys(0, 0)
    if workers:   # each worker (stream) reads its own shards only
        streams = [{k[1] for b in ranks[0].batch_keys(0, 0)[w::2] for k in b} for w in range(2)]
        assert streams[0].isdisjoint(streams[1])
    batches = list(ranks[1].batches(0))
    resumed = list(data(1).batches(0, start_step=3))
    assert len(batches) == 4 and torch.equal(batches[3][0], resumed[0][0]) and torch.equal(batches[3][1], resumed[0][1])


def test_too_few_shards_for_the_streams_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"8 shards cannot be split over 4 processes x 4 loader workers"):
        build_train_data("webdataset", path=str(_even_shards(tmp_path)), img_size=8, channels=1, batch_size=2,
                         seed=0, device="cpu", rank=0, world_size=4, num_workers=4)


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    path = _even_shards(tmp_path)
    first = path / "shard-000000.tar"
    with tarfile.open(first) as tar:   # rewrite shard 0 with its first image's bytes broken
        members = [(m, tar.extractfile(m).read()) for m in tar]
    broken = members[0][0].name
    with tarfile.open(first, "w") as tar:
        for member, payload in members:
            payload = payload[:40] if member.name == broken else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    last = path / "shard-000007.tar"
    last.write_bytes(last.read_bytes()[:1800])   # cut inside its second sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_train_data("webdataset", path=str(path), img_size=8, channels=1, batch_size=4, seed=0,
                                device="cpu")
        for epoch in range(2):
            for imgs, labels in data.batches(epoch):
                assert imgs.shape == (4, 1, 8, 8) and torch.isfinite(imgs).all()
    # every sample is read once per epoch; as for a folder, each bad sample tried counts: 1 for the broken image,
    # 3 + 2 + 1 for the run of 3 samples lost with the end of the last shard (each tries the ones after it)
    assert [data.skipped_in_epoch(e) for e in range(2)] == [7, 7] and data.num_skipped == 14
    assert any(broken.split(".")[0] in str(w.message) for w in caught)
    assert any("unreadable after" in str(w.message) or "fewer samples" in str(w.message) for w in caught)


def _cli(args: list[str], overrides: list[str]) -> int:
    return main([*args, *[a for item in overrides for a in ("--set", item)]])


def test_training_end_to_end_on_digits_shards(tmp_path, capsys):
    assert main(["shard", "digits", str(tmp_path / "digits"), "--shard-size", "400"]) == 0
    assert "1438 samples in 4 shards, 10 classes" in capsys.readouterr().out
    overrides = TINY_MODEL + ["data.name=webdataset", f"data.path={json.dumps(str(tmp_path / 'digits'))}",
                              "train.batch_size=128", "train.epochs=1", "train.log_every=1", "train.eval_every=0",
                              "train.probe=false", "optim.warmup_epochs=1"]
    assert _cli(["pretrain", "mae_digits", "--quiet", "--run-dir", str(tmp_path / "run")], overrides) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 11 and all(np.isfinite(losses))   # 1438 // 128 steps on one stream
    assert [r["skipped_images"] for r in records if r["type"] == "data"] == [0]
    assert main(["shard", "digits", str(tmp_path / "bad"), "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err


def test_training_end_to_end_on_a_jpeg_folder_turned_into_shards(jpeg_folder, tmp_path, capsys):
    assert main(["shard", str(jpeg_folder), str(tmp_path / "shards"), "--shard-size", "4"]) == 0
    assert "16 samples in 4 shards, 2 classes" in capsys.readouterr().out
    overrides = TINY_MODEL + ["model.img_size=16", "model.patch_size=4", "model.in_chans=3", "data.name=webdataset",
                              f"data.path={json.dumps(str(tmp_path / 'shards'))}", "data.num_workers=2",
                              "train.batch_size=4", "train.epochs=2", "train.log_every=1", "train.probe=false",
                              "optim.warmup_epochs=1"]
    assert _cli(["pretrain", "mae_digits", "--quiet", "--run-dir", str(tmp_path / "run")], overrides) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["type"] == "train"]) == 8   # 2 streams x 2 shards x 4 / 4, 2 epochs
    assert list((tmp_path / "run" / "pictures").iterdir())   # the evaluation read the shards too


def test_kill_and_resume_on_shards_with_workers_is_bit_identical(tmp_path):
    """64 digits in 8 shards of 8, 2 workers: 2 streams x 2 batches of 16 per epoch, killed mid-epoch 2."""
    folder = tmp_path / "small"
    for i, (_, png, label) in enumerate(digits_samples("train")[1][:64]):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i}.png").write_bytes(png)
    shard_folder(str(folder), tmp_path / "shards", shard_size=8)
    overrides = [o for o in RESUME_TINY if not o.startswith("data.")] + [
        "data.name=webdataset", f"data.path={json.dumps(str(tmp_path / 'shards'))}", "data.num_workers=2",
        "train.batch_size=16", "train.save_every_steps=3"]
    kill_and_resume(tmp_path, overrides, nproc=1, kill_at=6, total=8)


# ------------------------------------------------------------------ settings
def test_decoder_settings_fail_clearly(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"data.decoder must be one of 'auto', 'pil', 'turbojpeg'; "
                                          r"got 'turbo'"):
        load_config("mae_digits", ["data.decoder=turbo"])
    folder = ["data.name=folder", f"data.path={json.dumps(str(tmp_path))}"]
    monkeypatch.setattr(decode_module, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"data.decoder = 'turbojpeg' needs the simplejpeg package: pip install "
                                          r"simplejpeg"):
        load_config("mae_digits", [*folder, "data.decoder=turbojpeg"])
    assert ImageDecoder(8, 3, "auto").decoder == "pil"   # auto without simplejpeg: PIL, no error
    with pytest.raises(ConfigError, match="data.path must name a folder of tar shards"):
        load_config("mae_digits", ["data.name=webdataset"])


def test_loader_workers_persist_across_epochs(jpeg_folder):
    data = build_train_data("folder", path=str(jpeg_folder), img_size=16, batch_size=4, seed=0, device="cpu",
                            num_workers=2)
    list(data.batches(0))
    workers = [w.pid for w in data._loader._iterator._workers]
    list(data.batches(1, start_step=1))
    assert [w.pid for w in data._loader._iterator._workers] == workers and all(workers)


@pytest.mark.gpu
def test_cuda_feed_copies_on_a_side_stream_without_host_syncs_and_matches_the_cpu(jpeg_folder):
    args = dict(path=str(jpeg_folder), img_size=16, batch_size=4, seed=0, num_workers=2, decoder="pil")
    cpu = [(x, y) for x, y in build_train_data("folder", device="cpu", **args).batches(0)]
    data = build_train_data("folder", device="cuda", **args)
    torch.cuda.synchronize()
    got = []
    for imgs, labels in data.batches(0):
        torch.cuda.set_sync_debug_mode("error")   # the normalisation and flips never wait for the host
        try:
            got.append(((imgs * 2).sum(), imgs, labels))   # work queued on the compute stream after the copy
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(got) == len(cpu)
    for (_, imgs, labels), (x, y) in zip(got, cpu):
        assert imgs.is_cuda and imgs.dtype == torch.float32
        torch.testing.assert_close(imgs.cpu(), x, rtol=0, atol=1e-6)
        assert torch.equal(labels.cpu(), y)


def test_the_configured_decoder_reaches_every_loader(monkeypatch, tmp_path):
    """data.decoder is handed to the training data and to the probe's evaluation data."""
    import sslpt.engine.probe as probe_module
    import sslpt.engine.train as train_module

    seen = []
    for module, name in ((train_module, "build_train_data"), (train_module, "build_eval_data"),
                         (probe_module, "build_eval_data")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: seen.append((_name, k["decoder"]))
                            or _real(*a, **k))
    cfg = load_config("mae_digits", ["train.epochs=1", "train.batch_size=256", "model.depth=1", "model.embed_dim=32",
                                     "model.num_heads=2", "model.decoder_depth=1", "model.decoder_dim=16",
                                     "model.decoder_heads=2", "data.decoder=pil", f"train.out_dir={tmp_path}",
                                     "train.probe_max_images=64"])
    from sslpt.engine.train import pretrain
    pretrain(cfg, show_progress=False)
    assert {"build_train_data", "build_eval_data"} <= {n for n, _ in seen} and {d for _, d in seen} == {"pil"}
