"""Export of a run's encoder (timm names, safetensors + JSON) and the reverse import; `python -m sslpt export`.
The checks against the real timm and lightly are in tests/peers/ (their own environment: `make test-peers`)."""
import json

import pytest
import torch

from sslpt.engine.cli import main
from sslpt.engine.config import load_config
from sslpt.engine.export import (RESNET_RULES, ExportError, encoder_from_file, export_state, read_encoder_file,
                                 save_encoder, timm_vit_kwargs, timm_vit_name)
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
