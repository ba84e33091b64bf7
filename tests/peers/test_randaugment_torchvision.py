"""Our batched RandAugment ops (engine/data/randaugment.py, [0, 1] float images) against torchvision's
``transforms.v2.functional`` on the same images as uint8 (marker ``peers``; see test_interop.py for the
environment). Tolerances, in 8-bit levels of the uint8 result:

- invert, posterize, solarize, equalize: exact (both work on the 8-bit levels with the same formulas; float32
  k / 255 arithmetic only adds ~1e-7);
- autocontrast: ours - theirs in [0, 1] level: torchvision computes the stretch in float and truncates it to
  uint8 (a value meant to be k can come out as k - 1e-5 and become k - 1), we keep the float;
- rotate by fixed angles, grey fill 128: nearest is exact (the same inverse map about the centre, through
  ``affine_grid``/``grid_sample`` with pixel centres at i + 0.5; angles where a pixel centre lands on a boundary
  between input pixels could round either way, none of these does); bilinear within 0.5 level (torchvision
  rounds to uint8) away from the 3-pixel border, where torchvision blends the fill through its own validity
  mask and we blend it as a colour.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.peers

if os.environ.get("SSLPT_PEERS") == "1":   # in the peers environment a missing library is a failure
    import torchvision
else:
    torchvision = pytest.importorskip("torchvision")

from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from sslpt.engine.data.randaugment import (auto_contrast, equalize, invert, posterize, rotate,  # noqa: E402
                                           solarize)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    q[1] = (q[1] // 4 + 40).to(torch.uint8)        # a low-contrast image (autocontrast stretches it)
    q[2, 0] = 77                                     # a constant channel (left alone)
    q[3] = torch.randint(0, 12, (3, 16, 16), generator=g).to(torch.uint8)   # few levels (equalize spreads them)
    return q.float() / 255, q


def _levels(x):
    return x * 255


def test_point_ops_match_torchvision(images):
    x, q = images
    assert torch.allclose(_levels(invert(x)), TF.invert(q).float(), atol=1e-4)
    for bits in (1, 4, 6):
        ours = posterize(x, torch.full((len(x),), bits))
        assert torch.allclose(_levels(ours), TF.posterize(q, bits).float(), atol=1e-4), bits
    for threshold in (26, 128, 200):
        ours = solarize(x, torch.full((len(x),), threshold))
        assert torch.allclose(_levels(ours), TF.solarize(q, threshold).float(), atol=1e-4), threshold
    assert torch.allclose(_levels(equalize(x)), TF.equalize(q).float(), atol=1e-4)
    diff = (_levels(auto_contrast(x)) - TF.autocontrast(q).float())
    assert diff.min() > -1e-4 and diff.max() < 1 + 1e-3


@pytest.mark.parametrize("angle", [17.0, -30.0, 45.0, 90.0])
def test_rotate_matches_torchvision(images, angle):
    x, q = images
    ours = rotate(x, torch.full((len(x),), angle), 128 / 255, mode="nearest")
    theirs = TF.rotate(q, angle, interpolation=InterpolationMode.NEAREST, fill=[128.0]).float()
    assert torch.allclose(_levels(ours), theirs, atol=1e-3)
    ours = rotate(x, torch.full((len(x),), angle), 128 / 255, mode="bilinear")
    theirs = TF.rotate(q, angle, interpolation=InterpolationMode.BILINEAR, fill=[128.0]).float()
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert torch.allclose(_levels(ours)[inner], theirs[inner], atol=0.5 + 1e-3)
