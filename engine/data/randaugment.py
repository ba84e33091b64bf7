"""RandAugment and random erasing of MAE's fine-tuning pipeline, batched on the tensor's device.

RandAugment (timm's ``rand-m9-mstd0.5-inc1``, the "increasing" op set): every image draws ``num_ops`` ops
uniformly (with replacement) from the 15 below; each drawn op is applied with probability 0.5 at a magnitude
drawn per image and op from N(magnitude, mstd) clipped to [0, 10] (mstd = inf: uniform in [0, magnitude]).
Levels at magnitude m (``u = m / 10``; "+-" means a random sign per image and op):

    AutoContrast, Equalize, Invert         no level
    Rotate                                 +-30 u degrees about the image centre
    ShearX / ShearY                        +-0.3 u (x_in = x + s y, resp. y_in = y + s x, origin top-left)
    TranslateX / TranslateY                +-0.45 u of the image width / height
    Posterize                              keep 4 - floor(4 u) high bits of the 8-bit value (4 down to 0)
    Solarize                               invert where the 8-bit level >= 256 - floor(256 u)
    SolarizeAdd                            add min(128, floor(110 u)) / 255 where the 8-bit level < 128
    Color, Contrast, Brightness, Sharpness blend with a degenerate image by max(0.1, 1 +- 0.9 u)

Images are in [0, 1] pixel space (the caller un-normalises and re-normalises) and are clamped to it first, as an
8-bit image would be; every op keeps them there. The point ops use the 8-bit levels (``round(255 x)``) where
the PIL op looks at them (posterize, equalize, the solarize thresholds) and stay continuous elsewhere.
Geometric ops are one ``affine_grid`` / ``grid_sample`` (bilinear by default) with the pixel centres at i + 0.5;
areas that come from outside the image get ``fill`` (a colour per channel: the fine-tuner passes the
normalisation mean, as timm's ImageNet transform does with its ``img_mean``, so the filled area is 0 once
normalised; timm's own default is grey 128/255). The degenerate images follow PIL's ImageEnhance: grey (ITU-R
601 luma) for Color, a constant of the luma's mean for Contrast, black for Brightness, a 3x3 smoothing (centre
weight 5, borders unchanged) for Sharpness. On one channel, Color is a no-op and the luma is the channel.

All draws come from the generator passed in (no global RNG), so the output is a pure function of (images,
generator state). The ops loop over the op set (per op position), never over images, and every op runs on the
whole batch with each image keeping its own op's result: no data-dependent shapes, so no host synchronisation on
a GPU (15 cheap passes per op position instead of ~30 synchronised subset gathers).

Random erasing (timm's ``RandomErasing(mode="pixel", max_count=1)``): each image, with probability ``prob``,
gets one rectangle of area in [0.02, 1/3] of the image and log-uniform aspect ratio in [0.3, 1/0.3] (up to 10
tries, the first that fits strictly inside; none: no erasing) filled with standard normal noise per pixel and
channel; applied to normalised images.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
OP_PROB = 0.5          # each drawn op is applied with this probability (timm's RandAugment)
MAX_LEVEL = 10.0
MAX_ROTATE, MAX_SHEAR, MAX_TRANSLATE, MAX_ENHANCE = 30.0, 0.3, 0.45, 0.9
LUMA = (0.299, 0.587, 0.114)
ERASE_TRIES = 10
FORM = "rand-m<int>[-n<int>][-mstd<float>][-inc<0|1>] (e.g. rand-m9-mstd0.5-inc1), or \"\"/\"none\" for off"


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 9.0
    num_ops: int = 2
    mstd: float = 0.0
    increasing: bool = True


@functools.lru_cache(maxsize=64)   # the fine-tuner asks for its spec every step: parse each string once
def parse_rand_augment(text: str) -> RandAugmentSpec | None:
    """timm's config string -> spec (None for "" or "none"). Sections after ``rand``: ``m<int>`` (magnitude,
    0..10, required), ``n<int>`` (ops per image, default 2), ``mstd<float>`` (magnitude noise, >= 0 or inf,
    default 0), ``inc<0|1>`` (default 1 here; only the increasing op set is implemented). ValueError if bad."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{text!r} does not start with 'rand'")
    found: dict[str, str] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n)(.+)", part)
        if match is None or match.group(1) in found:
            raise ValueError(f"{text!r}: unknown or repeated section {part!r}")
        found[match.group(1)] = match.group(2)
    if "m" not in found:
        raise ValueError(f"{text!r} has no magnitude section m<int>")
    try:
        magnitude, num_ops = int(found["m"]), int(found.get("n", "2"))
        mstd, inc = float(found.get("mstd", "0")), int(found.get("inc", "1"))
    except ValueError:
        raise ValueError(f"{text!r}: a section's value is not a number") from None
    if not 0 <= magnitude <= MAX_LEVEL:
        raise ValueError(f"{text!r}: magnitude must lie in [0, 10], got {magnitude}")
    if num_ops < 1:
        raise ValueError(f"{text!r}: n must be >= 1, got {num_ops}")
    if not mstd >= 0:
        raise ValueError(f"{text!r}: mstd must be >= 0, got {mstd}")
    if inc != 1:
        raise ValueError(f"{text!r}: only the increasing op set (inc1) is implemented")
    return RandAugmentSpec(float(magnitude), num_ops, mstd, True)


