"""SCFS: the feature search against a loop over crops and locations, the loss and gradients of one step against
a float64 re-implementation of the official loss (explicit loops), the per-stage centres, the teacher, the
settings, and the centres all-reduced over 2 gloo ranks."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.models.scfs_heads import ShallowHead
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.objectives.scfs import search_targets
from test_dino import dino_loss_loop  # DINO's DINOLoss written as the official loop

# img 12, small stem: stage maps 12 / 6 / 3 / 2 on the global crops and 6 / 3 / 2 / 1 on the 6x6 local crops
TINY = ["model.img_size=12", "objective.scfs.out_dim=37", "objective.scfs.head_hidden=24",
        "objective.scfs.bottleneck_dim=16", "objective.scfs.shallow_bottleneck=8", "objective.scfs.shallow_hidden=24",
        "objective.scfs.shallow_dim=12", "objective.scfs.local_crops=2", "objective.scfs.local_size=6",
        "objective.scfs.warmup_teacher_temp_epochs=3", "objective.scfs.warmup_teacher_temp=0.04",
        "objective.scfs.teacher_temp=0.07", "train.batch_size=8", "data.name=synthetic",
        "data.synthetic_size=16", "train.probe=false", "train.eval_every=0", "train.log_every=1"]
LAYERS = ("layer2", "layer3", "layer4")


def tiny_cfg(*extra):
    return load_config("scfs_digits", TINY + list(extra))


def ctx(epoch=1, step=4, seed=0):
    return StepContext(epoch=epoch, step=step, steps_per_epoch=4, epochs=20,
                       generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the official loss, literally
def search_loop(local_maps, teacher_maps, crops):
    """For each local crop v of image b: the cosine of its pooled student feature with each location of the
    teacher's global-view-1 map of image b, times that map (one location at a time)."""
    batch = teacher_maps.shape[0] // 2
    out = []
    for v in range(crops):
        for b in range(batch):
            q = local_maps[v * batch + b].mean(dim=(1, 2))
            q = q / q.norm()
            fmap = teacher_maps[b]
            weights = torch.zeros(fmap.shape[1:], dtype=fmap.dtype)
            for y in range(fmap.shape[1]):
                for x in range(fmap.shape[2]):
                    weights[y, x] = q @ fmap[:, y, x] / fmap[:, y, x].norm()
            out.append(weights * fmap)
    return torch.stack(out)




def shallow_loss_loop(student_g, teacher_g, student_l, teacher_l, center, tau_s, tau_t, crops):
    """The official per-stage loss: (swapped global CE with the centre, mean over crops of the local CE)."""
    s = (student_g / tau_s).chunk(2)
    t = F.softmax((teacher_g - center) / tau_t, dim=-1).chunk(2)
    loss_global = 0.5 * (torch.sum(-t[0] * F.log_softmax(s[1], -1), -1).mean()
                         + torch.sum(-t[1] * F.log_softmax(s[0], -1), -1).mean())
    s_local = (student_l / tau_s).chunk(crops)
    t_local = F.softmax(teacher_l / tau_t, dim=-1).chunk(crops)
    loss_local = sum(torch.sum(-t_local[i] * F.log_softmax(s_local[i], -1), -1).mean() for i in range(crops)) / crops
    return loss_global, loss_local


def reference_step(obj, global_views, local_views, tau_t, crops):
    """(total, per-stage losses, per-stage teacher global outputs) in float64 from a copy of the objective."""
    ref = copy.deepcopy(obj).double()
    student, teacher = ref.model, ref.teacher.model
    teacher.train()
    g, loc = global_views.double(), local_views.double()
    sg, sl = student.encoder.feature_maps(g, LAYERS), student.encoder.feature_maps(loc, LAYERS)
    pooled = torch.cat([sg["layer4"].mean(dim=(2, 3)), sl["layer4"].mean(dim=(2, 3))])
    with torch.no_grad():
        tg = teacher.encoder.feature_maps(g, LAYERS)
        teacher_logits = teacher.head(tg["layer4"].mean(dim=(2, 3)))
    total = dino_loss_loop(student.head(pooled), teacher_logits, ref.center, 0.1, tau_t, 2 + crops)
    layers, centres = {}, []
    for i, layer in enumerate(LAYERS):
        with torch.no_grad():
            t_g = teacher.shallow[layer](tg[layer])
            t_l = teacher.shallow[layer](search_loop(sl[layer].detach(), tg[layer], crops))
        head = student.shallow[layer]
        lg, ll = shallow_loss_loop(head(sg[layer]), t_g, head(sl[layer]), t_l, ref.shallow_centers[i], 0.1, tau_t,
                                   crops)
        layers[layer] = 0.5 * (lg + ll)
        total = total + layers[layer]
        centres.append(t_g.mean(0))
    total.backward()
    grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    return total, layers, torch.stack(centres), grads


# ----------------------------------------------------------------------------------------------- tests
def test_search_is_the_cosine_weighted_teacher_map_per_crop_and_location():
    torch.manual_seed(1)
    batch, crops, channels = 3, 4, 5
    local = torch.randn(crops * batch, channels, 2, 3, dtype=torch.float64)
    teacher = torch.randn(2 * batch, channels, 3, 4, dtype=torch.float64)   # a non-square map
    got = search_targets(local, teacher[:batch])
    torch.testing.assert_close(got, search_loop(local, teacher, crops), rtol=1e-12, atol=1e-12)
    weights = got[:, 0] / teacher[:batch, 0].repeat(crops, 1, 1)
    assert weights.abs().max() <= 1 + 1e-12   # a raw cosine, no softmax


