"""The engine against the real timm, torchvision and lightly (marker ``peers``): an exported encoder loads into
timm's VisionTransformer or ResNet (strict) and gives the same features, our ResNets' state dicts are torchvision's;
our NT-Xent equals lightly's NTXentLoss.

These need torchvision, so they run in their own environment, ``.venv-peers`` (``make test-peers``, which
``make test`` runs after the main suite); the main suite skips them.
"""
import os

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

from sslpt.engine.export import save_encoder
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


def _trained_looking_resnet(arch, **kw):
    """An engine ResNet in eval mode whose BatchNorm statistics and affine parameters are not their init."""
    from sslpt.engine.models.resnet import build_resnet

    torch.manual_seed(0)
    encoder = build_resnet(arch, **kw)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
                m.running_mean.add_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.mul_(1 + 0.2 * torch.rand_like(m.running_var))
    return encoder.eval()


def _small_stem(model):
    """timm's / torchvision's ResNet with the engine's small stem: 3x3 stride-1 conv1, no max-pool."""
    model.conv1 = torch.nn.Conv2d(model.conv1.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def _assert_same_features(encoder, model, chans, size, label):
    imgs = torch.randn(2, chans, size, size)
    with torch.no_grad():
        ours, theirs = encoder.features(imgs), model.eval()(imgs)
    assert theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    print(f"{label}: max |ours - theirs| pooled features {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_state_dict_loads_strict_into_torchvision_and_timm(arch):
    """Our state dict is torchvision's and timm's (no fc: an encoder) and gives their pooled features."""
    encoder = _trained_looking_resnet(arch)
    state = encoder.state_dict()
    tv = getattr(torchvision.models, arch)(weights=None)
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    _assert_same_features(encoder, tv, 3, 64, f"torchvision {arch}")
    tm = timm.create_model(arch, pretrained=False, num_classes=0)
    tm.load_state_dict(state, strict=True)
    _assert_same_features(encoder, tm, 3, 64, f"timm {arch}")


@pytest.mark.parametrize("arch,stem,chans", [("resnet50", "imagenet", 3), ("resnet18", "imagenet", 1),
                                             ("resnet18", "small", 1)])
def test_exported_resnet_loads_into_timm_strict(tmp_path, arch, stem, chans):
    """The exported file and its JSON rebuild the encoder in timm (the small stem as the JSON describes)."""
    from safetensors.torch import load_file

    encoder = _trained_looking_resnet(arch, stem=stem, in_chans=chans, img_size=32)
    path = tmp_path / f"{arch}.safetensors"
    meta = save_encoder(encoder, path)
    assert meta["timm_model"] == arch and meta["resnet_stem"] == stem
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    if stem == "small":
        model = _small_stem(model)
    model.load_state_dict(load_file(str(path)), strict=True)
    _assert_same_features(encoder, model, chans, meta["img_size"], f"exported {arch} ({stem} stem) in timm")


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


@pytest.mark.parametrize("local_crops", [0, 8, 10])
def test_prototype_cross_entropy_and_centre_equal_lightlys_dino_loss(local_crops):
    """Given the logits themselves as features and identity prototypes, prototype_cross_entropy is lightly's
    DINOLoss (every teacher view against every other student view), gradient included; prototype_center is the
    batch mean lightly's centre moves towards."""
    from sslpt.kernels import prototype_center, prototype_cross_entropy

    torch.manual_seed(local_crops)
    batch, k = 6, 16
    teacher = [torch.randn(batch, k) for _ in range(2)]
    student = [torch.randn(batch, k, requires_grad=True) for _ in range(2 + local_crops)]
    theirs = lightly.loss.DINOLoss(output_dim=k, warmup_teacher_temp_epochs=0, teacher_temp=0.06)
    theirs.center.normal_()
    center = theirs.center.detach().clone().view(-1)
    expected = theirs(teacher, student, teacher_temp=0.06)
    eye = torch.eye(k)
    ours = prototype_cross_entropy(torch.cat(student), torch.cat(teacher), eye, eye, center, student_temp=0.1,
                                   teacher_temp=0.06)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, student), torch.autograd.grad(expected, student)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    moved = 0.9 * center + 0.1 * prototype_center(torch.cat(teacher), eye)
    torch.testing.assert_close(theirs.center.view(-1), moved, atol=1e-6, rtol=1e-5)
