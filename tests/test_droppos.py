"""DropPos: the loss against a brute-force float64 reference (explicit loops over tokens, an explicit smoothing
matrix), the smoothing matrix on the true grid and the official one, the random draws, per-parameter gradient
clipping, the config errors, evaluation, and the generic objective checks."""
import math

import pytest
import torch

import test_objective_units as units
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.objectives.droppos import (cls_similarity_weights, sigma_at, smoothing_matrix,
                                             soft_target_cross_entropy, within_one_cell)
from sslpt.engine.optim import clip_grad_per_param_
from sslpt.engine.train import train_step_optimizer

F64 = torch.float64
SMALL = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
         "model.decoder_heads=2", "model.in_chans=3"]


def build(*overrides):
    cfg = load_config("droppos_digits", SMALL + list(overrides))
    torch.manual_seed(0)
    return cfg, build_objective(cfg)


def ctx(epoch=0, epochs=10, seed=0):
    return StepContext(epoch=epoch, step=epoch * 4, steps_per_epoch=4, epochs=epochs,
                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- smoothing

def explicit_smoothing(width: int, size: int, sigma: float, normalise: str = "row") -> torch.Tensor:
    """Position i sits at (i // width, i % width) on a width-wide grid of width**2 cells; the first ``size`` rows
    and columns are returned, after dividing each row by its sum ("row") or by the sum of the row that has
    the column's index ("official": the broadcast of the official code, i.e. columns sum to 1)."""
    n = width * width
    w = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            d2 = (i // width - j // width) ** 2 + (i % width - j % width) ** 2
            w[i, j] = math.exp(-d2 / sigma ** 2)
    sums = [float(w[i].sum()) for i in range(n)]
    for i in range(n):
        for j in range(n):
            w[i, j] = w[i, j] / (sums[i] if normalise == "row" else sums[j])
    return w[:size, :size]


@pytest.mark.parametrize("sigma", [1.0, 0.5, 2.0])
def test_smoothing_on_the_true_grid_is_row_normalised(sigma):
    m = smoothing_matrix(14, sigma)
    assert m.shape == (196, 196)
    torch.testing.assert_close(m.sum(1), torch.ones(196, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, explicit_smoothing(14, 196, sigma), rtol=1e-12, atol=1e-15)
    # neighbours one cell apart weigh exp(-1 / sigma^2) of the centre: no factor 2
    assert math.isclose(m[15, 16] / m[15, 15], math.exp(-1 / sigma ** 2), rel_tol=1e-12)
    assert torch.equal(smoothing_matrix(14, 0.0), torch.eye(196, dtype=F64))


def test_official_flag_reproduces_the_16_wide_column_normalised_matrix():
    ours, official = smoothing_matrix(14, 1.0), smoothing_matrix(14, 1.0, official=True, width=16)
    torch.testing.assert_close(official, explicit_smoothing(16, 196, 1.0, "official"), rtol=1e-12, atol=1e-15)
    # the differences: rows of the official block do not sum to 1 ...
    sums = official.sum(1)
    assert sums.min() < 0.7 and sums.max() > 1.1
    # ... and the grid wraps at 16: the last cell of row 0 (0, 13) and the first of row 1 (1, 0) are
    # neighbours there (cells 13 and 14 of a 16-wide row), while on the true grid they are 13 columns apart
    assert official[13, 14] > 0.1 and ours[13, 14] < 1e-70
    assert (ours - official).abs().max() > 0.1
    # as sigma -> 0 both become the identity
    assert torch.equal(smoothing_matrix(14, 0.0, official=True, width=16), torch.eye(196, dtype=F64))


def test_sigma_decays_linearly_per_epoch():
    assert [sigma_at(1.0, True, e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert sigma_at(1.0, False, 3, 4) == 1.0


# ---------------------------------------------------------------- the loss against a brute-force reference

def brute_force_loss(objective, imgs, step_ctx):
    """Everything the objective computes, token by token: the same random draws (the objective's first use of
    the generator), explicit patch embedding and position choice per token, the encoder per sample, explicit
    cosine similarities and softmax, an explicit smoothing matrix and cross-entropy."""
    s, net = objective.settings, objective.net
    enc = net.encoder
    draw = objective.draw(imgs, torch.Generator().manual_seed(step_ctx.generator.initial_seed()))
    p, grid = enc.patch_size, objective.grid
    size = grid * grid
    weight = enc.patch_embed.weight.reshape(enc.embed_dim, -1)
    sigma = sigma_at(s.sigma, s.sigma_decay, step_ctx.epoch, step_ctx.epochs)
    targets = torch.eye(size, dtype=F64) if sigma == 0 else explicit_smoothing(grid, size, sigma)
    num = den = 0.0
    for b in range(imgs.shape[0]):
        ids = draw.masking.ids_keep[b].tolist()
        dropped = draw.pos_masking.mask[b].tolist()
        tokens = []
        for k, pos in enumerate(ids):
            r, c = divmod(pos, grid)
            patch = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
            t = weight @ patch + enc.patch_embed.bias
            tokens.append(t + (net.mask_pos_token.reshape(-1) if dropped[k] else enc.pos_embed[0, 1 + pos]))
        latent = enc.encode_tokens(torch.stack(tokens)[None])
        logits = net.decoder(net.decoder_embed(latent))[0]
        if s.attn_guide:   # the official recipe: softmax over every patch, gathered, renormalised
            full = enc(imgs[b:b + 1])[0]
            cls = full[0]
            sims = [float(cls @ full[1 + j] / (cls.norm() * full[1 + j].norm())) for j in range(size)]
            exps = [math.exp(v / s.attn_temperature) for v in sims]
            probs = [e / sum(exps) for e in exps]
            w = [probs[pos] for pos in ids]
            w = [v / sum(w) for v in w]
        else:
            w = [1.0] * len(ids)
        for k, pos in enumerate(ids):
            if not dropped[k]:
                continue
            z = logits[k]
            log_z = math.log(sum(math.exp(float(v)) for v in z))
            ce = -sum(float(targets[pos, c]) * (float(z[c]) - log_z) for c in range(size))
            num += w[k] * ce
            den += w[k]
    return num / den


@pytest.mark.parametrize("sigma, epoch", [(1.0, 3), (0.0, 0)])
@pytest.mark.parametrize("attn_guide", [False, True])
def test_loss_equals_brute_force_reference_in_float64(sigma, epoch, attn_guide):
    _, objective = build(f"objective.droppos.sigma={sigma}", f"objective.droppos.attn_guide={str(attn_guide).lower()}",
                         'objective.droppos.attn_source="full"')
    objective = objective.double()
    imgs = torch.randn(3, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    step = ctx(epoch=epoch, epochs=8, seed=5)
    loss, metrics = objective(imgs, step)
    assert loss.dtype == F64
    with torch.no_grad():
        expected = brute_force_loss(objective, imgs, ctx(epoch=epoch, epochs=8, seed=5))
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-10), (float(loss.detach()), expected)
    assert 0.0 <= float(metrics["pos_acc"]) <= 1.0


def test_soft_target_cross_entropy_matches_hard_cross_entropy_at_sigma_zero():
    logits = torch.randn(2, 5, 16, dtype=F64)
    positions = torch.randint(16, (2, 5))
    weight = torch.tensor([[1.0, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=F64)
    got = soft_target_cross_entropy(logits, positions, weight, smoothing_matrix(4, 0.0))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), positions.reshape(-1), reduction="none")
    torch.testing.assert_close(got, (ce * weight.reshape(-1)).sum() / weight.sum())


# ---------------------------------------------------------------- draws, options

def test_positions_of_visible_tokens():
    _, objective = build()
    imgs = torch.randn(4, 3, 8, 8)
    draw = objective.draw(imgs, torch.Generator().manual_seed(0))
    ids, dropped = draw.masking.ids_keep, draw.pos_masking.mask
    assert ids.shape == (4, 8) and dropped.shape == (4, 8) and (dropped.sum(1) == 6).all()
    table = objective.net.encoder.pos_embed[0, 1:]
    token = objective.net.mask_pos_token.reshape(-1)
    with torch.no_grad():
        pos = objective.net.positions_of_visible(draw, objective.net.mask_pos_token)
    for b in range(4):
        for k in range(8):
            torch.testing.assert_close(pos[b, k], token if dropped[b, k] else table[ids[b, k]])


def test_wrong_pos_shuffles_the_dropped_positions_among_themselves():
    _, objective = build('objective.droppos.mask_token_type="wrong_pos"')
    draw = objective.draw(torch.randn(6, 3, 8, 8), torch.Generator().manual_seed(0))
    ids, dropped = draw.masking.ids_keep, draw.pos_masking.mask
    given = torch.gather(ids, 1, draw.pos_source)
    assert torch.equal(given[~dropped], ids[~dropped])     # kept positions stay
    for b in range(6):
        assert sorted(given[b][dropped[b]].tolist()) == sorted(ids[b][dropped[b]].tolist())
    moved = (given != ids) & dropped
    assert moved.any()
    loss, _ = objective(torch.randn(6, 3, 8, 8), ctx())
    loss.backward()


def test_zeros_token_and_visible_attention_source():
    _, objective = build('objective.droppos.mask_token_type="zeros"', "objective.droppos.attn_guide=true",
                         'objective.droppos.attn_source="visible"')
    loss, _ = objective(torch.randn(4, 3, 8, 8), ctx())
    loss.backward()
    assert objective.net.mask_pos_token.grad is None     # zeros: the learnable token is unused
    tokens = torch.randn(2, 5, 8)
    w = cls_similarity_weights(tokens, None, 0.1)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    # restricting the full softmax to a subset and renormalising = the softmax over the subset
    full = cls_similarity_weights(tokens, None, 0.1)
    ids = torch.tensor([[0, 2], [3, 1]])
    sub = torch.gather(full, 1, ids)
    torch.testing.assert_close(cls_similarity_weights(tokens, ids, 0.1), sub / sub.sum(1, keepdim=True))


def test_multi_task_adds_the_pixel_loss():
    _, objective = build("objective.droppos.multi_task=true", "objective.droppos.pos_weight=0.5",
                         "objective.droppos.attn_guide=false")
    loss, metrics = objective(torch.randn(4, 3, 8, 8), ctx())
    torch.testing.assert_close(loss.detach(), 0.5 * metrics["loss_pos"] + metrics["loss_rec"])
    loss.backward()
    assert objective.net.pixel_mask_token.grad is not None and objective.net.mask_pos_token.grad is not None


def test_evaluate_reports_position_accuracy_and_draws_the_picture(tmp_path):
    _, objective = build()
    out = objective.evaluate(torch.randn(8, 3, 8, 8), torch.Generator().manual_seed(0))
    assert set(out.metrics) == {"val_pos_acc", "val_pos_acc_within1", "val_pos_ce"}
    assert 0 <= out.metrics["val_pos_acc"] <= out.metrics["val_pos_acc_within1"] <= 1
    out.pictures["positions"](tmp_path / "p.png")
    from PIL import Image
    assert Image.open(tmp_path / "p.png").size[0] > 300


def test_within_one_cell():
    true = torch.tensor([5, 5, 5, 0, 3])
    pred = torch.tensor([5, 10, 7, 5, 4])   # 4x4 grid: (1,1) vs (1,1), (2,2), (1,3); (0,0) vs (1,1); (0,3) vs (1,0)
    assert within_one_cell(pred, true, 4).tolist() == [True, True, False, True, False]


# ---------------------------------------------------------------- per-parameter clipping

def test_per_param_clipping_is_dino_style():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.full((2, 2), 0.1)
    clip_grad_per_param_([a, b], 5.0)
    torch.testing.assert_close(a.grad, torch.tensor([30.0, 40.0, 0.0]) * 5 / (50 + 1e-6))
    torch.testing.assert_close(b.grad, torch.full((2, 2), 0.1))   # under the threshold: untouched


@pytest.mark.parametrize("mode", ["global", "per_param"])
def test_train_step_optimizer_clip_modes(mode):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([a, b], lr=1.0)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    skipped = train_step_optimizer([opt], scaler, 1.0, mode)
    assert float(skipped) == 0
    if mode == "per_param":   # each one to norm <= 1 on its own: b (norm 0.5) is left alone
        torch.testing.assert_close(-a.data, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
        torch.testing.assert_close(-b.data, torch.tensor([0.3, 0.4]))
    else:                     # one coefficient from the global norm sqrt(25 + 0.25)
        coef = 1.0 / (math.sqrt(25.25) + 1e-6)
        torch.testing.assert_close(-b.data, torch.tensor([0.3, 0.4]) * coef, rtol=1e-5, atol=0)


def test_clip_mode_config():
    cfg = load_config("droppos_digits")
    assert cfg.optim.clip_mode == "per_param" and cfg.optim.clip_grad == 5.0
    with pytest.raises(ConfigError, match="optim.clip_mode = 'per_param' needs a threshold"):
        load_config("mae_digits", ['optim.clip_mode="per_param"'])
    with pytest.raises(ConfigError, match="optim.clip_mode must be one of 'global', 'per_param'"):
        load_config("mae_digits", ['optim.clip_mode="layer"', "optim.clip_grad=1.0"])


# ---------------------------------------------------------------- config errors and presets

@pytest.mark.parametrize("override, message", [
    ("objective.droppos.pos_mask_ratio=1.0", r"objective.droppos.pos_mask_ratio must be in \[0, 1\)"),
    ("objective.droppos.pos_mask_ratio=0.0", "drops no position"),
    ("objective.droppos.sigma=-1", "objective.droppos.sigma must be >= 0"),
    ("objective.droppos.official_smoothing=true", "official_smoothing builds the official 2-wide grid"),
    ('objective.droppos.mask_token_type="learned"', "mask_token_type must be one of 'param', 'zeros', 'wrong_pos'"),
    ("objective.droppos.attn_temperature=0", "attn_temperature must be > 0"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("droppos_digits", [override])


def test_vit_base_preset_is_the_official_recipe():
    cfg = load_config("droppos_vit_base_800ep")
    s, o, m = cfg.objective, cfg.optim, cfg.model
    assert (m.arch, m.img_size, m.patch_size, m.decoder_dim, m.decoder_depth) == ("vit_base", 224, 16, 512, 2)
    assert (s.mask_ratio, s.pos_mask_ratio, s.sigma, s.sigma_decay, s.attn_guide) == (0.75, 0.75, 1.0, True, True)
    assert (o.blr, o.warmup_epochs, o.weight_decay, o.betas) == (1.5e-4, 10, 0.05, (0.9, 0.95))
    assert (o.clip_grad, o.clip_mode, cfg.train.precision, cfg.train.epochs) == (5.0, "per_param", "fp32", 800)
    objective = build_objective(load_config("droppos_vit_base_800ep", ["model.depth=1"]))
    assert objective.net.decoder.head.out_features == 196
    assert objective.flops_per_image() > 0


# ---------------------------------------------------------------- the generic objective checks

def test_attn_backend_reaches_the_encoder():
    units.test_attn_backend_reaches_every_encoder("droppos")


@pytest.mark.slow
def test_two_epochs_resume_two_equals_four(tmp_path):
    units.test_two_epochs_resume_two_equals_four(tmp_path, "droppos")
