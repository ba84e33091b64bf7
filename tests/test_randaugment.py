"""RandAugment and random erasing on the device (engine/data/randaugment.py): every op against a plain per-image
reference written here, the batched policy against the same draws applied one image at a time, determinism
from the generator, shapes and ranges, erasing statistics, and the config string parser."""
import math

import pytest
import torch

from sslpt.engine.data.randaugment import (OPS, RandAugmentSpec, affine, apply_op, auto_contrast, brightness, color,
                                           contrast, draw_ops, equalize, invert, parse_rand_augment, posterize,
                                           rand_augment, random_erase, rotate, sample_erase_boxes, sharpness,
                                           shear_x, shear_y, solarize, solarize_add, translate)

SPEC = RandAugmentSpec(magnitude=9, num_ops=2, mstd=0.5, increasing=True)


def _uint8_images(batch=4, channels=3, size=8, seed=0):
    """Images holding 8-bit levels exactly (k / 255), as the pixel space of a decoded uint8 image."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (batch, channels, size, size), generator=g)
    return q.float() / 255, q


# ------------------------------------------------------------------------------------------------ point ops
def test_invert_posterize_solarize_brightness_exact():
    x, q = _uint8_images()
    assert torch.equal(invert(x), 1 - x)
    bits = torch.tensor([0, 1, 4, 8])
    out = posterize(x, bits)
    for i, b in enumerate(bits.tolist()):
        mask = (0xFF << (8 - b)) & 0xFF
        assert torch.equal(out[i] * 255, (q[i] & mask).float()), b
    threshold = torch.tensor([0, 26, 128, 256])
    out = solarize(x, threshold)
    for i, t in enumerate(threshold.tolist()):
        ref = torch.where(q[i] >= t, 255 - q[i], q[i])
        assert torch.allclose(out[i] * 255, ref.float(), atol=1e-4), t
    add = torch.tensor([0, 10, 99, 110])
    out = solarize_add(x, add)
    for i, a in enumerate(add.tolist()):
        ref = torch.where(q[i] < 128, (q[i] + a).clamp(max=255), q[i])
        assert torch.allclose(out[i] * 255, ref.float(), atol=1e-4), a
    factor = torch.tensor([0.1, 0.5, 1.0, 1.9])
    out = brightness(x, factor)
    for i, f in enumerate(factor.tolist()):
        assert torch.allclose(out[i], (x[i] * f).clamp(0, 1), atol=1e-6)


def _luma_ref(img):
    return img[0] * 0.299 + img[1] * 0.587 + img[2] * 0.114 if img.shape[0] == 3 else img[0]


def test_color_contrast_sharpness_against_per_image_blends():
    x, _ = _uint8_images(batch=3)
    factor = torch.tensor([0.1, 1.6, 1.0])
    out_color, out_contrast, out_sharp = color(x, factor), contrast(x, factor), sharpness(x, factor)
    for i, f in enumerate(factor.tolist()):
        img = x[i]
        grey = _luma_ref(img).expand_as(img)
        assert torch.allclose(out_color[i], (grey + f * (img - grey)).clamp(0, 1), atol=1e-6)
        mean = _luma_ref(img).mean()
        assert torch.allclose(out_contrast[i], (mean + f * (img - mean)).clamp(0, 1), atol=1e-6)
        smooth = img.clone()
        for c in range(3):
            for r in range(1, 7):
                for k in range(1, 7):
                    smooth[c, r, k] = (img[c, r - 1:r + 2, k - 1:k + 2].sum() + 4 * img[c, r, k]) / 13
        assert torch.allclose(out_sharp[i], (smooth + f * (img - smooth)).clamp(0, 1), atol=1e-6)
    grey_image = x[:, :1]
    assert torch.equal(color(grey_image, factor), grey_image)   # saturation: a no-op on one channel


def test_auto_contrast_per_channel():
    x, _ = _uint8_images()
    x[1, 2] = 0.3   # a constant channel stays
    out = auto_contrast(x)
    for i in range(4):
        for c in range(3):
            ch = x[i, c]
            lo, hi = ch.min(), ch.max()
            ref = ch if hi == lo else (ch - lo) / (hi - lo)
            assert torch.allclose(out[i, c], ref, atol=1e-6)


def _equalize_ref(levels):
    """PIL's ImageOps.equalize of one channel of 8-bit levels, written out."""
    hist = [0] * 256
    for v in levels.flatten().tolist():
        hist[v] += 1
    used = [h for h in hist if h]
    if len(used) <= 1:
        return levels.clone()
    step = (sum(used) - used[-1]) // 255
    if step == 0:
        return levels.clone()
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(255, n // step))
        n += hist[i]
    return torch.tensor(lut)[levels]


def test_equalize_matches_pil_algorithm():
    x, q = _uint8_images(batch=3, size=32)
    x[0, 0] = 0.5                                        # one level only: unchanged
    q[0, 0] = round(0.5 * 255)
    x[1, 1] = torch.where(torch.arange(32) < 16, 0.0, 1.0).expand(32, 32)   # two levels
    q[1, 1] = (x[1, 1] * 255).round().long()
    skewed = torch.randint(0, 8, (32, 32), generator=torch.Generator().manual_seed(3))
    x[2, 2], q[2, 2] = skewed.float() / 255, skewed       # levels 0..7 only
    out = equalize(x)
    for i in range(3):
        for c in range(3):
            ref = _equalize_ref(q[i, c]).float() / 255
            if i == 0 and c == 0:
                ref = x[0, 0]
            assert torch.allclose(out[i, c], ref, atol=1e-6), (i, c)


# ------------------------------------------------------------------------------------------ geometric ops
def _sample_ref(img, xs, ys, fill, mode):
    """The value at continuous pixel coordinates (xs, ys) (pixel i spans [i, i + 1)); outside: fill."""
    channels, height, width = img.shape

    def at(r, c):
        if 0 <= r < height and 0 <= c < width:
            return img[:, r, c]
        return torch.full((channels,), float(fill))

    u, v = xs - 0.5, ys - 0.5
    if mode == "nearest":
        return at(int(math.floor(v + 0.5)), int(math.floor(u + 0.5)))
    c0, r0 = math.floor(u), math.floor(v)
    wu, wv = u - c0, v - r0
    return ((1 - wu) * (1 - wv) * at(r0, c0) + wu * (1 - wv) * at(r0, c0 + 1) + (1 - wu) * wv * at(r0 + 1, c0)
            + wu * wv * at(r0 + 1, c0 + 1))


def _affine_ref(img, mat, fill, mode):
    """Per image, per pixel: output pixel (r, c) samples the input at mat @ (c + 0.5, r + 0.5, 1)."""
    channels, height, width = img.shape
    out = torch.empty_like(img)
    (a, b, cc), (d, e, f) = mat
    for r in range(height):
        for c in range(width):
            x, y = c + 0.5, r + 0.5
            out[:, r, c] = _sample_ref(img, a * x + b * y + cc, d * x + e * y + f, fill, mode)
    return out


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_geometric_ops_against_explicit_affine(mode):
    x, _ = _uint8_images(batch=3, channels=2, size=8)
    fill = 0.25
    cases = {
        "rotate": (rotate(x, torch.tensor([17.0, -30.0, 7.5]), fill, mode),
                   lambda deg: [[math.cos(math.radians(deg)), -math.sin(math.radians(deg)), 0],
                                [math.sin(math.radians(deg)), math.cos(math.radians(deg)), 0]],
                   [17.0, -30.0, 7.5]),
        "shear_x": (shear_x(x, torch.tensor([0.27, -0.1, 0.3]), fill, mode),
                    lambda s: [[1, s, 0], [0, 1, 0]], [0.27, -0.1, 0.3]),
        "shear_y": (shear_y(x, torch.tensor([-0.27, 0.13, 0.05]), fill, mode),
                    lambda s: [[1, 0, 0], [s, 1, 0]], [-0.27, 0.13, 0.05]),
        "translate": (translate(x, torch.tensor([2.0, -3.6, 0.3]), torch.tensor([1.0, 0.0, -2.2]), fill, mode),
                      lambda t: [[1, 0, t[0]], [0, 1, t[1]]], [(2.0, 1.0), (-3.6, 0.0), (0.3, -2.2)]),
    }
    for name, (out, matrix, params) in cases.items():
        for i, p in enumerate(params):
            mat = matrix(p)
            if name == "rotate":   # about the centre (4, 4)
                (a, b, _), (d, e, _) = mat
                mat = [[a, b, 4 - a * 4 - b * 4], [d, e, 4 - d * 4 - e * 4]]
            ref = _affine_ref(x[i], mat, fill, mode)
            assert torch.allclose(out[i], ref, atol=1e-5), (name, p, mode)


def test_rotate_by_90_degrees_is_a_counter_clockwise_quarter_turn():
    x, _ = _uint8_images(batch=2, channels=1, size=8)
    out = rotate(x, torch.tensor([90.0, -90.0]), 0.0, mode="nearest")
    assert torch.equal(out[0], torch.rot90(x[0], 1, dims=(-2, -1)))    # the top row becomes the left column
    assert torch.equal(out[1], torch.rot90(x[1], -1, dims=(-2, -1)))
    marker = torch.zeros(1, 1, 8, 8)
    marker[0, 0, 0, 7] = 1   # top-right corner -> top-left after a counter-clockwise quarter turn
    assert rotate(marker, torch.tensor([90.0]), 0.0, mode="nearest")[0, 0, 0, 0] == 1


def test_affine_fill_per_channel_and_identity():
    x, _ = _uint8_images(batch=2, channels=3, size=8)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]]).expand(2, 2, 3)
    assert torch.allclose(affine(x, eye, 0.5), x, atol=1e-6)
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = translate(x, torch.tensor([8.0, -8.0]), torch.zeros(2), fill, mode="bilinear")   # all outside
    assert torch.allclose(out, fill.view(1, 3, 1, 1).expand_as(out), atol=1e-6)


