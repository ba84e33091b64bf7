"""SimCLR and MoCo v3: two-view augmentation, heads, momentum schedule, short training runs, backends, config."""
import json
import math
import shutil

import pytest
import torch

from sslpt import kernels
from sslpt.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.data.views import ViewAugment, augment_view, batch_pixel_range, two_views
from sslpt.engine.models.heads import mlp_head
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.ema import cosine_momentum as moco_momentum
from sslpt.engine.train import pretrain

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "objective.{name}.proj_hidden=64", "objective.{name}.proj_dim=16",
        "train.batch_size=64", "train.log_every=4", "data.synthetic_size=256", "train.probe=false",
        "train.eval_every=0", "data.name=synthetic"]
OBJECTIVES = ["simclr", "mocov3"]


def tiny_cfg(objective, *extra):
    sets = [s.format(name=objective) for s in TINY + list(extra)]
    if objective == "mocov3":
        sets.append("objective.mocov3.pred_hidden=64")
    return load_config(f"{objective}_digits", sets)


def ctx(epoch=0, step=0, seed=0, steps_per_epoch=4, epochs=20):
    return StepContext(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs, generator=gen(seed))


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_deterministic_distinct_and_in_range(channels):
    imgs = torch.randn(6, channels, 8, 8)
    spec = ViewAugment(crop_scale=(0.3, 1.0), blur_sigma=(0.1, 1.0), solarize_prob=0.5)
    v1, v2 = two_views(imgs, gen(3), spec)
    w1, w2 = two_views(imgs, gen(3), spec)
    assert v1.shape == v2.shape == imgs.shape and v1.dtype == imgs.dtype
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(two_views(imgs, gen(4), spec)[0], v1)
    lo, hi = batch_pixel_range(imgs)
    assert bool(((v1 >= lo - 1e-5) & (v1 <= hi + 1e-5)).all())


def test_view_without_augmentation_is_the_image():
    identity = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_prob=0.0,
                           grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    imgs = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(augment_view(imgs, identity, gen(0)), imgs, atol=1e-5, rtol=0)


def test_grayscale_blur_and_solarize_do_what_they_say():
    imgs = torch.rand(5, 3, 8, 8)
    imgs[:, :, 0, 0], imgs[:, :, 0, 1] = 0.0, 1.0          # every channel spans [0, 1]: pixel values as they are
    still = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                 blur_prob=0.0, solarize_prob=0.0)
    gray = augment_view(imgs, ViewAugment(**{**still, "grayscale_prob": 1.0}), gen(0))
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-6)
    blurred = augment_view(imgs, ViewAugment(**{**still, "blur_prob": 1.0, "blur_sigma": (1.0, 1.0)}), gen(0))
    assert blurred.var() < 0.7 * imgs.var()
    torch.testing.assert_close(blurred.mean(), imgs.mean(), atol=0.03, rtol=0)  # a normalised kernel
    solarized = augment_view(imgs, ViewAugment(**{**still, "solarize_prob": 1.0}), gen(0))
    torch.testing.assert_close(solarized, torch.where(imgs >= 0.5, 1 - imgs, imgs), atol=1e-5, rtol=0)


def test_colour_jitter_changes_values_and_hue_keeps_gray_pixels():
    gray_imgs = torch.rand(4, 1, 8, 8).repeat(1, 3, 1, 1)
    spec = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_prob=1.0, brightness=0.0,
                       contrast=0.0, saturation=0.0, hue=0.5, grayscale_prob=0.0, blur_prob=0.0)
    torch.testing.assert_close(augment_view(gray_imgs, spec, gen(0)), gray_imgs, atol=1e-5, rtol=0)
    strong = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_prob=1.0, brightness=0.8,
                         contrast=0.8, blur_prob=0.0)
    assert not torch.allclose(augment_view(gray_imgs[:, :1], strong, gen(0)), gray_imgs[:, :1], atol=1e-3)


def test_view_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="blur_prob"):
        ViewAugment(blur_prob=1.5)
    with pytest.raises(ValueError, match="hue"):
        ViewAugment(hue=0.6)
    with pytest.raises(ValueError, match="channels"):
        augment_view(torch.randn(2, 2, 8, 8), ViewAugment(), gen(0))


# ----------------------------------------------------------------------------------------------- models
def test_mlp_head_layout():
    head = mlp_head(32, 64, 16, 3)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert all(m.bias is None for m in linears)
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_shapes_and_metrics(objective, pooling):
    obj = build_objective(tiny_cfg(objective, f"objective.{{name}}.pooling={pooling}"))
    imgs = torch.randn(8, 1, 8, 8)
    loss, metrics = obj(imgs, ctx())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert {"loss_contrastive", "positive_cos"} <= metrics.keys()
    assert obj.model.features(imgs).shape == (8, 32)
    assert obj.encoder.features(imgs, pool=pooling).shape == (8, 32)
    assert obj.flops_per_image() > 0
    loss.backward()
    assert all(p.grad is not None for p in obj.trainable.parameters() if p.requires_grad)
    if objective == "mocov3":
        assert obj.trainable.predictor is not None and obj.teacher.model.predictor is None
        assert all(p.grad is None for p in obj.teacher.parameters())


def test_stop_grad_patch_embed_freezes_the_patch_projection():
    obj = build_objective(tiny_cfg("mocov3", "objective.mocov3.stop_grad_patch_embed=true"))
    assert not any(p.requires_grad for p in obj.encoder.patch_embed.parameters())