# ---------------------------------------------------------------------------------------------- point ops
def _levels(x: torch.Tensor) -> torch.Tensor:
    """8-bit levels 0..255 (as a float tensor) of images in [0, 1]."""
    return torch.round(x.clamp(0, 1) * 255)


def _per_image(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return value.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` [B] (0..8) high bits of each 8-bit value."""
    step = _per_image(torch.exp2(8 - bits.clamp(0, 8).to(x.dtype)), x)
    return torch.floor(_levels(x) / step) * step / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values >= threshold [B] (in 8-bit levels, 0..256)."""
    return torch.where(_levels(x) >= _per_image(threshold, x), 1.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """Add ``add`` [B] (8-bit levels) to values below ``threshold`` (8-bit levels), clipped at 1."""
    return torch.where(_levels(x) < threshold, (x + _per_image(add, x) / 255).clamp(max=1.0), x)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch every channel of every image to [0, 1] (unchanged where the channel is constant)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    stretched = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, stretched, x).clamp(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation per image and channel on 256 bins: with h the histogram, ``last`` the count
    of the highest occupied level and step = (N - last) // 255, level i maps to min(255, (step // 2 + #values
    below i) // step); a channel with step 0 stays as it is."""
    batch, channels, height, width = x.shape
    levels = _levels(x).to(torch.int64).reshape(batch * channels, height * width)
    hist = torch.zeros(batch * channels, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    top = 255 - torch.flip(hist > 0, dims=[1]).to(torch.uint8).argmax(dim=1, keepdim=True)   # highest level used
    last = hist.gather(1, top)
    step = (height * width - last) // 255                                                    # [BC, 1]
    below = torch.cumsum(hist, dim=1) - hist                                                 # values < level
    lut = torch.clamp((step // 2 + below) // step.clamp(min=1), max=255)
    out = lut.gather(1, levels).to(x.dtype) / 255
    return torch.where(step > 0, out, x.reshape(batch * channels, -1)).view_as(x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + _per_image(factor, x) * (x - degenerate)).clamp(0, 1)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the grey image (a no-op for 1 channel)."""
    if x.shape[1] == 1:
        return x
    return _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a constant image at the mean of the image's luma."""
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (border pixels unsmoothed)."""
    channels = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(channels, 1, 3, 3)
    smooth = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=channels)
    return _blend(smooth, x, factor)


# ------------------------------------------------------------------------------------------ geometric ops
def affine(x: torch.Tensor, matrix: torch.Tensor, fill, mode: str = "bilinear") -> torch.Tensor:
    """Resample every image through its own pixel-space map ``matrix`` [B, 2, 3] from output to input
    coordinates (x right, y down, origin at the top-left corner, pixel i covering [i, i + 1)); points that come
    from outside the image take ``fill`` (a number or one per channel)."""
    batch, channels, height, width = x.shape
    # the same map in affine_grid's unit coordinates (u = 2 x / width - 1, v = 2 y / height - 1), written out:
    # no constant tensors to copy to the device and no matrix inverse (whose error check reads back on a GPU)
    m = matrix.to(torch.float64)
    wh, hw = width / height, height / width
    theta = torch.stack([
        torch.stack([m[:, 0, 0], m[:, 0, 1] * wh, m[:, 0, 0] + m[:, 0, 1] * wh + m[:, 0, 2] * 2 / width - 1], 1),
        torch.stack([m[:, 1, 0] * hw, m[:, 1, 1], m[:, 1, 0] * hw + m[:, 1, 1] + m[:, 1, 2] * 2 / height - 1], 1),
    ], 1).to(x.dtype)
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    if isinstance(fill, torch.Tensor):
        fill = fill.to(x.dtype).reshape(-1)
        fill = fill.expand(channels) if fill.numel() == 1 else fill
        fill = fill.view(1, channels, 1, 1)
    else:
        fill = x.new_full((1, channels, 1, 1), float(fill))
    return F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    """[B, 2, 3] from six [B] tensors (x_in = a x + b y + c, y_in = d x + e y + f)."""
    return torch.stack([torch.stack([a, b, c], dim=1), torch.stack([d, e, f], dim=1)], dim=1)


def rotate_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The map of a counter-clockwise rotation (as seen on screen) by ``degrees`` [B] about the image centre."""
    rad = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = width / 2, height / 2
    # input = R (output - centre) + centre, R = [[cos, -sin], [sin, cos]] (y down)
    return _matrices(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def shear_matrix(shear: torch.Tensor, axis: str) -> torch.Tensor:
    """x_in = x + s y (axis "x") or y_in = y + s x (axis "y"), s = ``shear`` [B]."""
    s = shear.to(torch.float64)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _matrices(one, s, zero, zero, one, zero) if axis == "x" else _matrices(one, zero, zero, s, one, zero)


def translate_matrix(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    dx, dy = dx.to(torch.float64), dy.to(torch.float64)
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return _matrices(one, zero, dx, zero, one, dy)


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill, mode: str = "bilinear") -> torch.Tensor:
    """Rotate counter-clockwise (as seen on screen) by ``degrees`` [B] about the image centre."""
    return affine(x, rotate_matrix(degrees, *x.shape[-2:]), fill, mode)


def shear_x(x: torch.Tensor, shear: torch.Tensor, fill, mode: str = "bilinear") -> torch.Tensor:
    return affine(x, shear_matrix(shear, "x"), fill, mode)


def shear_y(x: torch.Tensor, shear: torch.Tensor, fill, mode: str = "bilinear") -> torch.Tensor:
    return affine(x, shear_matrix(shear, "y"), fill, mode)


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, fill, mode: str = "bilinear") -> torch.Tensor:
    """Sample the input at (x + dx, y + dy) pixels: the content moves by (-dx, -dy)."""
    return affine(x, translate_matrix(dx, dy), fill, mode)


# --------------------------------------------------------------------------------------------- the policy
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def op_matrix(name: str, signed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[b, 2, 3]: the pixel-space map of geometric op ``name`` at signed magnitudes ``signed`` [b] (level / 10)."""
    if name == "Rotate":
        return rotate_matrix(signed * MAX_ROTATE, height, width)
    if name in ("ShearX", "ShearY"):
        return shear_matrix(signed * MAX_SHEAR, name[-1].lower())
    zero = torch.zeros_like(signed)
    if name == "TranslateX":
        return translate_matrix(signed * MAX_TRANSLATE * width, zero)
    return translate_matrix(zero, signed * MAX_TRANSLATE * height)


def apply_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, fill,
             mode: str = "bilinear") -> torch.Tensor:
    """Op ``name`` on images x [b, C, H, W] at magnitudes ``level`` [b] (0..10) with signs ``sign`` [b] (+-1)."""
    u = level.to(torch.float64) / MAX_LEVEL
    signed = u * sign.to(torch.float64)
    if name in GEOMETRIC:
        return affine(x, op_matrix(name, signed, *x.shape[-2:]), fill, mode)
    if name == "AutoContrast":
        return auto_contrast(x)
    if name == "Equalize":
        return equalize(x)
    if name == "Invert":
        return invert(x)
    if name == "Posterize":
        return posterize(x, 4 - torch.floor(u * 4))
    if name == "Solarize":
        return solarize(x, 256 - torch.floor(u * 256).clamp(max=256))
    if name == "SolarizeAdd":
        return solarize_add(x, torch.floor(u * 110).clamp(max=128))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = (1.0 + signed * MAX_ENHANCE).clamp(min=0.1)
        return {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}[name](
            x, factor)
    raise ValueError(f"unknown op {name!r}; choose one of {', '.join(OPS)}")


def draw_ops(batch: int, spec: RandAugmentSpec, generator: torch.Generator | None, device) -> tuple[torch.Tensor, ...]:
    """Per image and op position: (op index [B, n] int64, applied [B, n] bool, magnitude [B, n], sign [B, n])."""
    n = spec.num_ops
    ops = torch.randint(0, len(OPS), (batch, n), generator=generator, device=device)
    u = torch.rand(batch, n, 3, generator=generator, device=device, dtype=torch.float64)
    noise = torch.randn(batch, n, generator=generator, device=device, dtype=torch.float64)
    if math.isinf(spec.mstd):
        level = u[..., 2] * spec.magnitude
    else:
        level = spec.magnitude + spec.mstd * noise
    sign = torch.where(u[..., 1] < 0.5, -1.0, 1.0).to(torch.float64)
    return ops, u[..., 0] < OP_PROB, level.clamp(0, MAX_LEVEL), sign


def rand_augment(imgs: torch.Tensor, spec: RandAugmentSpec, generator: torch.Generator | None = None, fill=0.5,
                 mode: str = "bilinear") -> torch.Tensor:
    """RandAugment of every image of a batch [B, C, H, W] in [0, 1] (clamped to it first), each with its own
    ops and magnitudes from ``generator``. Returns a new tensor of the same shape, dtype and device."""
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or not imgs.is_floating_point():
        raise ValueError(f"imgs must be a floating point [B, C, H, W] tensor, got {getattr(imgs, 'shape', imgs)}")
    out = imgs.clamp(0, 1)
    batch, _, height, width = out.shape
    ops, applied, level, sign = draw_ops(batch, spec, generator, imgs.device)
    chosen = torch.where(applied, ops, -1)          # -1: no op at this position
    signed = level / MAX_LEVEL * sign
    per_image = lambda mask: mask.view(-1, 1, 1, 1)   # noqa: E731
    for j in range(spec.num_ops):
        # Every op runs on the whole batch and each image keeps its own op's result: no data-dependent shapes,
        # hence no host synchronisation on a GPU. The geometric ops are one resampling with each image's map.
        matrix = torch.eye(2, 3, dtype=torch.float64, device=out.device).expand(batch, 2, 3)
        geometric = torch.zeros(batch, dtype=torch.bool, device=out.device)
        for name in GEOMETRIC:
            picked = chosen[:, j] == OPS.index(name)
            matrix = torch.where(picked.view(-1, 1, 1), op_matrix(name, signed[:, j], height, width), matrix)
            geometric |= picked
        step = torch.where(per_image(geometric), affine(out, matrix, fill, mode), out)
        for k, name in enumerate(OPS):
            if name not in GEOMETRIC:
                result = apply_op(name, out, level[:, j], sign[:, j], fill, mode)
                step = torch.where(per_image(chosen[:, j] == k), result, step)
        out = step
    return out


def sample_erase_boxes(batch: int, height: int, width: int, prob: float, generator: torch.Generator | None,
                       device, area: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)
                       ) -> tuple[torch.Tensor, ...]:
    """(erase [B] bool, top, left, h, w [B] int64) of random erasing; h = w = 0 where nothing is erased."""
    u = torch.rand(batch, 2 * ERASE_TRIES + 3, generator=generator, device=device, dtype=torch.float64)
    target = height * width * (area[0] + (area[1] - area[0]) * u[:, :ERASE_TRIES])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, ERASE_TRIES:2 * ERASE_TRIES])
    h_try = torch.round(torch.sqrt(target * aspect))
    w_try = torch.round(torch.sqrt(target / aspect))
    valid = (h_try >= 1) & (w_try >= 1) & (h_try < height) & (w_try < width)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    erase = (u[:, -3] < prob) & valid.any(dim=1)
    h = torch.where(erase, h_try.gather(1, first).squeeze(1), 0.0)
    w = torch.where(erase, w_try.gather(1, first).squeeze(1), 0.0)
    top = torch.floor(u[:, -2] * (height - h + 1)).clamp(max=height - 1)   # uniform in 0..H-h
    left = torch.floor(u[:, -1] * (width - w + 1)).clamp(max=width - 1)
    return erase, top.long(), left.long(), h.long(), w.long()


def random_erase(imgs: torch.Tensor, prob: float = 0.25, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing with per-pixel normal noise of (normalised) images [B, C, H, W]; prob 0 returns imgs."""
    if not 0 <= prob <= 1:
        raise ValueError(f"prob must lie in [0, 1], got {prob}")
    if prob == 0:
        return imgs
    batch, channels, height, width = imgs.shape
    erase, top, left, h, w = sample_erase_boxes(batch, height, width, prob, generator, imgs.device)
    rows = torch.arange(height, device=imgs.device)
    cols = torch.arange(width, device=imgs.device)
    inside_y = (rows >= top[:, None]) & (rows < (top + h)[:, None])     # [B, H]
    inside_x = (cols >= left[:, None]) & (cols < (left + w)[:, None])   # [B, W]
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]        # [B, 1, H, W]
    noise = torch.randn(imgs.shape, generator=generator, device=imgs.device, dtype=imgs.dtype)
    return torch.where(mask, noise, imgs)
