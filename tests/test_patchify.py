import pytest
import torch

from sslpt.kernels import patchify, unpatchify


def test_patchify_is_maes_layout():
    # a 2-channel 4x4 image with value = 100*c + 10*row + col
    c, r, q = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    img = (100 * c + 10 * r + q).float().unsqueeze(0)
    x = patchify(img, 2)
    assert x.shape == (1, 4, 8)
    # patch 1 is the top-right one (raster order); inside: (row, col, channel), channel last
    expected = [2, 102, 3, 103, 12, 112, 13, 113]
    assert x[0, 1].tolist() == expected
    # against MAE's definition: reshape + einsum nchpwq -> nhwpqc
    ref = torch.einsum("nchpwq->nhwpqc", img.reshape(1, 2, 2, 2, 2, 2)).reshape(1, 4, 8)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("shape, p", [((3, 3, 224, 224), 16), ((1, 1, 8, 8), 2), ((2, 5, 6, 6), 3), ((1, 1, 4, 4), 1)])
def test_round_trip(shape, p):
    img = torch.randn(shape)
    assert torch.equal(unpatchify(patchify(img, p), p, shape[1]), img)


def test_non_square_needs_grid():
    img = torch.randn(2, 3, 4, 8)
    x = patchify(img, 2)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(x, 2, 3)
    assert torch.equal(unpatchify(x, 2, 3, grid=(2, 4)), img)


def test_bad_inputs():
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        patchify(torch.randn(1, 3, 8, 8), 3)
    with pytest.raises(ValueError, match="imgs must have 4 dimensions"):
        patchify(torch.randn(3, 8, 8), 2)
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        patchify(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="last dimension"):
        unpatchify(torch.randn(1, 4, 7), 2, 3)