def test_step_loss_and_gradients_equal_the_official_loss_in_float64():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    obj = build_objective(cfg).train()
    with torch.no_grad():   # a teacher that differs from its student, centres as after some steps
        for p in obj.teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        obj.center.normal_()
        obj.shallow_centers.normal_(std=0.3)
    old_centers = obj.shallow_centers.clone()
    imgs = torch.randn(4, 1, 12, 12)
    obj.on_epoch_start(ctx())
    glob, local = obj.views(imgs, ctx().generator)
    before = copy.deepcopy(obj)
    loss, metrics = obj(imgs, ctx())
    loss.backward()
    assert obj.temperature == pytest.approx(0.055)
    want, layers, centres, grads = reference_step(before, glob, local, 0.055, crops=2)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-5, atol=2e-5)
    for layer in LAYERS:
        torch.testing.assert_close(metrics[f"loss_{layer}"].double(), layers[layer].detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(obj.shallow_centers.double(), 0.9 * old_centers.double() + 0.1 * centres,
                               rtol=1e-5, atol=1e-5)
    params = dict(obj.model.named_parameters())
    assert set(grads) == {n for n, p in params.items() if p.grad is not None}
    for name, grad in grads.items():   # biases before a BatchNorm have ~0 gradient: float32 noise of ~1e-7
        atol = max(1e-4 * grad.abs().max().item(), 2e-6)
        torch.testing.assert_close(params[name].grad.double(), grad, rtol=1e-3, atol=atol,
                                   msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in obj.teacher.parameters())


def test_shallow_heads_shape_teacher_follows_and_last_layer_frozen_in_epoch_one():
    obj = build_objective(tiny_cfg())
    assert set(obj.model.shallow) == set(LAYERS) and set(obj.teacher.model.shallow) == set(LAYERS)
    width = obj.model.encoder.width   # model.resnet_width: layer3 is 4 x width wide
    assert obj.model.shallow["layer3"].conv1.in_channels == 4 * width and obj.shallow_centers.shape == (3, 12)
    wide = build_objective(tiny_cfg("model.resnet_width=64"))
    assert [wide.model.shallow[n].conv1.in_channels for n in LAYERS] == [128, 256, 512]
    head = ShallowHead(6, 4, 10, 5).eval()
    out = head(torch.randn(3, 6, 2, 5))
    assert out.shape == (3, 5) and torch.allclose(out.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"feature_map must be \[B, 6, h, w\]"):
        head(torch.randn(3, 5, 2, 2))
    loss, _ = obj(torch.randn(4, 1, 12, 12), ctx(epoch=0, step=0))
    loss.backward()
    obj.before_optimizer_step(ctx(epoch=0, step=0))
    assert obj.model.head.last_layer.weight_v.grad is None
    assert obj.model.shallow["layer2"].conv2.weight.grad is not None
    with torch.no_grad():
        obj.model.shallow["layer2"].mlp[0].weight.add_(1.0)
    teacher_w = obj.teacher.model.shallow["layer2"].mlp[0].weight
    start = teacher_w.clone()
    obj.after_optimizer_step(ctx(epoch=0, step=0))
    assert not torch.equal(teacher_w, start)   # the EMA reaches the shallow heads
    out = obj.evaluate(torch.randn(8, 1, 12, 12), torch.Generator())
    assert 0 <= out.metrics["teacher_entropy_layer3"] <= math.log(12) + 1e-4
    assert obj.flops_per_image() > 0


@pytest.mark.parametrize("override,field", [
    (("model.arch=vit_tiny", "model.patch_size=2"), "model.arch"),
    ("objective.scfs.shallow_layers=[]", "shallow_layers"),
    ('objective.scfs.shallow_layers=["layer2", "layer2"]', "shallow_layers"),
    ('objective.scfs.shallow_layers=["layer1"]', "shallow_layers"), ("objective.scfs.shallow_dim=0", "shallow_dim"),
    ("objective.scfs.shallow_hidden=0", "shallow_hidden"), ("objective.scfs.local_crops=0", "local_crops"),
    ("objective.scfs.local_size=16", "local_size"),
])
def test_bad_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        tiny_cfg(*((override,) if isinstance(override, str) else override))


def test_official_preset_is_the_papers_recipe():
    s = load_config("scfs_resnet50_200ep")
    o = s.objective
    assert s.model.arch == "resnet50" and o.shallow_layers == LAYERS and o.out_dim == 65536
    assert (o.warmup_teacher_temp, o.teacher_temp, o.warmup_teacher_temp_epochs) == (0.04, 0.07, 50)
    assert (o.view_crop_scale, o.local_crop_scale, o.local_crops) == ((0.25, 1.0), (0.05, 0.25), 8)
    assert (s.optim.name, s.optim.blr, s.optim.min_lr, s.optim.weight_decay, s.optim.clip_grad) == \
        ("sgd", 0.1, 0.0048, 1e-4, 3.0)
    assert (s.train.epochs, s.train.batch_size, o.momentum_teacher) == (200, 32, 0.996)


def _ddp_worker(rank: int, port: int, base: str) -> None:
    import os

    import torch.distributed as dist

    from sslpt.engine.train import Trainer
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = tiny_cfg("train.parallel=ddp", "train.epochs=1", f"train.out_dir={base}", "train.run_name=ddp",
                       "train.batch_size=4")
        trainer = Trainer(cfg, show_progress=False)
        trainer.train()
        torch.save(trainer.objective.shallow_centers, f"{base}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_shallow_centres(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0, r1) and r0.abs().sum() > 0