def test_levels_of_the_increasing_ops():
    x, q = _uint8_images(batch=2)
    level, sign = torch.tensor([9.0, 10.0]), torch.tensor([1.0, -1.0])
    assert torch.equal(apply_op("Posterize", x, level, sign, 0.5), posterize(x, torch.tensor([1, 0])))
    assert torch.equal(apply_op("Solarize", x, level, sign, 0.5), solarize(x, torch.tensor([26, 0])))
    assert torch.equal(apply_op("SolarizeAdd", x, level, sign, 0.5), solarize_add(x, torch.tensor([99, 110])))
    assert torch.allclose(apply_op("Brightness", x, level, sign, 0.5), brightness(x, torch.tensor([1.81, 0.1])))
    assert torch.allclose(apply_op("Rotate", x, level, sign, 0.5), rotate(x, torch.tensor([27.0, -30.0]), 0.5))
    assert torch.allclose(apply_op("ShearX", x, level, sign, 0.5), shear_x(x, torch.tensor([0.27, -0.3]), 0.5))
    assert torch.allclose(apply_op("TranslateY", x, level, sign, 0.5),
                          translate(x, torch.zeros(2), torch.tensor([0.405 * 8, -0.45 * 8]), 0.5))
    with pytest.raises(ValueError, match="unknown op"):
        apply_op("Cutout", x, level, sign, 0.5)


