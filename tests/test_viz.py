"""Figures: reconstruction grids and HPM heat-map panels are written as readable PNGs of the expected size."""
import numpy as np
import pytest
import torch
from PIL import Image

from sslpt.engine.viz import (HARD_RGB, MASK_RGB, PAD, TITLE_HEIGHT, VIRIDIS_ANCHORS, colormap, panel_size,
                              save_hpm_panel, save_reconstructions)


def _batch(n=3, channels=1, size=8, patch=2):
    imgs = torch.randn(n, channels, size, size)
    num_patches = (size // patch) ** 2
    mask = torch.rand(n, num_patches) < 0.75
    return imgs, mask, imgs + 0.1 * torch.randn_like(imgs)


def test_reconstructions_png_digits_size(tmp_path):
    imgs, mask, recon = _batch(n=3)
    path = save_reconstructions(tmp_path / "deep" / "dir" / "rec.png", imgs, mask, recon, patch_size=2)
    assert path.exists() and path.parent.name == "dir"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == panel_size(4, 3, 8, 8)
    assert panel_size(4, 3, 8, 8)[0] >= 4 * 96  # 8x8 digits are enlarged to at least 96 px


def test_reconstructions_rgb_with_mean_std_and_max_images(tmp_path):
    imgs, mask, recon = _batch(n=10, channels=3, size=32, patch=8)
    path = save_reconstructions(tmp_path / "rec.png", imgs, mask, recon, patch_size=8,
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), max_images=4)
    with Image.open(path) as img:
        assert img.size == panel_size(4, 4, 32, 32)


def test_reconstruction_cells_show_masking_and_pasting(tmp_path):
    imgs = torch.zeros(1, 1, 4, 4)  # all black original, all white reconstruction
    recon = torch.ones(1, 1, 4, 4)
    mask = torch.tensor([[True, False, False, False]])  # top-left 2x2 patch masked
    path = save_reconstructions(tmp_path / "r.png", imgs, mask, recon, patch_size=2, mean=0.0, std=1.0)
    pixels = np.asarray(Image.open(path))
    cell = panel_size(1, 1, 4, 4)[0] - 2 * PAD
    y = TITLE_HEIGHT + PAD + cell // 4  # inside the top patch row
    pasted_x = PAD + 2 * (cell + PAD)
    assert tuple(pixels[y, pasted_x + cell // 4]) == (255, 255, 255)  # masked: the reconstruction
    assert tuple(pixels[y, pasted_x + 3 * cell // 4]) == (0, 0, 0)  # visible: the original


def test_hpm_panel_png(tmp_path):
    imgs, mask, recon = _batch(n=2, channels=3, size=16, patch=4)
    pred = torch.randn(2, 16)
    true_loss = torch.rand(2, 16)
    true_loss[~mask] = float("nan")  # loss known only where masked
    hard = mask & (torch.rand(2, 16) < 0.5)
    path = save_hpm_panel(tmp_path / "hpm" / "panel.png", imgs, mask, pred, true_loss, recon, patch_size=4,
                          hard=hard, caption="after epoch 3: K=2", row_labels=["rho 0.50", "rho 0.10"])
    with Image.open(path) as img:
        img.load()
        assert img.size == panel_size(6, 2, 16, 16, header=True, row_labels=True, colorbar=True)


def test_hpm_panel_marks_hard_patches_and_greys_visible_losses(tmp_path):
    """Column 2 shows hard patches in orange; column 4 (actual loss) is grey wherever the patch was visible."""
    imgs = torch.zeros(1, 1, 4, 4)
    mask = torch.tensor([[True, True, False, False]])
    hard = torch.tensor([[True, False, False, False]])
    loss = torch.tensor([[1.0, 2.0, 9.0, 9.0]])   # visible patches' losses must not be shown
    path = save_hpm_panel(tmp_path / "p.png", imgs, mask, torch.rand(1, 4), loss, imgs, patch_size=2,
                          mean=0.0, std=1.0, hard=hard)
    pixels = np.asarray(Image.open(path))
    cell = (panel_size(6, 1, 4, 4, colorbar=True)[0] - PAD) // 6 - PAD
    y_top, y_bottom = TITLE_HEIGHT + PAD + cell // 4, TITLE_HEIGHT + PAD + 3 * cell // 4
    col = lambda c, quarter: PAD + c * (cell + PAD) + quarter * cell // 4  # noqa: E731
    assert tuple(pixels[y_top, col(1, 1)]) == tuple(round(255 * v) for v in HARD_RGB)     # hard: orange
    assert tuple(pixels[y_top, col(1, 3)]) == tuple(round(255 * v) for v in MASK_RGB)     # random masked
    assert tuple(pixels[y_bottom, col(3, 1)]) == (128, 128, 128)                          # visible: grey
    assert tuple(pixels[y_top, col(3, 3)]) == tuple(VIRIDIS_ANCHORS[-1].astype(int))      # hardest masked


def test_viz_errors():
    imgs, mask, recon = _batch()
    with pytest.raises(ValueError, match="patch_size"):
        save_reconstructions("unused.png", imgs, mask, recon, patch_size=3)
    with pytest.raises(ValueError, match="mask"):
        save_reconstructions("unused.png", imgs, mask[:, :5], recon, patch_size=2)
    with pytest.raises(ValueError, match="pred_score"):
        save_hpm_panel("unused.png", imgs, mask, torch.zeros(3, 5), torch.zeros(3, 16), recon, patch_size=2)


def test_colormap_hits_the_viridis_anchors():
    out = colormap(np.array([0.0, 1.0, 0.5, np.nan]))
    assert out.dtype == np.uint8 and out.shape == (4, 3)
    assert np.array_equal(out[0], VIRIDIS_ANCHORS[0]) and np.array_equal(out[1], VIRIDIS_ANCHORS[-1])
    assert np.array_equal(out[2], VIRIDIS_ANCHORS[4]) and tuple(out[3]) == (128, 128, 128)
