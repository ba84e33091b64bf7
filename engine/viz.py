"""PNG figures of masked image modeling: reconstructions, and HPM's predicted-vs-actual hard-patch heat maps.

PIL only. Each figure is a grid with one row per image and a title over each column. Images are shown in
[0, 1] after undoing the normalisation (mean/std given) or, without them, after a min-max stretch taken from
each original image (and applied to its whole row, so the reconstruction is shown on the same scale). Small
images (e.g. 8x8 digits) are enlarged with nearest-neighbour so every cell is at least MIN_CELL pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 96  # smallest cell side in pixels
PAD = 4  # gap between cells and around the grid
TITLE_HEIGHT = 16  # band above the first row for the column titles
MASK_RGB = (0.42, 0.47, 0.58)  # masked patches: a bluish grey, told apart from gray pixels of gray images
HARD_RGB = (0.93, 0.45, 0.13)  # masked patches chosen as hard (HPM): orange
HEADER_HEIGHT = 16  # a caption line above the column titles
LABEL_WIDTH = 56  # left margin for per-row notes
COLORBAR_HEIGHT = 28  # a viridis bar with its labels under the grid
MISSING_RGB = (128, 128, 128)  # heat-map colour of non-finite values (e.g. no loss at a visible patch)
# viridis at 0, 1/8, ..., 1 (perceptually uniform, readable in grayscale); interpolated linearly in between
VIRIDIS_ANCHORS = np.array([
    (68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
    (39, 173, 129), (93, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)

Scalars = float | Sequence[float] | None


def panel_size(num_cols: int, num_rows: int, height: int, width: int, *, header: bool = False,
               row_labels: bool = False, colorbar: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of a figure with cells of images height x width (and the optional caption
    line, per-row notes on the left, colour bar at the bottom)."""
    scale = _scale(height, width)
    w = (LABEL_WIDTH if row_labels else 0) + PAD + num_cols * (width * scale + PAD)
    h = (HEADER_HEIGHT if header else 0) + TITLE_HEIGHT + PAD + num_rows * (height * scale + PAD)
    return w, h + (COLORBAR_HEIGHT if colorbar else 0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (NaN allowed: grey) to uint8 RGB with viridis; shape [...] -> [..., 3]."""
    finite = np.isfinite(values)
    pos = np.clip(np.where(finite, values, 0.0), 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(VIRIDIS_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = VIRIDIS_ANCHORS[lo] * (1 - frac) + VIRIDIS_ANCHORS[lo + 1] * frac
    rgb[~finite] = MISSING_RGB
    return np.round(rgb).astype(np.uint8)


def _scale(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_CELL / min(height, width)))


def _as_channels(stat: Scalars, channels: int) -> torch.Tensor:
    t = torch.as_tensor(stat, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"mean/std must be a scalar or have {channels} entries, got {t.numel()}")
    return t.expand(channels).view(1, channels, 1, 1)


def _displayable(imgs: torch.Tensor, others: list[torch.Tensor], mean: Scalars, std: Scalars):
    """Map imgs and same-shaped `others` to [0, 1]: undo mean/std, else min-max of each original image."""
    channels = imgs.shape[1]
    if mean is not None or std is not None:
        m = _as_channels(0.0 if mean is None else mean, channels)
        s = _as_channels(1.0 if std is None else std, channels)
        return [(x * s + m).clamp(0, 1) for x in [imgs, *others]]
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    span = (imgs.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    return [((x - lo) / span).clamp(0, 1) for x in [imgs, *others]]


def _patch_map(values: torch.Tensor, grid_h: int, grid_w: int, patch_size: int) -> torch.Tensor:
    """[N, L] per-patch values -> [N, H, W] per-pixel values (each patch filled with its value)."""
    grid = values.reshape(-1, grid_h, grid_w)
    return grid.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)


def _heat_map(values: torch.Tensor, grid_h: int, grid_w: int, patch_size: int) -> np.ndarray:
    """[N, L] -> uint8 [N, H, W, 3]: viridis of each row min-max normalised over its finite values."""
    v = values.detach().double().cpu().numpy()
    finite = np.isfinite(v)
    lo = np.where(finite, v, np.inf).min(1, keepdims=True)
    hi = np.where(finite, v, -np.inf).max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    normed = torch.from_numpy(np.where(finite, (v - np.where(np.isfinite(lo), lo, 0.0)) / span, np.nan))
    return colormap(_patch_map(normed, grid_h, grid_w, patch_size).numpy())


def _to_rgb_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _check(imgs: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if imgs.dim() != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"imgs must be [N, C, H, W] with C = 1 or 3, got {tuple(imgs.shape)}")
    if recon.shape != imgs.shape:
        raise ValueError(f"recon must have the shape of imgs {tuple(imgs.shape)}, got {tuple(recon.shape)}")
    height, width = imgs.shape[-2:]
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {height}x{width}")
    grid_h, grid_w = height // patch_size, width // patch_size
    if mask.shape != (imgs.shape[0], grid_h * grid_w):
        raise ValueError(f"mask must be [N, L] = [{imgs.shape[0]}, {grid_h * grid_w}], got {tuple(mask.shape)}")
    return grid_h, grid_w


def _prepare(imgs, mask, recon, patch_size, mean, std, max_images):
    """Shared part of both figures: the first max_images rows as RGB in [0, 1], masked and pasted views."""
    grid_h, grid_w = _check(imgs, mask, recon, patch_size)
    imgs, recon = (t[:max_images].detach().float().cpu() for t in (imgs, recon))
    mask = mask[:max_images].detach().bool().cpu()
    imgs, recon = (x.expand(-1, 3, -1, -1) for x in _displayable(imgs, [recon], mean, std))  # RGB
    pixel_mask = _patch_map(mask, grid_h, grid_w, patch_size)[:, None]  # [N, 1, H, W]
    masked = torch.where(pixel_mask, torch.tensor(MASK_RGB).view(1, 3, 1, 1), imgs)
    pasted = torch.where(pixel_mask, recon, imgs)  # MAE's view: visible patches are the original's
    return imgs, mask, recon, masked, pasted, grid_h, grid_w


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _save_grid(path, titles: list[str], columns: list[np.ndarray], *, header: str | None = None,
               row_labels: Sequence[str] | None = None, colorbar: str | None = None) -> Path:
    """columns: uint8 [N, H, W, 3] each; one row per image, a title per column; optionally a caption line
    (``header``), a note left of each row and a viridis colour bar captioned ``colorbar``. Returns the path."""
    num_rows, height, width = columns[0].shape[:3]
    scale = _scale(height, width)
    cell_w, cell_h = width * scale, height * scale
    size = panel_size(len(columns), num_rows, height, width, header=header is not None,
                      row_labels=row_labels is not None, colorbar=colorbar is not None)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left = LABEL_WIDTH if row_labels is not None else 0
    top = 0
    if header is not None:
        draw.text((PAD, 2), _fit(draw, header, size[0] - 2 * PAD, font), fill=(0, 0, 0), font=font)
        top = HEADER_HEIGHT
    for col, (title, cells) in enumerate(zip(titles, columns)):
        x = left + PAD + col * (cell_w + PAD)
        title = _fit(draw, title, cell_w, font)
        draw.text((x + (cell_w - draw.textlength(title, font=font)) / 2, top + 2), title, fill=(0, 0, 0), font=font)
        for row in range(num_rows):
            cell = Image.fromarray(cells[row]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(cell, (x, top + TITLE_HEIGHT + PAD + row * (cell_h + PAD)))
    for row, note in enumerate(row_labels or ()):
        y = top + TITLE_HEIGHT + PAD + row * (cell_h + PAD) + cell_h // 2 - 5
        draw.text((PAD, y), _fit(draw, note, LABEL_WIDTH - PAD, font), fill=(0, 0, 0), font=font)
    if colorbar is not None:
        y0 = size[1] - COLORBAR_HEIGHT + 4
        bar_w = min(256, size[0] - left - 2 * PAD)
        ramp = colormap(np.linspace(0.0, 1.0, bar_w))[None].repeat(8, axis=0)
        canvas.paste(Image.fromarray(ramp), (left + PAD, y0))
        draw.text((left + PAD, y0 + 10), "low", fill=(0, 0, 0), font=font)
        draw.text((left + PAD + bar_w - draw.textlength("high", font=font), y0 + 10), "high", fill=(0, 0, 0),
                  font=font)
        draw.text((left + 2 * PAD + bar_w, y0), _fit(draw, colorbar, size[0] - bar_w - left - 3 * PAD, font),
                  fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def save_reconstructions(path, imgs: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch_size: int,
                         mean: Scalars = None, std: Scalars = None, max_images: int = 8) -> Path:
    """Grid of original | masked (grey) | reconstruction with visible patches pasted | reconstruction only.

    Args:
        imgs, recon: [N, C, H, W] (C = 1 or 3), normalised as the model sees them.
        mask: [N, L] bool, True = masked, patches in raster order.
        mean, std: the normalisation to undo (per-channel sequences or scalars); None: min-max per image.
    """
    imgs, _, recon, masked, pasted, _, _ = _prepare(imgs, mask, recon, patch_size, mean, std, max_images)
    return _save_grid(path, ["original", "masked", "recon+visible", "recon"],
                      [_to_rgb_uint8(x) for x in (imgs, masked, pasted, recon)])


def save_hpm_panel(path, imgs: torch.Tensor, mask: torch.Tensor, pred_score: torch.Tensor,
                   true_loss: torch.Tensor, recon: torch.Tensor, patch_size: int, mean: Scalars = None,
                   std: Scalars = None, max_images: int = 8, *, hard: torch.Tensor | None = None,
                   caption: str | None = None, row_labels: Sequence[str] | None = None) -> Path:
    """Grid of image | mask (hard patches orange, random ones grey) | teacher's predicted loss | actual loss on
    the masked patches (visible ones grey: the decoder is not trained there) | reconstruction | reconstruction
    with the visible patches pasted; a caption, per-row notes and a colour bar.

    Heat maps are min-max normalised per image (viridis: dark = easy, yellow = hard).

    Args:
        pred_score, true_loss: [N, L] per-patch values; ``hard``: [N, L] bool, the masked patches chosen as
        hard; the other arguments as in `save_reconstructions`.
    """
    for name, values in (("pred_score", pred_score), ("true_loss", true_loss), ("hard", hard)):
        if values is not None and values.shape != mask.shape:
            raise ValueError(f"{name} must be [N, L] like mask {tuple(mask.shape)}, got {tuple(values.shape)}")
    imgs, mask, recon, masked, pasted, grid_h, grid_w = _prepare(imgs, mask, recon, patch_size, mean, std,
                                                                 max_images)
    if hard is not None:
        pixel_hard = _patch_map(hard[:max_images].detach().bool().cpu(), grid_h, grid_w, patch_size)[:, None]
        masked = torch.where(pixel_hard, torch.tensor(HARD_RGB).view(1, 3, 1, 1), masked)
    actual = torch.where(mask, true_loss[:max_images].detach().float().cpu(), torch.tensor(float("nan")))
    maps = [_heat_map(values, grid_h, grid_w, patch_size) for values in (pred_score[:max_images], actual)]
    titles = ["image", "mask (hard: orange)", "predicted loss", "actual loss, masked", "recon", "recon+visible"]
    return _save_grid(path, titles, [_to_rgb_uint8(imgs), _to_rgb_uint8(masked), *maps, _to_rgb_uint8(recon),
                                     _to_rgb_uint8(pasted)],
                      header=caption, row_labels=None if row_labels is None else list(row_labels)[:max_images],
                      colorbar="per image: dark = easy, yellow = hard; grey = not shown")


def save_position_map(path, frequency: torch.Tensor, mean_score: torch.Tensor, grid: int, caption: str) -> Path:
    """Where hard patches fall over a held-out set: how often each position was chosen as hard, beside the
    mean predicted-loss map (a map that looks the same as every image's says the scores are positional)."""
    maps = [_heat_map(values.reshape(1, -1), grid, grid, 1) for values in (frequency, mean_score)]
    return _save_grid(path, ["chosen as hard", "mean predicted loss"], maps, header=caption,
                      colorbar="min-max over positions")


def save_order_panel(path, imgs: torch.Tensor, order: torch.Tensor, recon: torch.Tensor, patch_size: int,
                     attention: torch.Tensor | None = None, target: torch.Tensor | None = None,
                     max_images: int = 8) -> Path:
    """Grid of image | prediction order | [attention map] | [target] | reconstruction (autoregressive models).

    The order is a heat map of each patch's rank in the autoregression (dark = predicted first); the attention
    map (the semantic score the order was derived from) is min-max normalised per image like the order.

    Args:
        imgs, recon, target: [N, C, H, W] (C = 1 or 3), shown min-max stretched by each original image.
        order, attention: [N, L] per-patch values, patches in raster order.
    """
    grid_h, grid_w = _check(imgs, torch.zeros(order.shape, dtype=torch.bool), recon, patch_size)
    pictures = [recon] if target is None else [recon, target]
    imgs, *pictures = (t[:max_images].detach().float().cpu() for t in (imgs, *pictures))
    imgs, *pictures = (x.expand(-1, 3, -1, -1) for x in _displayable(imgs, pictures, None, None))
    titles = ["image", "order"]
    columns = [_to_rgb_uint8(imgs), _heat_map(order[:max_images], grid_h, grid_w, patch_size)]
    if attention is not None:
        titles.append("attention")
        columns.append(_heat_map(attention[:max_images], grid_h, grid_w, patch_size))
    if target is not None:
        titles.append("target")
        columns.append(_to_rgb_uint8(pictures[1]))
    titles.append("recon")
    columns.append(_to_rgb_uint8(pictures[0]))
    return _save_grid(path, titles, columns)
