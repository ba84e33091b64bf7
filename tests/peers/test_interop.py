"""The engine against the real timm and lightly (marker ``peers``): an exported encoder loads into timm's
VisionTransformer (strict) and gives the same features; our NT-Xent equals lightly's NTXentLoss.

These need torchvision, so they run in their own environment, ``.venv-peers`` (``make test-peers``, which
``make test`` runs after the main suite); the main suite skips them.
"""
import os
import re

import pytest
import torch

pytestmark = pytest.mark.peers

if os.environ.get("SSLPT_PEERS") == "1":   # in the peers environment a missing library is a failure
    import lightly.loss
    import timm
    import torchvision
else:
    timm = pytest.importorskip("timm")
    lightly = pytest.importorskip("lightly")
    torchvision = pytest.importorskip("torchvision")
    import lightly.loss

from sslpt.engine.export import RESNET_RULES, save_encoder
from sslpt.engine.models.vit import VisionTransformer
from sslpt.kernels import nt_xent

ATOL = 1e-4   # fp32: attention through different kernels, 12 blocks


def _load_into_timm(path, meta):
    from safetensors.torch import load_file

    if meta["timm_model"] is not None:
        head = {k: meta["timm_kwargs"][k] for k in ("num_classes", "global_pool", "fc_norm")}
        model = timm.create_model(meta["timm_model"], pretrained=False, **head)
    else:
        model = timm.models.vision_transformer.VisionTransformer(**meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def _compare(encoder, path, batch=2, pool="cls"):
    encoder = encoder.eval()
    with torch.no_grad():   # a learned-looking table: timm's pos_embed is a parameter, ours a buffer
        encoder.pos_embed.add_(0.02 * torch.randn_like(encoder.pos_embed))
    meta = save_encoder(encoder, path, pool=pool)
    model = _load_into_timm(path, meta)
    size, chans = meta["img_size"], meta["timm_kwargs"]["in_chans"]
    imgs = torch.randn(batch, chans, size, size)
    with torch.no_grad():
        ours_tokens, theirs_tokens = encoder(imgs), model.forward_features(imgs)
        ours, theirs = encoder.features(imgs, pool), model(imgs)
    assert theirs_tokens.shape == ours_tokens.shape
    token_diff = (ours_tokens - theirs_tokens).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"{meta['timm_model'] or 'custom ViT'} pool={pool}: max |ours - timm| tokens {token_diff:.2e}, "
          f"features {diff:.2e}")
    assert token_diff < ATOL and diff < ATOL
    return meta


@pytest.mark.parametrize("dims,name", [((192, 12, 3), "vit_tiny_patch16_224"), ((384, 12, 6), "vit_small_patch16_224"),
                                       ((768, 12, 12), "vit_base_patch16_224")])
def test_exported_vit_loads_into_timm_strict_with_identical_features(tmp_path, dims, name):
    width, depth, heads = dims
    encoder = VisionTransformer(224, 16, 3, width, depth, heads)
    meta = _compare(encoder, tmp_path / f"{name}.safetensors", pool="cls" if width != 384 else "mean")
    assert meta["timm_model"] == name


def test_small_custom_vit_loads_through_timm_kwargs(tmp_path):
    """Digits-sized encoders have no registered timm name: the JSON's kwargs build the same model."""
    meta = _compare(VisionTransformer(8, 2, 1, 32, 2, 2), tmp_path / "digits.safetensors", batch=5, pool="mean")
    assert meta["timm_model"] is None and meta["timm_kwargs"]["in_chans"] == 1


def test_export_command_of_a_real_run_loads_into_timm(tmp_path):
    """Pre-train a tiny run (synthetic images), export it with the CLI, load it into timm."""
    from safetensors.torch import load_file

    from sslpt.engine.cli import main
    from sslpt.engine.config import load_config
    from sslpt.engine.pretrained import load_run
    from sslpt.engine.train import pretrain

    run = tmp_path / "run"
    cfg = load_config("mae_digits", ["data.name=\"synthetic\"", "data.synthetic_size=64", "model.img_size=16",
                                     "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32", "model.depth=2",
                                     "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
                                     "model.decoder_heads=2", "train.epochs=1", "train.batch_size=32",
                                     "train.probe=false", "train.cpu_threads=1"])
    pretrain(cfg, run_dir=run, show_progress=False)
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    import json

    meta = json.loads((tmp_path / "enc.safetensors.json").read_text())
    model = timm.models.vision_transformer.VisionTransformer(**meta["timm_kwargs"]).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    _, objective, _ = load_run(run)
    imgs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (model(imgs) - objective.encoder.eval().features(imgs, "cls")).abs().max() < ATOL


def test_resnet_name_map_covers_timm_and_torchvision_resnet50():
    """No ResNet encoder exists in the engine yet (nothing to export); the name map it will use is checked
    against the real timm and torchvision ResNet-50 state dicts."""
    timm_keys = set(timm.create_model("resnet50", pretrained=False).state_dict())
    tv_keys = set(torchvision.models.resnet50(weights=None).state_dict())
    assert timm_keys == tv_keys

    def rename(name):
        for pattern, repl in RESNET_RULES:
            if re.match(pattern, name):
                return re.sub(pattern, repl, name)
        raise AssertionError(name)

    assert {rename(k) for k in tv_keys} == timm_keys


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_lightly(temperature):
    z1, z2 = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    ours = nt_xent(z1, z2, temperature)
    theirs = lightly.loss.NTXentLoss(temperature=temperature)(z1, z2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours_grad = torch.autograd.grad(ours, (z1, z2))
    theirs_grad = torch.autograd.grad(theirs, (z1, z2))
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_dino_loss_has_no_counterpart_yet():
    pytest.skip("the engine has no DINO-style loss yet: the comparison with lightly's DINOLoss comes with it")