# ------------------------------------------------------------------------------------------------ policy
def test_batched_policy_equals_the_same_draws_one_image_at_a_time():
    x, _ = _uint8_images(batch=128, channels=3, size=8)
    fill = torch.tensor([0.4, 0.5, 0.6])
    out = rand_augment(x, SPEC, torch.Generator().manual_seed(5), fill=fill)
    ops, applied, level, sign = draw_ops(128, SPEC, torch.Generator().manual_seed(5), "cpu")
    assert len(set(ops[applied].tolist())) == len(OPS)   # this draw exercises every op
    for i in range(128):
        img = x[i:i + 1]
        for j in range(SPEC.num_ops):
            if applied[i, j]:
                img = apply_op(OPS[ops[i, j]], img, level[i, j:j + 1], sign[i, j:j + 1], fill)
        assert torch.allclose(out[i], img[0], atol=1e-6), i


def test_draw_statistics():
    ops, applied, level, sign = draw_ops(20000, SPEC, torch.Generator().manual_seed(0), "cpu")
    assert abs(applied.float().mean().item() - 0.5) < 0.01
    counts = torch.bincount(ops.flatten(), minlength=len(OPS)).float() / ops.numel()
    assert (counts - 1 / len(OPS)).abs().max() < 0.01
    assert abs(level.mean().item() - 9.0) < 0.02 and abs(level.std().item() - 0.5) < 0.03
    assert level.max() <= 10 and level.min() >= 0 and abs((sign > 0).float().mean().item() - 0.5) < 0.01
    uniform = draw_ops(20000, RandAugmentSpec(9, 2, math.inf), torch.Generator().manual_seed(0), "cpu")[2]
    assert abs(uniform.mean().item() - 4.5) < 0.1


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (5, 3, 16, 16), (1, 3, 8, 8), (7, 1, 8, 12)])
def test_shapes_range_and_determinism(shape):
    x = torch.rand(shape)
    a = rand_augment(x, SPEC, torch.Generator().manual_seed(1))
    b = rand_augment(x, SPEC, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    many = torch.rand(32, *shape[1:])
    c = rand_augment(many, SPEC, torch.Generator().manual_seed(1))
    d = rand_augment(many, SPEC, torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)
    wide = rand_augment(x * 3 - 1, SPEC, torch.Generator().manual_seed(1))   # out-of-range input is clamped
    assert wide.min() >= 0 and wide.max() <= 1


def test_rand_augment_changes_most_images_and_leaves_the_input_alone():
    x, _ = _uint8_images(batch=256, channels=3, size=8)
    before = x.clone()
    out = rand_augment(x, SPEC, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.6 < changed < 0.85   # 1 - P(neither op applied) = 0.75, minus ops that change nothing
    with pytest.raises(ValueError, match="floating point"):
        rand_augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), SPEC)