# ----------------------------------------------------------------------------------------------- momentum
def test_momentum_schedule_values():
    assert moco_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert moco_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert moco_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert moco_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert moco_momentum(30, 100, 0.9, cosine=False) == 0.9


def test_momentum_encoder_update_per_iteration():
    obj = build_objective(tiny_cfg("mocov3", "train.epochs=10"))
    student = obj.model.projector[0].weight
    teacher = obj.teacher.model.projector[0].weight
    before = teacher.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    step = ctx(epoch=2, step=9, epochs=10)   # step 9 = epoch 2, i = 1 of 4
    _, metrics = obj(torch.randn(8, 1, 8, 8), step)
    assert float(metrics["momentum"]) == pytest.approx(moco_momentum(9 / 4, 10, 0.9))   # this step's keys
    obj.after_optimizer_step(step)
    m = moco_momentum(10 / 4, 10, 0.9)   # the t of the next step, as the official code
    torch.testing.assert_close(teacher, m * before + (1 - m) * student.detach())


# ----------------------------------------------------------------------------------------------- training
def read_train_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"]


@pytest.mark.parametrize("objective, min_drop", [("simclr", 0.2), ("mocov3", 0.04)])
def test_short_run_loss_decreases(tmp_path, objective, min_drop):
    """Through the training loop (8 x 4 steps). MoCo v3 learns slower at first: its queries pass through a
    predictor that must be learned before they can align with the momentum keys."""
    epochs = 6 if objective == "simclr" else 8
    cfg = tiny_cfg(objective, f"train.epochs={epochs}", "optim.warmup_epochs=1", "optim.blr=5e-3")
    result = pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)
    train = read_train_records(result.run_dir)
    first, last = train[0]["loss_contrastive"], train[-1]["loss_contrastive"]
    assert last < (1 - min_drop) * first, (first, last)
    assert math.isfinite(result.final_loss)
    if objective == "simclr":
        assert train[-1]["positive_cos"] > train[0]["positive_cos"] + 0.1
    else:   # the momentum climbs its cosine schedule towards 1
        momenta = [r["momentum"] for r in train]
        assert momenta == sorted(momenta) and momenta[0] < momenta[-1] < 1


def test_mocov3_resume_is_exact(tmp_path):
    """The momentum encoder is checkpointed and the momentum recomputed: 1 epoch + resume == 2 straight."""
    cfg = tiny_cfg("mocov3", "train.epochs=2", "train.save_every=1")
    straight = pretrain(cfg, run_dir=tmp_path / "a", show_progress=False)
    pretrain(cfg, run_dir=tmp_path / "b", show_progress=False)
    shutil.rmtree(list_checkpoints(tmp_path / "b")[-1])   # a crash before the last epoch's checkpoint
    resumed = pretrain(cfg, run_dir=tmp_path / "b", resume=True, show_progress=False)
    a, b = (final_state(run.run_dir, cfg) for run in (straight, resumed))
    assert any(k.startswith("teacher.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def final_state(run_dir, cfg):
    objective = build_objective(cfg)
    load_checkpoint(latest_checkpoint(run_dir), objective)
    return objective.state_dict()


# ----------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_triton_and_reference_give_the_same_step(objective):
    obj = build_objective(tiny_cfg(objective))
    imgs = torch.randn(16, 1, 8, 8)
    results = {}
    for backend in ("reference", "triton"):
        obj.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            loss, _ = obj(imgs, ctx(seed=7))
        loss.backward()
        grad = obj.trainable.projector[0].weight.grad.clone()
        results[backend] = (loss.detach(), grad)
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=1e-5, rtol=1e-5)
    # the encoder's attention runs Triton too (the process default reaches it): fp32 online-softmax noise
    torch.testing.assert_close(results["triton"][1], results["reference"][1], atol=3e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_presets_load(objective):
    cfg = load_config(f"{objective}_digits")
    assert cfg.objective.name == objective and cfg.data.crop_scale == (1.0, 1.0)


@pytest.mark.parametrize("override, field", [
    ("objective.mocov3.temperature=0", "objective.mocov3.temperature"),
    ("objective.mocov3.pooling=\"max\"", "objective.mocov3.pooling"),
    ("objective.mocov3.proj_dim=0", "objective.mocov3.proj_dim"),
    ("objective.mocov3.pred_hidden=0", "objective.mocov3.pred_hidden"),
    ("objective.mocov3.momentum=1.5", "objective.mocov3.momentum"),
    ("objective.mocov3.view_crop_scale=[0.0, 1.0]", "objective.mocov3.view_crop_scale"),
    ("objective.mocov3.jitter_prob=2", "objective.mocov3.jitter_prob"),
    ("objective.mocov3.jitter=[0.4, 0.4, 0.2, 0.7]", "objective.mocov3.jitter"),
    ("objective.mocov3.jitter=[0.4, 0.4]", "objective.mocov3.jitter"),
    ("objective.mocov3.blur_prob=[1.0, 1.5]", "objective.mocov3.blur_prob"),
    ("objective.mocov3.blur_sigma=[2.0, 1.0]", "objective.mocov3.blur_sigma"),
    ("objective.mocov3.solarize_prob=[-0.1, 0.2]", "objective.mocov3.solarize_prob"),
    ("objective.mocov3.momentum_cosine=1", "objective.mocov3.momentum_cosine"),
])
def test_bad_config_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("mocov3_digits", [override])
