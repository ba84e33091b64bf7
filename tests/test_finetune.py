"""Fine-tuning (MAE's recipe) and MAE's linear probe: their pieces, the commands, and exact resume."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from sslpt.engine.cli import main
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.export import encoder_from_file, save_encoder
from sslpt.engine.data.randaugment import rand_augment, random_erase
from sslpt.engine.finetune import (PRESETS, Classifier, FinetuneSettings, FineTuner, augment_batch,
                                   layer_decay_groups, mix_batch, pixel_stats)
from sslpt.engine.linprobe import LARS, probe_head
from sslpt.engine.models.vit import VisionTransformer, drop_path

CPU = ["--set", "train.cpu_threads=1", "--set", "train.precision=\"fp32\""]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ft") / "tiny.safetensors"
    save_encoder(VisionTransformer(8, 2, 1, 32, 2, 2), path)
    return path


def test_layer_decay_groups_follow_mae():
    model = Classifier(VisionTransformer(8, 2, 1, 32, 3, 2), classes=10, pool="avg", drop_path=0.2)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.cls_token"])] == (0.5 ** 4, 0.0)
    assert scale[id(named["encoder.pos_embed"])] == (0.5 ** 4, 0.0)   # a parameter while fine-tuning
    assert scale[id(named["encoder.patch_embed.weight"])] == (0.5 ** 4, 0.05)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.5 ** 3, 0.05)
    assert scale[id(named["encoder.blocks.2.norm1.weight"])] == (0.5, 0.0)
    assert scale[id(named["head.weight"])] == (1.0, 0.05) and scale[id(named["fc_norm.bias"])] == (1.0, 0.0)
    assert "encoder.norm.weight" not in named   # avg pooling: fc_norm replaces the encoder's final norm
    assert [b.drop_path for b in model.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_drop_path_is_identity_in_eval_and_unbiased_in_train():
    x = torch.ones(4000, 3, 2)
    assert drop_path(x, 0.3, training=False) is x
    y = drop_path(x, 0.3, training=True)
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.7]) and abs(y.mean().item() - 1) < 0.05


def test_mixup_and_cutmix_targets():
    imgs, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    plain = FinetuneSettings(mixup=0.0, cutmix=0.0, smoothing=0.1)
    x, t = mix_batch(imgs, labels, 4, plain, np.random.default_rng(0))
    assert x is imgs and torch.allclose(t.sum(1), torch.ones(8)) and t[0, 0] == pytest.approx(0.925)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        s = FinetuneSettings(mixup=mixup, cutmix=cutmix, smoothing=0.0)
        x, t = mix_batch(imgs, labels, 4, s, np.random.default_rng(1))
        lam = t[0, labels[0]].item()   # sample 0 mixes with sample 7 (another class)
        assert torch.allclose(t.sum(1), torch.ones(8)) and 0 <= lam <= 1
        if cutmix:   # the pasted region's share is exactly 1 - lam
            assert ((x[0] == imgs[0]).float().mean().item()) == pytest.approx(lam, abs=1e-6)


def test_lars_scales_matrix_steps_by_the_trust_ratio():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad, b.grad = torch.full((2, 2), 5.0), torch.full((2,), 5.0)
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), 1 - 0.01 * 2 / 10 * 5))   # ||w|| = 2, ||g|| = 10
    assert torch.allclose(b, torch.full((2,), -4.0))                      # vectors: plain SGD
    head = probe_head(16, 10)
    assert not head[0].affine and head[0].eps == 1e-6


def test_linprobe_command_pretrained_and_random(tiny_file, tmp_path):
    results = {}
    for flag in ([], ["--random-init"]):
        out = tmp_path / ("random" if flag else "pre")
        assert main(["linprobe", str(tiny_file), "--run-dir", str(out), "--set", "linprobe.epochs=3", *CPU,
                     *flag]) == 0
        results[bool(flag)] = json.loads((out / "result.json").read_text())
    for r in results.values():
        assert r["protocol"].startswith("MAE linear probe") and 0.0 < r["top1"] <= r["top5"] <= 1.0
        assert r["settings"]["batch_size"] == 64 and r["lr"] == 6.4 and r["val_images"] == 359
    assert results[True]["encoder"] == "random init"
    assert main(["linprobe", str(tiny_file), "--set", "linprobe.pool=\"max\""]) == 2


def test_resume_names_the_settings_that_differ():
    from sslpt.engine.finetune import settings_differences

    now = asdict(FinetuneSettings(epochs=3))
    assert settings_differences(json.loads(json.dumps(now)), now) == ""
    assert settings_differences({**json.loads(json.dumps(now)), "epochs": 5}, now) == "epochs: 5 -> 3"
    # a checkpoint from before RandAugment / erasing existed trained without them
    legacy = {k: v for k, v in json.loads(json.dumps(now)).items() if k not in ("rand_augment", "reprob")}
    assert settings_differences(legacy, now) == "rand_augment: 'none' -> 'rand-m9-mstd0.5-inc1', reprob: 0.0 -> 0.25"
    assert settings_differences(legacy, {**now, "rand_augment": "none", "reprob": 0.0}) == ""


def test_augmentation_settings_are_checked():
    s = FinetuneSettings()
    assert s.rand_augment == "rand-m9-mstd0.5-inc1" and s.reprob == 0.25
    assert s.rand_augment_spec.magnitude == 9 and s.rand_augment_spec.num_ops == 2
    assert FinetuneSettings(rand_augment="none").rand_augment_spec is None
    digits = FinetuneSettings(**PRESETS["digits"])
    assert digits.rand_augment_spec is None and digits.reprob == 0.0   # RandAugment hurt 8x8 digits (measured)
    assert FinetuneSettings(**PRESETS["vit_base_100ep"]).rand_augment_spec is not None
    for bad in ("rand-m9-foo", "autoaug", "rand-m12", 9):
        with pytest.raises(ConfigError, match=r"finetune\.rand_augment.*expected rand-m<int>"):
            FinetuneSettings(rand_augment=bad).check()
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"finetune\.reprob"):
            FinetuneSettings(reprob=bad).check()


def test_finetune_command_refuses_a_bad_rand_augment(tiny_file, capsys):
    assert main(["finetune", str(tiny_file), "--set", "finetune.rand_augment=\"rand-mx\""]) == 2
    assert "finetune.rand_augment" in capsys.readouterr().err


def test_pixel_space_of_digits_and_augment_batch():
    from sslpt.engine.data import build_train_data
    from sslpt.engine.data.digits import _raw_digits

    data = build_train_data("digits", img_size=8, channels=1, batch_size=64, seed=0, device="cpu")
    mean, std = pixel_stats(data)
    pixels = data.imgs * std + mean   # the 0..16 scale of the raw digits, as [0, 1]
    raw = torch.from_numpy(np.unique(_raw_digits()[0]))
    assert pixels.min().item() == pytest.approx(0, abs=1e-6) and pixels.max().item() == pytest.approx(1, abs=1e-6)
    assert torch.allclose(torch.unique(torch.round(pixels * 16)), raw) and torch.allclose(pixels * 16, torch.round(
        pixels * 16), atol=1e-4)
    imgs = data.imgs[:32]
    s = FinetuneSettings()
    out = augment_batch(imgs, s, mean, std, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ref = random_erase((rand_augment(imgs * std + mean, s.rand_augment_spec, g, fill=mean.flatten()) - mean) / std,
                       0.25, g)
    assert torch.equal(out, ref) and not torch.equal(out, imgs)
    off = FinetuneSettings(rand_augment="", reprob=0.0)
    assert augment_batch(imgs, off, mean, std, torch.Generator()) is imgs


@pytest.mark.parametrize("augment", ["on", "off"])
def test_finetune_resume_is_bit_identical(tiny_file, tmp_path, augment):
    cfg = load_config(None, ["model.img_size=8", "model.patch_size=2", "model.in_chans=1", "model.embed_dim=32",
                             "model.depth=2", "model.num_heads=2", "train.precision=\"fp32\"", "train.cpu_threads=1"])
    extra = {} if augment == "on" else {"rand_augment": "none", "reprob": 0.0}   # on: RandAugment + erasing
    s = FinetuneSettings(epochs=2, warmup_epochs=1, batch_size=256, blr=1e-3, layer_decay=0.75, drop_path=0.1,
                         **extra)
    full = FineTuner(cfg, encoder_from_file(tiny_file)[0], s, tmp_path / "full", show_progress=False)
    result = full.train()
    first = sorted((tmp_path / "full" / "checkpoints").iterdir())[0]   # after epoch 1 (keep = 2)
    resumed = FineTuner(cfg, encoder_from_file(tiny_file)[0], s, tmp_path / "resumed", resume=first,
                        show_progress=False)
    assert resumed.next_step == full.data.steps_per_epoch
    again = resumed.train()
    a, b = full.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["history"] == result["history"] and len(result["history"]) == 2
    assert 0.0 < result["top1"] <= result["top5"] <= 1.0


def test_finetune_command_writes_result(tiny_file, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_file), "--run-dir", str(out), "--set", "finetune.epochs=1",
                 "--set", "finetune.batch_size=256", "--set", "finetune.pool=\"cls\"", "--quiet", *CPU]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["settings"]["pool"] == "cls" and result["epochs"] == 1 and len(result["history"]) == 1
    assert (out / "metrics.jsonl").read_text().count('"type": "train"') == 1
    assert main(["finetune", str(tiny_file), "--set", "finetune.layer_decay=2"]) == 2


def test_finetune_of_a_resnet_says_it_is_vit_only(tmp_path, capsys):
    from sslpt.engine.export import save_encoder
    from sslpt.engine.models.resnet import build_resnet

    path = tmp_path / "r18.safetensors"
    save_encoder(build_resnet("resnet18", in_chans=1, stem="small", img_size=8), path)
    assert main(["finetune", str(path), "--run-dir", str(tmp_path / "ft")]) == 2
    assert "MAE's ViT recipe" in capsys.readouterr().err
