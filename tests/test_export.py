"""Export of a run's encoder (timm names, safetensors + JSON) and the reverse import; `python -m sslpt export`.
The checks against the real timm and lightly are in tests/peers/ (their own environment: `make test-peers`)."""
import json

import pytest
import torch

from sslpt.engine.cli import main
from sslpt.engine.config import load_config
from sslpt.engine.export import (RESNET_RULES, ExportError, encoder_from_file, export_state, read_encoder_file,
                                 save_encoder, timm_vit_kwargs, timm_vit_name)
from sslpt.engine.models.resnet import build_resnet
from sslpt.engine.models.vit import VisionTransformer
from sslpt.engine.train import pretrain

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "train.batch_size=256", "train.epochs=1", "train.probe=false", "train.eval_every=0",
        "train.cpu_threads=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    pretrain(load_config("hpm_digits", TINY), run_dir=run_dir, show_progress=False)
    return run_dir


def _vit(**kw):
    args = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer(**args)


def test_timm_names_and_layout():
    encoder = _vit()
    state = export_state(encoder)
    assert "patch_embed.proj.weight" in state and "patch_embed.weight" not in state
    assert state["pos_embed"].shape == (1, 1 + 16, 48) and state["cls_token"].shape == (1, 1, 48)
    assert {k for k in state if k.startswith("blocks.0.")} == {
        f"blocks.0.{n}.{p}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")}
    assert set(export_state(encoder, "torch")) == set(encoder.state_dict())
    kwargs = timm_vit_kwargs(encoder, "mean")
    assert kwargs["global_pool"] == "avg" and kwargs["num_classes"] == 0 and kwargs["img_size"] == 16
    assert timm_vit_name(timm_vit_kwargs(_vit(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                              num_heads=12))) == "vit_base_patch16_224"
    assert timm_vit_name(kwargs) is None
    with pytest.raises(ExportError):
        export_state(encoder, "onnx")


@pytest.mark.parametrize("fmt", ["timm", "torch"])
def test_file_round_trip_gives_identical_features(tmp_path, fmt):
    encoder = _vit().eval()
    with torch.no_grad():
        encoder.pos_embed.add_(0.01 * torch.randn_like(encoder.pos_embed))   # a non-default table travels too
    path = tmp_path / "enc.safetensors"
    meta = save_encoder(encoder, path, fmt=fmt, extra={"note": "x"})
    assert json.loads((tmp_path / "enc.safetensors.json").read_text()) == meta
    _, header_meta = read_encoder_file(path)
    assert header_meta == meta
    loaded, info = encoder_from_file(path)
    imgs = torch.randn(3, 3, 16, 16)
    for pool in ("cls", "mean"):
        assert torch.equal(loaded.eval().features(imgs, pool), encoder.features(imgs, pool))
    assert info["note"] == "x" and info["extra_tensors"] == []


def test_import_without_metadata_reads_the_shape_and_keeps_a_head(tmp_path):
    from safetensors.torch import save_file

    encoder = _vit(embed_dim=128, num_heads=2)
    state = export_state(encoder)
    state.update({"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)})
    save_file(state, str(tmp_path / "bare.safetensors"))
    loaded, info = encoder_from_file(tmp_path / "bare.safetensors")
    assert loaded.blocks[0].attn.num_heads == 2 and info["extra_tensors"] == ["head.bias", "head.weight"]
    state["blocks.0.norm1.weight"] = torch.zeros(7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ExportError, match="shape mismatch"):
        encoder_from_file(tmp_path / "bad.safetensors")


def test_resnet_name_map_is_torchvision_layout_only():
    import re

    def rename(name):
        for pattern, repl in RESNET_RULES:
            if re.match(pattern, name):
                return re.sub(pattern, repl, name)
        return None

    for name in ("conv1.weight", "bn1.running_var", "layer3.5.conv2.weight", "layer1.0.downsample.1.bias",
                 "fc.weight"):
        assert rename(name) == name
    assert rename("stem.conv.weight") is None


def test_export_command_writes_safetensors_and_json(tiny_run, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "encoder.safetensors.json").read_text())
    assert meta["format"] == "timm" and meta["objective"] == "hpm" and len(meta["config_sha256"]) == 64
    assert meta["timm_kwargs"]["img_size"] == 8 and meta["normalisation"]["pixel_range"] == [0, 16]
    assert str(out) in capsys.readouterr().out
    from sslpt.engine.pretrained import load_run

    _, objective, _ = load_run(tiny_run)
    loaded, _ = encoder_from_file(out)
    imgs = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.eval().features(imgs, "cls"), objective.encoder.eval().features(imgs, "cls"))
    assert main(["export", str(tiny_run / "nothing")]) == 2


# ---------------------------------------------------------------- ResNet encoders

def _trained_looking_resnet(**kw):
    """A ResNet whose BatchNorm statistics and affine parameters are not their init (they must travel too)."""
    from sslpt.engine.models.resnet import build_resnet

    torch.manual_seed(0)
    encoder = build_resnet(**kw)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.running_mean.add_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.mul_(1 + 0.2 * torch.rand_like(m.running_var))
    return encoder.eval()