# ------------------------------------------------------------------------------------------------ erasing
def test_random_erase_probability_and_boxes():
    g = torch.Generator().manual_seed(0)
    n, size = 8000, 32
    erase, top, left, h, w = sample_erase_boxes(n, size, size, 0.25, g, "cpu")
    assert abs(erase.float().mean().item() - 0.25) < 0.015
    hs, ws = h[erase].double(), w[erase].double()
    area = hs * ws
    slack = (hs + ws) / 2 + 0.25   # each side is rounded to the nearest pixel
    assert ((area >= 0.02 * size * size - slack) & (area <= size * size / 3 + slack)).all()
    aspect = hs / ws
    assert aspect.min() > 0.3 * 0.5 and aspect.max() < 2 / 0.3
    assert (hs >= 1).all() and (hs < size).all() and (ws < size).all()
    assert (top[erase] + h[erase] <= size).all() and (left[erase] + w[erase] <= size).all()
    assert (h[~erase] == 0).all() and (w[~erase] == 0).all()
    assert aspect.log().mean().abs() < 0.05   # log-uniform around 1


def test_random_erase_fills_one_rectangle_with_noise():
    x = torch.full((400, 3, 16, 16), 7.0)
    out = random_erase(x, 0.5, torch.Generator().manual_seed(1))
    again = random_erase(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and torch.equal(x, torch.full_like(x, 7.0))
    changed = out != 7.0
    per_image = changed.flatten(1).any(1)
    assert abs(per_image.float().mean().item() - 0.5) < 0.08
    for i in torch.nonzero(per_image).squeeze(1)[:50].tolist():
        mask = changed[i].any(0)
        assert (changed[i] == mask).all()                # every channel erased in the same box
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and mask.sum() == box.numel()   # one solid rectangle
    noise = out[changed]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert random_erase(x, 0.0, torch.Generator()) is x
    tiny = random_erase(torch.zeros(1, 1, 8, 8), 1.0, torch.Generator().manual_seed(0))
    assert tiny.shape == (1, 1, 8, 8) and (tiny != 0).any()
    with pytest.raises(ValueError, match="prob"):
        random_erase(x, 1.5)


# ------------------------------------------------------------------------------------------------ parser
def test_parse_rand_augment():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(9, 2, 0.5, True)
    assert parse_rand_augment("rand-n3-m5") == RandAugmentSpec(5, 3, 0.0, True)
    assert parse_rand_augment("rand-m7-mstdinf").mstd == math.inf
    assert parse_rand_augment("") is None and parse_rand_augment("none") is None
    for bad in ("m9", "rand", "rand-m11", "rand-m9-x3", "rand-m9-n0", "rand-mfoo", "rand-m9-inc0", "rand-m9-m8",
                "augmix-m9", "rand-m9-mstd-1"):
        with pytest.raises(ValueError):
            parse_rand_augment(bad)


def test_policy_never_synchronises_with_the_host():
    """No data-dependent shapes or host reads (nonzero, boolean indexing, .item()): on a GPU each would stall
    the step until the device catches up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, _ = _uint8_images(batch=16, channels=3, size=8)
    with Ops() as seen:
        rand_augment(x, SPEC, torch.Generator().manual_seed(3), fill=0.5)
        random_erase(x, 0.5, torch.Generator().manual_seed(3))
    syncing = {"nonzero", "masked_select", "_local_scalar_dense", "item", "index_put", "masked_scatter",
               "_linalg_check_errors"}
    assert seen.names and not (seen.names & syncing), seen.names & syncing
    assert "index" not in seen.names    # x[bool_mask] lowers to aten.index with a data-dependent size


@pytest.mark.gpu
def test_policy_never_synchronises_on_a_gpu():
    x = torch.rand(64, 3, 32, 32, device="cuda")
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = random_erase(rand_augment(x, SPEC, g, fill=mean), 0.25, g)
        rand_augment(x, SPEC, g, fill=0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape
