"""DINO: multi-crop views, the ViT at another resolution, schedules, the loss of a step against DINO's own loop,
the centre, the frozen last layer, optimizers, and short runs on a ViT and a ResNet (1 process and 2 gloo ranks)."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.data.views import ViewAugment, multi_crop
from sslpt.engine.models.dino_head import DINOHead
from sslpt.engine.models.vit import VisionTransformer
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.objectives.dino import teacher_temperature
from sslpt.engine.optim import build_optimizer, param_groups, set_weight_decay, weight_decay_at
from sslpt.engine.train import pretrain
from testkit import spawn_ranks

TINY = ["model.arch=vit_tiny", "model.patch_size=2", "objective.dino.teacher_temp=0.07", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "objective.dino.out_dim=37", "objective.dino.head_hidden=48",
        "objective.dino.bottleneck_dim=24", "train.batch_size=16", "train.log_every=2", "data.synthetic_size=64",
        "train.probe=false", "train.eval_every=0", "data.name=synthetic", "objective.dino.local_crops=3",
        "objective.dino.warmup_teacher_temp=0.04", 'objective.dino.pooling="cls"']


def tiny_cfg(*extra):
    return load_config("dino_digits", TINY + list(extra))


def ctx(epoch=0, step=0, seed=0, steps_per_epoch=4, epochs=20):
    return StepContext(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs,
                       generator=torch.Generator().manual_seed(seed))


def dino_loss_loop(student_logits, teacher_logits, center, tau_s, tau_t, crops):
    """DINO's DINOLoss.forward, written as the official loop (float64)."""
    student = (student_logits / tau_s).chunk(crops)
    teacher = F.softmax((teacher_logits - center) / tau_t, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


# ----------------------------------------------------------------------------------------------- views
def test_multi_crop_sizes_order_and_determinism():
    imgs = torch.randn(5, 3, 16, 16)
    spec = ViewAugment(crop_scale=(0.4, 1.0))
    local = ViewAugment(crop_scale=(0.05, 0.4), blur_prob=0.5)
    g1, l1 = multi_crop(imgs, torch.Generator().manual_seed(3), (spec, spec), 16, local, 4, 8)
    g2, l2 = multi_crop(imgs, torch.Generator().manual_seed(3), (spec, spec), 16, local, 4, 8)
    assert [v.shape for v in g1] == [(5, 3, 16, 16)] * 2 and [v.shape for v in l1] == [(5, 3, 8, 8)] * 4
    for a, b in zip(g1 + l1, g2 + l2):
        assert torch.equal(a, b)
    assert not torch.equal(l1[0], l1[1])   # each local view draws its own crops
    none, no_local = multi_crop(imgs, None, (spec,), 16)
    assert len(none) == 1 and no_local == []
    with pytest.raises(ValueError, match="local_view and local_size"):
        multi_crop(imgs, None, (spec,), 16, None, 2, 8)


# ------------------------------------------------------------------------------------ ViT at other sizes
def test_vit_takes_other_resolutions_with_resampled_positions():
    vit = VisionTransformer(16, 4, 3, 32, 1, 2)
    assert torch.equal(vit.patch_pos_embed(16, 16), vit.pos_embed[:, 1:])
    pos = vit.patch_pos_embed(8, 12)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pos, expected)
    assert vit(torch.randn(2, 3, 8, 12)).shape == (2, 1 + 6, 32)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        vit(torch.randn(2, 3, 10, 10))


# ----------------------------------------------------------------------------------------------- schedules
def test_teacher_temperature_is_linspace_per_epoch_then_flat():
    s = tiny_cfg("objective.dino.warmup_teacher_temp_epochs=4").objective
    expected = [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    assert [round(teacher_temperature(e, s), 6) for e in range(6)] == expected
    s0 = tiny_cfg("objective.dino.warmup_teacher_temp_epochs=0").objective
    assert teacher_temperature(0, s0) == 0.07


def test_weight_decay_cosine_and_group_scales():
    assert weight_decay_at(0, 0.04, 0.4, 10) == pytest.approx(0.04)
    assert weight_decay_at(5, 0.04, 0.4, 10) == pytest.approx(0.22)
    assert weight_decay_at(10, 0.04, 0.4, 10) == pytest.approx(0.4)
    assert weight_decay_at(3, 0.05, None, 10) == 0.05
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(param_groups(model, 0.1))
    set_weight_decay(opt, 0.3)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.3]   # biases never decay


def test_sgd_optimizer_and_its_config_errors():
    cfg = tiny_cfg("optim.name=sgd", "optim.sgd_momentum=0.8")
    opt = build_optimizer(torch.nn.Linear(3, 2), cfg.optim, 0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8
    with pytest.raises(ConfigError, match="optim.sgd_momentum"):
        tiny_cfg("optim.sgd_momentum=1.5")
    with pytest.raises(ConfigError, match="optim.name"):
        tiny_cfg("optim.name=lamb")


@pytest.mark.parametrize("override,field", [
    ("objective.dino.student_temp=0", "student_temp"), ("objective.dino.local_size=3", "local_size"),
    ("objective.dino.local_size=64", "local_size"), ("objective.dino.center_momentum=1.5", "center_momentum"),
    ("objective.dino.local_crop_scale=[0.5, 0.2]", "local_crop_scale"), ("objective.dino.out_dim=0", "out_dim"),
    ("optim.weight_decay_end=-1", "weight_decay_end"), ("data.hflip=0.5", "data.hflip"),
])
def test_bad_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        tiny_cfg(override)


# ----------------------------------------------------------------------------------------------- the step
def test_step_loss_equals_dinos_loop_and_the_centre_follows_the_teacher():
    cfg = tiny_cfg("objective.dino.warmup_teacher_temp_epochs=3")
    torch.manual_seed(0)
    obj = build_objective(cfg)
    obj.center.normal_()   # a non-zero centre, as after some steps
    old_center = obj.center.clone()
    imgs = torch.randn(6, 1, 8, 8)
    obj.on_epoch_start(ctx(epoch=1))
    loss, metrics = obj(imgs, ctx(epoch=1, step=4))
    glob, local = obj.views(imgs, ctx(epoch=1, step=4).generator)
    with torch.no_grad():
        net, teacher = obj.model.double(), obj.teacher.model.double()
        from sslpt.engine.models.backbones import global_feature
        # the head sees every view in one batch (its BatchNorms too), as DINO's multi-crop wrapper runs it
        student_logits = net.head(torch.cat([global_feature(net.encoder, v.double(), "cls") for v in (glob, local)]))
        teacher_logits = teacher.head(global_feature(teacher.encoder, glob.double(), "cls"))
    expected = dino_loss_loop(student_logits, teacher_logits, old_center.double(), 0.1, 0.055, 2 + 3)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
    assert float(metrics["teacher_temp"]) == pytest.approx(0.055)
    torch.testing.assert_close(obj.center.double(), 0.9 * old_center.double() + 0.1 * teacher_logits.mean(0),
                               rtol=1e-5, atol=1e-5)


def test_last_layer_is_frozen_in_the_first_epoch_only():
    cfg = tiny_cfg("objective.dino.norm_last_layer=false")
    obj = build_objective(cfg)
    last = obj.model.head.last_layer
    for epoch, frozen in ((0, True), (1, False)):
        obj.zero_grad(set_to_none=True)
        loss, _ = obj(torch.randn(4, 1, 8, 8), ctx(epoch=epoch, step=epoch * 4))
        loss.backward()
        obj.before_optimizer_step(ctx(epoch=epoch, step=epoch * 4))
        assert (last.weight_v.grad is None) == frozen and (last.weight_g.grad is None) == frozen
        assert obj.model.head.mlp[0].weight.grad is not None


def test_norm_last_layer_freezes_the_prototype_scales_and_teacher_has_no_drop_path():
    obj = build_objective(tiny_cfg("objective.dino.drop_path=0.2"))
    assert not obj.model.head.last_layer.weight_g.requires_grad
    rates = [b.drop_path for b in obj.model.encoder.blocks]
    assert rates == [0.0, 0.2] and all(b.drop_path == 0 for b in obj.teacher.model.encoder.blocks)
    head = DINOHead(8, 5, 16, 4, num_layers=1)
    assert head(torch.randn(3, 8)).shape == (3, 5) and head.bottleneck(torch.randn(3, 8)).norm(dim=1).allclose(
        torch.ones(3))


def test_evaluate_reports_collapse_monitors():
    obj = build_objective(tiny_cfg())
    out = obj.evaluate(torch.randn(8, 1, 8, 8), torch.Generator())
    k = out.metrics["log_prototypes"]
    assert k == pytest.approx(math.log(37))
    assert 0 <= out.metrics["teacher_entropy"] <= out.metrics["teacher_batch_entropy"] + 1e-5 <= k + 1e-4


# ----------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("arch", ["vit", "resnet18"])
def test_short_run_trains_on_a_vit_and_a_resnet(tmp_path, arch):
    extra = [f"train.out_dir={tmp_path}", "train.epochs=2", "train.run_name=r"]
    if arch != "vit":
        extra += ["model.arch=resnet18", "model.resnet_stem=small", "objective.dino.head_hidden=32"]
    result = pretrain(tiny_cfg(*extra))
    assert math.isfinite(result.final_loss)
    records = [line for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert records and "teacher_temp" in records[-1]


def _ddp_worker(rank: int, port: int, base: str) -> None:
    import os

    import torch.distributed as dist

    from sslpt.engine.train import Trainer
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = tiny_cfg("train.parallel=ddp", "train.epochs=2", f"train.out_dir={base}", "train.run_name=ddp",
                       "objective.dino.norm_last_layer=false")
        trainer = Trainer(cfg, show_progress=False)
        head = trainer.objective.model.head.last_layer
        start = head.weight_v.detach().clone()
        trainer.train()
        torch.save({"center": trainer.objective.center, "moved": not torch.equal(start, head.weight_v.detach())},
                   f"{base}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_ranks_shares_the_centre_and_survives_the_frozen_epoch(tmp_path):
    """Epoch 1 freezes the last layer (DDP computes its gradient, which is then dropped); the centre follows the
    all-reduced teacher mean, so both ranks hold the same one."""
    spawn_ranks(_ddp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["center"], r1["center"]) and r0["center"].abs().sum() > 0
    assert r0["moved"] and r1["moved"]   # trained in epoch 2
