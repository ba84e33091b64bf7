"""ResNet encoders (engine/models/resnet.py) and the backbone entry point (engine/models/backbones.py): torchvision's
names and shapes from its layout rules, outputs against a functional reference written here, feature maps at any
resolution, FLOPs against a hook count, the config rules for ResNets, SimCLR / MoCo v3 on a ResNet, and DDP on
2 CPU ranks through the trainer."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.models.backbones import backbone_flops, build_backbone, global_feature, is_resnet
from sslpt.engine.models.resnet import (BasicBlock, Bottleneck, ResNet, build_resnet, resnet18, resnet50,
                                        resnet_flops)
from sslpt.engine.models.vit import VisionTransformer
from sslpt.engine.objectives import StepContext, build_objective
from testkit import spawn_ranks


# ---------------------------------------------------------------- names and shapes

def _torchvision_resnet50_shapes(in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Every tensor of torchvision's resnet50 without fc, from its layout rules: a 7x7 stem, stages of
    [3, 4, 6, 3] Bottlenecks (1x1, 3x3, 1x1 x4 wide), a 1x1 conv + BN shortcut on each stage's first block."""
    shapes = {"conv1.weight": (64, in_chans, 7, 7)}

    def bn(name, channels):
        shapes.update({f"{name}.weight": (channels,), f"{name}.bias": (channels,), f"{name}.running_mean": (channels,),
                       f"{name}.running_var": (channels,), f"{name}.num_batches_tracked": ()})

    bn("bn1", 64)
    in_planes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for i in range(blocks):
            name = f"layer{stage}.{i}"
            shapes[f"{name}.conv1.weight"] = (planes, in_planes, 1, 1)
            bn(f"{name}.bn1", planes)
            shapes[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{name}.bn2", planes)
            shapes[f"{name}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{name}.bn3", 4 * planes)
            if i == 0:
                shapes[f"{name}.downsample.0.weight"] = (4 * planes, in_planes, 1, 1)
                bn(f"{name}.downsample.1", 4 * planes)
            in_planes = 4 * planes
    return shapes


def test_resnet50_has_torchvisions_names_and_shapes():
    model = resnet50()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _torchvision_resnet50_shapes()
    assert sum(p.numel() for p in model.parameters()) == 23_508_032   # torchvision's 25,557,032 less fc
    assert model.embed_dim == 2048 and model.fc is None
    # v1.5: the stride sits on the 3x3 conv, never on the first 1x1
    for stage in (2, 3, 4):
        block = getattr(model, f"layer{stage}")[0]
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
        assert block.downsample[0].stride == (2, 2)
    with_fc = resnet50(num_classes=1000)
    assert sum(p.numel() for p in with_fc.parameters()) == 25_557_032
    assert resnet50(in_chans=1).conv1.weight.shape == (64, 1, 7, 7)


def test_resnet18_layout_and_small_stem():
    model = resnet18(stem="small", in_chans=1)
    assert model.embed_dim == 512 and model.conv1.weight.shape == (64, 1, 3, 3) and model.conv1.stride == (1, 1)
    downsampled = {k.split(".downsample")[0] for k in model.state_dict() if ".downsample." in k}
    assert downsampled == {"layer2.0", "layer3.0", "layer4.0"}   # layer1 keeps width 64: no shortcut conv
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert all(isinstance(b, BasicBlock) for b in model.layer3)


def test_width_scales_every_stage_and_the_parameters():
    """model.resnet_width w: stem and stages w, 2w, 4w, 8w wide (x the expansion); 64 is torchvision's network."""
    def basic_count(w, in_chans):   # ResNet-18 small stem, counted from the layout: convs + BN (weight, bias)
        total, in_planes = 9 * in_chans * w + 2 * w, w
        for planes in (w, 2 * w, 4 * w, 8 * w):
            for i in range(2):
                total += 9 * in_planes * planes + 9 * planes * planes + 4 * planes
                if in_planes != planes:
                    total += in_planes * planes + 2 * planes
                in_planes = planes
        return total

    params = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    # torchvision's resnet18 (11,689,512) less fc (513,000) and the 7x7 RGB stem (9,408), plus the 3x3 grey one (576)
    assert params(resnet18(stem="small", in_chans=1)) == basic_count(64, 1) == 11_167_680
    for width in (8, 16, 32):
        model = resnet18(stem="small", in_chans=1, width=width)
        assert model.width == width and model.embed_dim == 8 * width
        assert params(model) == basic_count(width, 1)
        maps = model.feature_maps(torch.randn(2, 1, 8, 8), ("layer1", "layer2", "layer3", "layer4"))
        assert {k: tuple(v.shape) for k, v in maps.items()} == {
            "layer1": (2, width, 8, 8), "layer2": (2, 2 * width, 4, 4), "layer3": (2, 4 * width, 2, 2),
            "layer4": (2, 8 * width, 1, 1)}
        assert model.features(torch.randn(3, 1, 8, 8)).shape == (3, 8 * width)
        assert [model.stage_channels(n) for n in ("layer1", "layer2", "layer3", "layer4")] == [
            width, 2 * width, 4 * width, 8 * width]
        assert resnet_flops(model, 8) == pytest.approx(resnet_flops(resnet18(stem="small", in_chans=1), 8)
                                                       * (width / 64) ** 2, rel=0.01)
    wide50 = resnet50(width=16)
    assert wide50.embed_dim == 512 and wide50.layer1[0].conv3.weight.shape == (64, 16, 1, 1)
    # the config field reaches the backbone; bad values and a ViT are refused with the field's name
    cfg = load_config("scfs_digits", ["model.resnet_width=16"])
    assert build_backbone(cfg.model).embed_dim == 128
    for value, message in (("0", "must be an integer >= 1"), ("-8", "must be an integer >= 1"),
                           ("12.5", "must be an integer")):
        with pytest.raises(ConfigError, match=f"model.resnet_width {message}"):
            load_config("scfs_digits", [f"model.resnet_width={value}"])
    with pytest.raises(ConfigError, match="model.resnet_width=16 applies to ResNets only"):
        load_config("dino_digits", ["model.resnet_width=16"])
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        resnet18(width=0)


def test_init_is_torchvisions():
    torch.manual_seed(0)
    model = resnet50()
    w = model.layer3[0].conv2.weight   # fan_out = 256 * 3 * 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    zero = resnet50(zero_init_residual=True)
    assert all(float(b.bn3.weight.detach().abs().max()) == 0 for s in (zero.layer1, zero.layer4) for b in s)
    assert float(zero.layer1[0].bn2.weight.detach().min()) == 1.0
    assert all(float(b.bn2.weight.detach().abs().max()) == 0 for b in resnet18(zero_init_residual=True).layer2)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="cifar")
    with pytest.raises(ValueError, match="arch"):
        build_resnet("resnet19")
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, [2, 2, 2])
    model = resnet18(stem="small")
    with pytest.raises(ValueError, match="layers must name"):
        model.feature_maps(torch.randn(1, 3, 8, 8), ("layer5",))
    with pytest.raises(ValueError, match=r"imgs must be \[B, 3"):
        model.feature_maps(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pool"):
        model.features(torch.randn(2, 3, 8, 8), pool="max")


# ---------------------------------------------------------------- a functional reference

def _randomise_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm affine parameters and running statistics away from their init, so the reference sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))


def _reference(model: ResNet, imgs: torch.Tensor, training: bool):
    """The pooled features from the module's own tensors with F.conv2d / F.batch_norm, and the running
    statistics that forward leaves (updated copies)."""
    p = dict(model.named_parameters())
    stats = {k: v.clone() for k, v in model.named_buffers() if not k.endswith("num_batches_tracked")}

    def conv(name, x, stride, padding):
        return F.conv2d(x, p[f"{name}.weight"], stride=stride, padding=padding)

    def bn(name, x):
        return F.batch_norm(x, stats[f"{name}.running_mean"], stats[f"{name}.running_var"], p[f"{name}.weight"],
                            p[f"{name}.bias"], training, 0.1, 1e-5)

    if model.stem == "imagenet":
        x = F.max_pool2d(F.relu(bn("bn1", conv("conv1", imgs, 2, 3))), 3, 2, 1)
    else:
        x = F.relu(bn("bn1", conv("conv1", imgs, 1, 1)))
    bottleneck = model.block is Bottleneck
    for stage, blocks in enumerate(model.layers, start=1):
        for i in range(blocks):
            name, stride = f"layer{stage}.{i}", (1 if stage == 1 or i else 2)
            if bottleneck:
                y = F.relu(bn(f"{name}.bn1", conv(f"{name}.conv1", x, 1, 0)))
                y = F.relu(bn(f"{name}.bn2", conv(f"{name}.conv2", y, stride, 1)))
                y = bn(f"{name}.bn3", conv(f"{name}.conv3", y, 1, 0))
            else:
                y = F.relu(bn(f"{name}.bn1", conv(f"{name}.conv1", x, stride, 1)))
                y = bn(f"{name}.bn2", conv(f"{name}.conv2", y, 1, 1))
            if f"{name}.downsample.0.weight" in p:
                shortcut = bn(f"{name}.downsample.1", conv(f"{name}.downsample.0", x, stride, 0))
            else:
                shortcut = x
            x = F.relu(y + shortcut)
    return x.mean(dim=(2, 3)), stats


CASES = {
    "resnet18-small": lambda: resnet18(stem="small", in_chans=1),
    "resnet18-imagenet": lambda: resnet18(),
    "bottleneck-1111": lambda: ResNet(Bottleneck, [1, 2, 1, 1], in_chans=2),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_functional_reference(case, training):
    torch.manual_seed(0)
    model = CASES[case]()
    _randomise_norms(model, 1)
    size = 9 if model.stem == "small" else 40   # odd sizes: the strided convs round
    imgs = torch.randn(3, model.in_chans, size, size + 3)
    expected, stats = _reference(model, imgs, training)
    model.train(training)
    out = model(imgs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buffer) == int(training), name
        else:
            torch.testing.assert_close(buffer, stats[name], rtol=1e-5, atol=1e-6)
    # the gradient reaches the stem through every stage
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- feature maps, resolutions, probes

@pytest.mark.parametrize("stem,size,first_stride", [("imagenet", (64, 40), 4), ("small", (8, 8), 1),
                                                     ("small", (12, 10), 1)])
def test_feature_maps_shapes_and_strides(stem, size, first_stride):
    model = resnet18(stem=stem, in_chans=1).eval()
    maps = model.feature_maps(torch.randn(2, 1, *size), ("layer1", "layer2", "layer3", "layer4"))
    assert list(maps) == ["layer1", "layer2", "layer3", "layer4"]
    for i, (name, fmap) in enumerate(maps.items()):
        stride = first_stride * 2 ** i
        assert model.stage_strides[name] == stride
        assert fmap.shape == (2, 64 * 2 ** i, math.ceil(size[0] / stride), math.ceil(size[1] / stride)), name


def test_feature_maps_stop_at_the_deepest_layer_asked_for():
    model = resnet50(stem="small").eval()
    ran = []
    for name in ("layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda *_, n=name: ran.append(n))
    maps = model.feature_maps(torch.randn(1, 3, 16, 16), ("layer2",))
    assert list(maps) == ["layer2"] and maps["layer2"].shape == (1, 512, 8, 8) and ran == ["layer2"]


def test_any_resolution_and_probe_features():
    model = resnet50().eval()
    for size in (224 // 4, 96 // 3, 37):   # multi-crop local crops and an odd size
        assert model(torch.randn(2, 3, size, size)).shape == (2, 2048)
    imgs = torch.randn(2, 3, 48, 48)
    mean, cls = model.features(imgs, "mean"), model.features(imgs, "cls")
    assert not mean.requires_grad and torch.equal(mean, cls) and torch.equal(mean, model(imgs))
    logits = resnet18(num_classes=10).eval()
    assert logits(imgs).shape == (2, 10) and logits.features(imgs).shape == (2, 512)


def _hook_flops(model: nn.Module, imgs: torch.Tensor) -> float:
    """2 x multiply-adds of every conv and linear layer, counted from a real forward."""
    total = [0.0]

    def conv_hook(m, _, out):
        total[0] += 2.0 * out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] / m.groups

    def linear_hook(m, _, out):
        total[0] += 2.0 * out[0].numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model.eval()(imgs)
    return total[0]


def test_flops_match_a_hook_count():
    assert resnet_flops(resnet50(num_classes=1000), 224) == pytest.approx(2 * 4.0890e9, rel=1e-3)   # 4.09 GMACs
    for model, size in ((resnet50(), (45, 37)), (resnet18(stem="small", in_chans=1), (8, 8)),
                        (resnet18(num_classes=7), (33, 33))):
        assert resnet_flops(model, size) == pytest.approx(_hook_flops(model, torch.randn(1, model.in_chans, *size)))


# ---------------------------------------------------------------- backbones and config

def test_build_backbone_and_global_feature_for_both():
    cfg = load_config("simclr_digits", ["model.arch=resnet18", "model.resnet_stem=small"])
    assert is_resnet(cfg.model)
    encoder = build_backbone(cfg.model)
    assert isinstance(encoder, ResNet) and encoder.stem == "small" and encoder.in_chans == 1
    imgs = torch.randn(4, 1, 8, 8)
    feature = global_feature(encoder.eval(), imgs, "cls")
    assert feature.shape == (4, 512) and feature.requires_grad
    assert backbone_flops(encoder, 8) == resnet_flops(encoder, 8)
    with pytest.raises(ConfigError, match="frozen_patch_embed applies to ViT encoders only"):
        build_backbone(cfg.model, frozen_patch_embed=True)
    vit_cfg = load_config("simclr_digits")
    vit = build_backbone(vit_cfg.model).eval()
    assert isinstance(vit, VisionTransformer)
    tokens = vit(imgs)
    assert torch.equal(global_feature(vit, imgs, "cls"), tokens[:, 0])
    assert torch.equal(global_feature(vit, imgs, "mean"), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="pooling"):
        global_feature(encoder, imgs, "max")


def test_config_arch_typo_lists_the_choices():
    with pytest.raises(ConfigError, match=r"model.arch must be one of vit_tiny.*resnet18, resnet34, resnet50, "
                                          r"resnet101, got 'resnet05' \(did you mean 'resnet50'\?\)"):
        load_config("simclr_digits", ["model.arch=resnet05"])
    with pytest.raises(ConfigError, match="model.resnet_stem must be one of 'imagenet', 'small'"):
        load_config("simclr_digits", ["model.arch=resnet18", "model.resnet_stem=cifar"])


@pytest.mark.parametrize("preset", ["mae_digits", "hpm_digits", "droppos_digits", "semaim_digits"])
def test_vit_only_objectives_refuse_a_resnet(preset):
    name = preset.split("_")[0]
    with pytest.raises(ConfigError, match=rf"objective '{name}' needs a ViT encoder .* model.arch='resnet50' is "
                                          rf"a ResNet"):
        load_config(preset, ["model.arch=resnet50"])


def test_resnet_config_ignores_vit_fields_and_refuses_block_wrappers():
    # the digits preset's ViT fields (patch size 2, depth 4) do not apply and do not get in the way
    cfg = load_config("simclr_digits", ["model.arch=resnet50", "model.patch_size=3"])
    with pytest.raises(ConfigError, match="is not a ViT"):
        cfg.model.dims
    for override, field in (("train.parallel=fsdp", "train.parallel='fsdp'"),
                            ("train.activation_checkpointing=true", "train.activation_checkpointing"),
                            ("train.compile=true", "train.compile")):
        with pytest.raises(ConfigError, match=rf"{field} .* model.arch='resnet18' is a ResNet"):
            load_config("simclr_digits", ["model.arch=resnet18", override])
    with pytest.raises(ConfigError, match="objective.mocov3.stop_grad_patch_embed freezes a ViT's patch embedding"):
        load_config("mocov3_digits", ["model.arch=resnet18", "objective.mocov3.stop_grad_patch_embed=true"])


# ---------------------------------------------------------------- contrastive objectives on a ResNet

RESNET_SMALL = ["model.arch=resnet18", "model.resnet_stem=small", "train.cpu_threads=1"]


def _ctx(step: int = 0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=10, epochs=2, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("preset", ["simclr_digits", "mocov3_digits"])
def test_contrastive_objectives_train_a_resnet(preset):
    torch.manual_seed(0)
    cfg = load_config(preset, RESNET_SMALL + [f"objective.{preset.split('_')[0]}.proj_hidden=64"])
    objective = build_objective(cfg).train()
    assert isinstance(objective.encoder, ResNet)
    # heads, encoder (3x forward for training) and, for MoCo v3, the momentum branch's forward
    assert objective.flops_per_image() > 3 * 2 * resnet_flops(objective.encoder, 8)
    imgs = torch.rand(8, 1, 8, 8)
    before = objective.encoder.layer1[0].bn1.running_mean.clone()
    loss, metrics = objective(imgs, _ctx())
    loss.backward()
    assert torch.isfinite(loss) and "positive_cos" in metrics
    assert objective.encoder.conv1.weight.grad.abs().sum() > 0
    assert not torch.equal(objective.encoder.layer1[0].bn1.running_mean, before)   # batch statistics tracked
    if preset == "mocov3_digits":
        teacher = objective.teacher.model.encoder
        assert isinstance(teacher, ResNet)
        with torch.no_grad():
            objective.encoder.conv1.weight.add_(1.0)
        objective.after_optimizer_step(_ctx())
        student_stats = objective.encoder.layer4[1].bn2.running_var
        assert torch.equal(teacher.layer4[1].bn2.running_var, student_stats)   # buffers copied to the teacher
        assert not torch.equal(teacher.conv1.weight, objective.encoder.conv1.weight)   # weights averaged


# ---------------------------------------------------------------- DDP on 2 CPU ranks through the trainer

DDP_RUN = RESNET_SMALL + ["train.parallel=ddp", "data.name=synthetic", "data.synthetic_size=64",
                          "train.batch_size=8", "train.epochs=1", "train.log_every=1", "train.eval_every=0",
                          "train.probe=false", "train.precision=fp32", "objective.simclr.proj_hidden=64",
                          "objective.simclr.proj_dim=32", "optim.warmup_epochs=0"]


def _ddp_worker(rank: int, port: int, base: str) -> None:
    from sslpt.engine.models.heads import sync_batchnorm_if_distributed
    from sslpt.engine.train import Trainer

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config("simclr_digits", DDP_RUN)
        trainer = Trainer(cfg, run_dir=Path(base) / "run", show_progress=False)
        initial = {k: v.clone() for k, v in trainer.objective.encoder.state_dict().items()}
        result = trainer.train()
        state = {k: v.clone() for k, v in trainer.objective.encoder.state_dict().items()}
        # what the trainer does on GPUs: every BatchNorm of the ResNet becomes a SyncBatchNorm, names unchanged
        torch.manual_seed(0)
        plain = build_objective(load_config("mocov3_digits", RESNET_SMALL + ["objective.mocov3.proj_hidden=64"]))
        imgs = torch.rand(4, 1, 8, 8)
        expected = plain.eval().encoder(imgs)
        keys = list(plain.state_dict())
        synced = sync_batchnorm_if_distributed(plain, on_gpu=True)
        converted = {"sync": sum(isinstance(m, nn.SyncBatchNorm) for m in synced.encoder.modules()),
                     "plain": sum(type(m) is nn.BatchNorm2d for m in synced.modules()),
                     "same_keys": list(synced.state_dict()) == keys,
                     "same_eval_output": torch.equal(synced.eval().encoder(imgs), expected)}
        torch.save({"initial": initial, "final": state, "loss": result.final_loss, "converted": converted},
                   Path(base) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    base = tmp_path_factory.mktemp("resnet_ddp")
    spawn_ranks(_ddp_worker, str(base))
    return [torch.load(base / f"rank{r}.pt") for r in (0, 1)], base


def test_ddp_trains_a_resnet_with_identical_weights_on_both_ranks(ddp_ranks):
    (rank0, rank1), base = ddp_ranks
    assert math.isfinite(rank0["loss"])
    for name, value in rank0["final"].items():
        if "running_" in name or name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, rank1["final"][name]), name   # DDP: the same averaged gradients
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
    assert not torch.equal(rank0["final"]["conv1.weight"], rank0["initial"]["conv1.weight"])
    # 64 images, 8 a rank: 4 steps, each tracked by every BatchNorm
    assert int(rank0["final"]["layer4.1.bn2.num_batches_tracked"]) == 4
    assert (base / "run" / "checkpoints").is_dir()


def test_ddp_batchnorms_become_syncbatchnorm_with_the_same_names(ddp_ranks):
    (rank0, rank1), _ = ddp_ranks
    for converted in (rank0["converted"], rank1["converted"]):
        # resnet18: stem 1 + 8 blocks x 2 + 3 shortcuts = 20 BatchNorms, all converted, projector ones too
        assert converted == {"sync": 20, "plain": 0, "same_keys": True, "same_eval_output": True}