@pytest.mark.parametrize("fmt", ["timm", "torch"])
@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_resnet_file_round_trip_gives_identical_features(tmp_path, fmt, stem):
    encoder = _trained_looking_resnet(arch="resnet18", stem=stem, in_chans=1, img_size=32)
    path = tmp_path / "resnet.safetensors"
    meta = save_encoder(encoder, path, fmt=fmt, extra={"config_sha256": "x" * 64})
    assert json.loads((tmp_path / "resnet.safetensors.json").read_text()) == meta
    assert meta["architecture"] == "resnet" and meta["model"] == "resnet18" and meta["resnet_stem"] == stem
    assert meta["in_chans"] == 1 and meta["img_size"] == 32 and meta["embed_dim"] == 512
    assert meta["timm_kwargs"] == {"in_chans": 1, "num_classes": 0} and meta["timm_model"] == "resnet18"
    assert ("stem_note" in meta) == (stem == "small")
    tensors, _ = read_encoder_file(path)
    assert set(tensors) == set(encoder.state_dict())   # torchvision's names in both formats, statistics included
    loaded, info = encoder_from_file(path)
    assert loaded.stem == stem and loaded.in_chans == 1 and loaded.img_size == 32 and info["extra_tensors"] == []
    imgs = torch.randn(3, 1, 32, 24)
    for pool in ("cls", "mean"):
        assert torch.equal(loaded.eval().features(imgs, pool), encoder.features(imgs, pool))


def test_resnet_import_without_metadata_reads_the_layout_and_keeps_fc(tmp_path):
    from safetensors.torch import save_file

    from sslpt.engine.models.resnet import Bottleneck, ResNet

    source = ResNet(Bottleneck, [1, 2, 1, 1], in_chans=3, num_classes=5).eval()
    state = export_state(source, rules=RESNET_RULES)
    save_file(state, str(tmp_path / "bare.safetensors"))
    loaded, info = encoder_from_file(tmp_path / "bare.safetensors")
    assert loaded.block is Bottleneck and loaded.layers == (1, 2, 1, 1) and loaded.stem == "imagenet"
    assert info["extra_tensors"] == ["fc.bias", "fc.weight"] and loaded.fc is None
    imgs = torch.randn(2, 3, 40, 40)
    assert torch.equal(loaded.eval().features(imgs), source.features(imgs))
    state["layer2.1.bn3.running_var"] = torch.ones(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ExportError, match="does not fit this ResNet.*shape mismatch"):
        encoder_from_file(tmp_path / "bad.safetensors")
    with pytest.raises(ExportError, match="no timm name for tensor 'extra.weight'"):
        export_state(torch.nn.ModuleDict({"conv1": torch.nn.Conv2d(1, 1, 1), "extra": torch.nn.Linear(1, 1)}),
                     rules=RESNET_RULES)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export_resnet") / "run"
    overrides = ["model.arch=resnet18", "model.resnet_stem=small", "data.name=synthetic", "data.synthetic_size=32",
                 "train.batch_size=16", "train.epochs=1", "train.probe=false", "train.eval_every=0",
                 "train.cpu_threads=1", "train.precision=fp32", "objective.simclr.proj_hidden=32",
                 "objective.simclr.proj_dim=16"]
    pretrain(load_config("simclr_digits", overrides), run_dir=run_dir, show_progress=False)
    return run_dir


def test_resnet_run_exports_and_loads_back(resnet_run, tmp_path):
    from sslpt.engine.pretrained import load_encoder, load_run

    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(resnet_run), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "encoder.safetensors.json").read_text())
    assert meta["architecture"] == "resnet" and meta["objective"] == "simclr" and len(meta["config_sha256"]) == 64
    assert meta["img_size"] == 8 and meta["resnet_stem"] == "small" and len(meta["normalisation"]["mean"]) == 1
    _, objective, _ = load_run(resnet_run)
    cfg, loaded, _ = load_encoder(out, ["data.name=synthetic"])
    m = cfg.model
    assert (m.arch, m.resnet_stem, m.in_chans, m.img_size) == ("resnet18", "small", 1, 8)
    imgs = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.eval().features(imgs), objective.encoder.eval().features(imgs))
    _, random, what = load_encoder(out, random_init=True)
    assert what == "random init" and type(random) is type(loaded)
    assert not torch.equal(random.conv1.weight, loaded.conv1.weight)


def test_export_refuses_a_resnet_width_timm_cannot_name(tmp_path, capsys):
    """model.resnet_width != 64 has no timm / torchvision name: a one-line error naming the field, no file."""
    run_dir = tmp_path / "run"
    overrides = ["model.arch=resnet18", "model.resnet_stem=small", "model.resnet_width=8", "data.name=synthetic",
                 "data.synthetic_size=16", "train.batch_size=8", "train.epochs=1", "train.probe=false",
                 "train.eval_every=0", "train.cpu_threads=1", "train.precision=fp32",
                 "objective.simclr.proj_hidden=16", "objective.simclr.proj_dim=8"]
    pretrain(load_config("simclr_digits", overrides), run_dir=run_dir, show_progress=False)
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.resnet_width=8" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "encoder.safetensors.json").exists()
    with pytest.raises(ExportError, match="model.resnet_width=16"):
        save_encoder(build_resnet("resnet18", width=16), tmp_path / "direct.safetensors")
    assert not (tmp_path / "direct.safetensors").exists()
