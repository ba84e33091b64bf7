"""data2vec 2.0: the inverse block mask, the targets, the decoder and the loss against float64 references written
from the method's description; one teacher pass shared by the masked copies; the EMA schedule; config errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.models.data2vec2 import ConvDecoder2d, Data2Vec2Encoder
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.objectives.data2vec2 import build_targets, data2vec2_decay

TINY = ["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=2",
        "objective.data2vec2.clones=3", "objective.data2vec2.prenet_depth=1", "objective.data2vec2.top_k_layers=2"]


def tiny(*extra):
    return build_objective(load_config("data2vec2_digits", TINY + list(extra)))


# ------------------------------------------------------------------------------------------------ mask
def blocks_reference(centres, grid, block):
    """Loop form: each centre switches on its block x block square, cells outside the grid clamped to the edge."""
    out = torch.zeros(centres.shape[0], grid, grid)
    lo = block // 2
    for b, row in enumerate(centres.tolist()):
        for c in row:
            r0, c0 = divmod(c, grid)
            for dr in range(-lo, block - lo):
                for dc in range(-lo, block - lo):
                    out[b, min(max(r0 + dr, 0), grid - 1), min(max(c0 + dc, 0), grid - 1)] = 1
    return out.reshape(centres.shape[0], -1)


@pytest.mark.parametrize("grid, ratio, block, adjust, centres, visible",
                         [(14, 0.8, 3, 0.07, 5, 39), (4, 0.75, 2, 0.07, 1, 4), (7, 0.6, 3, 0.0, 2, 19)])
def test_inverse_block_mask_counts_blocks_and_inversion(grid, ratio, block, adjust, centres, visible):
    batch, patches = 200, grid * grid
    masking = kernels.inverse_block_masking(batch, grid, ratio, block, adjust,
                                            generator=torch.Generator().manual_seed(3))
    assert int(patches * ((1 - ratio + adjust) / block ** 2)) == centres
    # the same count in every row: 157 of 196 masked at the ViT-B/16 default
    assert (masking.mask.sum(1) == patches - visible).all() and masking.ids_keep.shape == (batch, visible)
    assert (~masking.mask).gather(1, masking.ids_keep).all()          # ids_keep are exactly the visible cells
    assert (masking.ids_keep.sort(1).values.diff(1) > 0).all()         # distinct
    # the visible cells come from the blocks around the centres the generator drew first (inverse masking)
    on = blocks_reference(torch.randint(patches, (batch, centres), generator=torch.Generator().manual_seed(3)),
                          grid, block).bool()
    kept = ~masking.mask
    for row_on, row_kept in zip(on, kept):
        if row_on.sum() >= visible:
            assert not (row_kept & ~row_on).any()     # surplus block cells were turned off, nothing else on
        else:
            assert not (row_on & ~row_kept).any()     # every block cell stays visible, random others join
    assert kernels.masking.blocks_from_centres(torch.tensor([[0, 15]]), 4, 3).tolist() == \
        blocks_reference(torch.tensor([[0, 15]]), 4, 3).tolist()


def test_inverse_block_mask_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        kernels.inverse_block_masking(2, 4, 1.0)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        kernels.inverse_block_masking(2, 2, 0.9)
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        kernels.inverse_block_masking(2, 0, 0.5)


# ------------------------------------------------------------------------------------------------ targets
def targets_reference(layers, k):
    """float64: per layer, (t - mean over tokens) / sqrt(var over tokens + 1e-5) per sample and channel; the mean
    of the last k; then (y - mean over channels) / sqrt(var over channels + 1e-5) per token."""
    normed = []
    for t in layers[-k:]:
        t = t.double()
        mu, var = t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)
        normed.append((t - mu) / torch.sqrt(var + 1e-5))
    y = sum(normed) / len(normed)
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5)


def test_targets_equal_float64_reference():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(3, 7, 5, generator=g) * (i + 1) + i for i in range(4)]
    for k in (1, 3, 4):
        torch.testing.assert_close(build_targets(layers, k).double(), targets_reference(layers, k),
                                   rtol=1e-5, atol=1e-5)


def test_teacher_targets_use_ffn_outputs_before_the_residual():
    objective = tiny()
    encoder = objective.teacher.model.encoder
    imgs = torch.randn(2, 1, 8, 8)
    captured = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: captured.append(o)) for b in encoder.blocks]
    y, y_cls = objective.teacher_targets(imgs)
    for h in hooks:
        h.remove()
    assert len(captured) == 3      # every block ran once; the last 2 (prenet_depth = 1, top_k_layers = 2) are used
    torch.testing.assert_close(y.double(), targets_reference([t[:, 1:] for t in captured[1:]], 2),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_cls, y.mean(1))


# ------------------------------------------------------------------------------------------------ model
def test_post_ln_block_and_encoder_layout():
    encoder = Data2Vec2Encoder(8, 2, 1, 16, 2, 2, prenet_depth=1)
    x = torch.randn(2, 5, 16)
    block = encoder.blocks[0]
    out, ffn = block(x, return_ffn=True)
    h = F.layer_norm(x + block.attn(x), (16,), block.norm1.weight, block.norm1.bias, 1e-6)
    torch.testing.assert_close(ffn, block.mlp(h))
    torch.testing.assert_close(out, F.layer_norm(h + ffn, (16,), block.norm2.weight, block.norm2.bias, 1e-6))
    imgs = torch.randn(2, 1, 8, 8)
    tokens = encoder(imgs)
    # input LayerNorm, no position on the cls token, no final norm: the output is the last block's
    x = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.embed(imgs)], 1)
    expected = encoder.blocks[1](encoder.blocks[0](encoder.input_norm(x)))
    torch.testing.assert_close(tokens, expected)
    ids = torch.tensor([[0, 5, 9], [15, 1, 2]])
    torch.testing.assert_close(encoder(imgs, ids)[:, 1:].shape, torch.Size([2, 3, 16]))
    assert encoder.features(imgs, "cls").shape == (2, 16)


def test_conv_decoder_equals_float64_reference():
    torch.manual_seed(0)
    decoder = ConvDecoder2d(grid=3, in_dim=8, dim=8, depth=2, out_dim=5, kernel=3, groups=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    h = x.transpose(1, 2).reshape(2, 8, 3, 3)
    for conv in decoder.convs:
        y = F.conv2d(h, conv.weight, conv.bias, padding=1, groups=4)
        mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
        h = F.gelu((y - mu) / torch.sqrt(var + 1e-5)) + h        # a residual after every block
    expected = h.flatten(2).transpose(1, 2) @ decoder.proj.weight.T + decoder.proj.bias
    torch.testing.assert_close(decoder(x), expected)
    narrow = ConvDecoder2d(grid=3, in_dim=8, dim=4, depth=1, out_dim=8, groups=4)
    assert not narrow.first_residual and narrow(x.float()).shape == (2, 9, 8)


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("reduction, beta", [("sum", 0.0), ("mean", 0.0), ("sum", 0.5)])
def test_loss_equals_float64_reference(reduction, beta):
    objective = tiny(f'objective.data2vec2.cls_reduction="{reduction}"', f"objective.data2vec2.loss_beta={beta}")
    imgs = torch.randn(2, 1, 8, 8)
    loss, regression, cls_loss, _, _ = objective.losses(imgs, torch.Generator().manual_seed(7))
    # the same draws, step by step
    g = torch.Generator().manual_seed(7)
    masking = objective.masking(6, g, imgs.device)
    y, y_cls = objective.teacher_targets(imgs)
    pred, cls = objective.student(imgs, masking, g)
    pred, cls, y, y_cls = pred.double(), cls.double(), y.double(), y_cls.double()
    width, clones = 32, 3

    def dist(a, b):
        d = a - b
        if beta == 0:
            return (d ** 2).sum(-1)
        return torch.where(d.abs() < beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta).sum(-1)

    terms = [dist(pred[r, i], y[r // clones, i]) / math.sqrt(width)
             for r in range(6) for i in range(16) if masking.mask[r, i]]
    assert len(terms) == 6 * 12
    reg_ref = sum(terms) / len(terms)
    rows = torch.stack([dist(cls[r], y_cls[r // clones]) / math.sqrt(width) for r in range(6)])
    cls_ref = rows.sum() if reduction == "sum" else rows.mean()
    torch.testing.assert_close(regression.double(), reg_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_loss.double(), cls_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), reg_ref + 0.01 * cls_ref, rtol=1e-5, atol=1e-6)


def test_decoder_input_is_noise_at_masked_positions_only():
    objective = tiny("objective.data2vec2.noise_std=0.5")
    seen = []
    objective.model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    imgs = torch.randn(2, 1, 8, 8)
    g = torch.Generator().manual_seed(1)
    masking = objective.masking(6, g, imgs.device)
    objective.student(imgs, masking, g)
    h = seen[0]
    masked = h[masking.mask]
    masked = masked.detach()
    assert 0.4 < float(masked.std()) < 0.6 and abs(float(masked.mean())) < 0.1   # N(0, 0.5^2), no learned token
    encoder = objective.model.encoder
    tokens = encoder.encode_tokens(kernels.gather_tokens(encoder.embed(imgs).repeat_interleave(3, 0),
                                                         masking.ids_keep))[:, 1:]
    torch.testing.assert_close(kernels.gather_tokens(h, masking.ids_keep), tokens)


def test_masked_copies_share_one_teacher_pass():
    objective = tiny()
    calls = {"teacher": [], "student": []}
    objective.teacher.model.encoder.blocks[0].register_forward_hook(
        lambda m, i, o: calls["teacher"].append(i[0].shape[0]))
    objective.model.encoder.blocks[0].register_forward_hook(lambda m, i, o: calls["student"].append(i[0].shape))
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, generator=torch.Generator().manual_seed(0))
    loss, metrics = objective(torch.randn(4, 1, 8, 8), ctx)
    loss.backward()
    assert calls["teacher"] == [4]                          # one pass over the 4 full images
    assert calls["student"] == [torch.Size([12, 1 + 4, 32])]   # 3 copies each, cls + 4 visible of 16
    assert objective.model.decoder.proj.weight.grad is not None
    assert all(p.grad is None for p in objective.teacher.parameters())


# ------------------------------------------------------------------------------------------------ EMA, config
def test_ema_schedule_and_update():
    assert data2vec2_decay(0, 0.9998, 0.99999, 100_000) == 0.9998
    assert data2vec2_decay(50_000, 0.9998, 0.99999, 100_000) == pytest.approx(0.9998 + 0.5 * 0.00019)
    assert data2vec2_decay(100_000, 0.9998, 0.99999, 100_000) == 0.99999
    assert data2vec2_decay(375_300, 0.9998, 0.99999, 100_000) == 0.99999
    objective = tiny("objective.data2vec2.ema_decay=0.5", "objective.data2vec2.ema_end_decay=0.9",
                     "objective.data2vec2.ema_anneal_end_step=4")
    student = objective.model.encoder.blocks[0].mlp.fc1.weight
    teacher = objective.teacher.model.encoder.blocks[0].mlp.fc1.weight
    before = teacher.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    ctx = StepContext(epoch=0, step=1, steps_per_epoch=10, epochs=1, generator=torch.Generator())
    objective.after_optimizer_step(ctx)   # the 2nd update: decay 0.5 + 0.4 * 2 / 4 = 0.7
    assert objective.decay == pytest.approx(0.7)
    torch.testing.assert_close(teacher, 0.7 * before + 0.3 * student.detach())
    assert objective.teacher.model.decoder is None


@pytest.mark.parametrize("override, message", [
    ("objective.data2vec2.top_k_layers=3", r"objective\.data2vec2\.top_k_layers must be in \[0, 2\]"),
    ("objective.data2vec2.decoder_groups=5", r"objective\.data2vec2\.decoder_groups=5 must divide"),
    ("objective.data2vec2.mask_ratio=0.99", r"objective\.data2vec2\.mask_ratio=0\.99 leaves no visible patch"),
    ("objective.data2vec2.prenet_depth=3", r"objective\.data2vec2\.prenet_depth must be in \[0, model\.depth=3\)"),
    ('objective.data2vec2.cls_reduction="max"', r"cls_reduction must be one of 'sum', 'mean'"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("data2vec2_digits", TINY + [override])


def test_official_preset_counts():
    cfg = load_config("data2vec2_vit_base_150ep")
    s = cfg.objective
    assert cfg.model.num_patches == 196 and s.clones == 16 and s.top_k_layers == 10 and s.prenet_depth == 2
    masking = kernels.inverse_block_masking(8, 14, s.mask_ratio, s.mask_block, s.mask_adjust,
                                            generator=torch.Generator().manual_seed(0))
    assert (masking.mask.sum(1) == 157).all()
