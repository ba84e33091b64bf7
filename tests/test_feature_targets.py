"""Frozen-teacher feature targets: the teacher facility (run folder, timm-format file, grid mismatch), BEiT's
block-wise mask, and the MaskDistill and MimCo losses against float64 references; both students train a few
steps from a MoCo v3 teacher that the test first trains with this engine."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.models.vit import VisionTransformer
from sslpt.engine.objectives import build_objective
from sslpt.engine.teachers import FrozenTeacher, load_frozen_teacher
from sslpt.engine.train import pretrain

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
FAST = ["train.probe=false", "train.eval_every=0", "data.name=synthetic", "data.synthetic_size=64",
        "train.batch_size=32", "train.epochs=1", "train.log_every=100"]


@pytest.fixture(scope="module")
def moco_teacher(tmp_path_factory):
    """A MoCo v3 run of this engine (two steps): stage 1 of MimCo, the teacher of MaskDistill here."""
    run_dir = tmp_path_factory.mktemp("teacher") / "mocov3"
    pretrain(load_config("mocov3_digits", TINY + FAST + ["objective.mocov3.proj_hidden=32",
                                                         "objective.mocov3.pred_hidden=32"]),
             run_dir=run_dir, show_progress=False)
    return run_dir


def student_cfg(name, teacher, *extra):
    return load_config(f"{name}_digits", ["model.embed_dim=16", "model.depth=1", "model.num_heads=2",
                                          f'objective.{name}.teacher="{teacher}"',
                                          f'objective.{name}.teacher_if_missing="error"', *extra])


# ------------------------------------------------------------------------------------------------ teachers
def test_teacher_from_run_folder_is_frozen_and_matches_the_run(moco_teacher):
    from sslpt.engine.pretrained import load_run

    cfg = load_config("maskdistill_digits", TINY)
    _, objective, _ = load_run(moco_teacher)
    encoder = objective.encoder.eval()
    imgs = torch.randn(3, 1, 8, 8)
    for tokens in ("output", "pre_norm"):
        teacher = load_frozen_teacher(str(moco_teacher), cfg.model, tokens=tokens)
        teacher.train()
        assert not teacher.encoder.training and not any(p.requires_grad for p in teacher.parameters())
        patches, cls = teacher(imgs)
        out = encoder(imgs)
        if tokens == "pre_norm":   # the final LayerNorm's input: undo nothing, recompute it
            x = encoder.embed(imgs)
            x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(3, -1, -1), x], 1)
            for block in encoder.blocks:
                x = block(x)
            out = x
        torch.testing.assert_close(patches, out[:, 1:])
        torch.testing.assert_close(cls, out[:, 0])
        assert not patches.requires_grad


def test_teacher_from_a_timm_format_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vit = VisionTransformer(8, 2, 1, 64, 2, 1).eval()
    # timm's names: patch_embed.proj.*, everything else as ours; no metadata: the shape is read off the tensors
    # (heads of 64 channels, timm's convention)
    state = {("patch_embed.proj." + k.split(".")[-1] if k.startswith("patch_embed.") else k): v.contiguous()
             for k, v in vit.state_dict().items()}
    save_file(state, str(tmp_path / "teacher.safetensors"))
    cfg = load_config("maskdistill_digits", TINY)
    teacher = load_frozen_teacher(str(tmp_path / "teacher.safetensors"), cfg.model, tokens="output")
    imgs = torch.randn(2, 1, 8, 8)
    patches, cls = teacher(imgs)
    torch.testing.assert_close(patches, vit(imgs)[:, 1:])
    torch.testing.assert_close(cls, vit(imgs)[:, 0])


def test_grid_mismatch_errors_or_interpolates():
    coarse = VisionTransformer(8, 4, 1, 16, 1, 2).eval()   # a 2x2 grid for a 4x4 student
    with pytest.raises(ValueError, match=r"2x2 patch grid, the student 4x4: set grid_mismatch"):
        FrozenTeacher(coarse, student_grid=4)
    teacher = FrozenTeacher(coarse, student_grid=4, tokens="output", grid_mismatch="interpolate")
    imgs = torch.randn(2, 1, 8, 8)
    patches, _ = teacher(imgs)
    fmap = coarse(imgs)[:, 1:].transpose(1, 2).reshape(2, 16, 2, 2)
    expected = F.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches, expected)
    with pytest.raises(FileNotFoundError, match="no teacher at 'nowhere'"):
        load_frozen_teacher("nowhere", load_config("maskdistill_digits").model)


def test_teacher_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.maskdistill\.teacher must name the frozen teacher"):
        load_config("maskdistill_digits", ['objective.maskdistill.teacher=""'])
    cfg = student_cfg("maskdistill", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no teacher at"):
        build_objective(cfg)
    with pytest.warns(UserWarning, match="RANDOM teacher"):
        build_objective(load_config("maskdistill_digits", [f'objective.maskdistill.teacher="{tmp_path / "x"}"']))


# ------------------------------------------------------------------------------------------------ mask
@pytest.mark.parametrize("grid, num_masked, min_block", [(14, 78, 16), (14, 75, 16), (4, 6, 2), (5, 1, 1)])
def test_block_wise_mask_exact_count_and_reproducible(grid, num_masked, min_block):
    draw = lambda: kernels.block_wise_masking(16, grid, num_masked, min_block,  # noqa: E731
                                              generator=torch.Generator().manual_seed(5))
    a, b = draw(), draw()
    assert (a.mask.sum(1) == num_masked).all() and torch.equal(a.mask, b.mask)
    assert (~a.mask).gather(1, a.ids_keep).all()
    if grid == 14:   # blocks, not scattered cells: most masked cells have a masked 4-neighbour
        m = a.mask.reshape(16, grid, grid)
        neighbour = torch.zeros_like(m)
        neighbour[:, 1:] |= m[:, :-1]
        neighbour[:, :-1] |= m[:, 1:]
        neighbour[:, :, 1:] |= m[:, :, :-1]
        neighbour[:, :, :-1] |= m[:, :, 1:]
        assert (m & neighbour).sum() > 0.9 * m.sum()
    with pytest.raises(ValueError, match="num_masked must be an integer in"):
        kernels.block_wise_masking(2, grid, grid * grid)


# ------------------------------------------------------------------------------------------------ losses
def standardized64(t):
    t = t.double()
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=True, keepdim=True) + 1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_maskdistill_loss_equals_float64_reference(moco_teacher, beta):
    objective = build_objective(student_cfg("maskdistill", moco_teacher, f"objective.maskdistill.beta={beta}"))
    imgs = torch.randn(4, 1, 8, 8)
    loss, _, _ = objective.losses(imgs, torch.Generator().manual_seed(2))
    masking = objective.masking(4, torch.Generator().manual_seed(2), imgs.device)
    patches, _ = objective.teacher(imgs)
    pred = objective.model.head(objective.model(imgs, masking.mask)[:, 1:]).double()
    target = standardized64(patches)
    terms = []
    for b in range(4):
        for i in range(16):
            if masking.mask[b, i]:
                u = (pred[b, i] - target[b, i]).abs()
                terms.append(torch.where(u < beta, 0.5 * u ** 2 / beta, u - 0.5 * beta))
    assert len(terms) == 4 * 6
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def info_nce64(q, keys, positive, tau):
    logits = F.normalize(q.double(), dim=-1) @ F.normalize(keys.double(), dim=-1).T / tau
    return torch.logsumexp(logits, 0) - logits[positive]


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_mimco_loss_equals_float64_reference(moco_teacher, negatives):
    objective = build_objective(student_cfg("mimco", moco_teacher, f'objective.mimco.patch_negatives="{negatives}"',
                                            "objective.mimco.image_weight=0.5"))
    imgs = torch.randn(3, 1, 8, 8)
    loss, patch, image, _ = objective.losses(imgs, torch.Generator().manual_seed(4))
    masking = objective.masking(3, torch.Generator().manual_seed(4), imgs.device)
    t_patches, t_cls = objective.teacher(imgs)
    tokens = objective.model(imgs, masking.mask)
    q = objective.model.patch_head(tokens[:, 1:])
    terms = []
    for b in range(3):
        for i in range(16):
            if masking.mask[b, i]:   # the positive is the teacher's token at the same position
                if negatives == "image":
                    terms.append(info_nce64(q[b, i], t_patches[b], i, 0.2))
                else:
                    terms.append(info_nce64(q[b, i], t_patches.reshape(48, -1), b * 16 + i, 0.2))
    patch_ref = torch.stack(terms).mean()
    c = objective.model.image_head(tokens[:, 0])
    image_ref = torch.stack([info_nce64(c[b], t_cls, b, 0.2) for b in range(3)]).mean()
    torch.testing.assert_close(patch.double(), patch_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image.double(), image_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), patch_ref + 0.5 * image_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ["maskdistill", "mimco"])
def test_student_trains_from_the_moco_teacher(moco_teacher, tmp_path, name):
    from sslpt.engine.checkpoint import latest_checkpoint, load_checkpoint

    cfg = student_cfg(name, moco_teacher, *FAST, "train.epochs=2")
    result = pretrain(cfg, run_dir=tmp_path / name, show_progress=False)
    assert math.isfinite(result.final_loss)
    trained = build_objective(cfg)
    fresh_teacher = {k: v.clone() for k, v in trained.teacher.state_dict().items()}
    load_checkpoint(latest_checkpoint(result.run_dir), trained)
    # the student moved, the teacher did not
    assert all(torch.equal(fresh_teacher[k], v) for k, v in trained.teacher.state_dict().items())
    untrained = build_objective(cfg)
    assert not torch.equal(untrained.model.encoder.blocks[0].mlp.fc1.weight,
                           trained.model.encoder.blocks[0].mlp.fc1.weight)
