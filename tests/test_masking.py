"""random_masking and hard_patch_masking: counts, index consistency, determinism, uniformity, errors."""
import pytest
import torch

from sslpt.kernels import Masking, hard_patch_masking, random_masking
from sslpt.kernels.masking import num_visible

# chi-square quantiles far in the tail (p ~ 1e-4), so a fixed seed passes with a wide margin
CHI2_BOUND = {6: 27.9, 15: 42.6, 34: 72.0}


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _check_consistent(m: Masking, num_patches: int, keep: int):
    batch = m.mask.shape[0]
    arange = torch.arange(num_patches).expand(batch, -1)
    assert m.ids_keep.shape == (batch, keep) and m.ids_restore.shape == m.mask.shape == (batch, num_patches)
    assert m.ids_keep.dtype == m.ids_restore.dtype == torch.int64 and m.mask.dtype == torch.bool
    # ids_shuffle and ids_restore are inverse permutations
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), arange)
    assert torch.equal(torch.gather(m.ids_restore, 1, m.ids_shuffle), arange)
    assert torch.equal(m.ids_shuffle[:, :keep], m.ids_keep)
    # exactly L - K masked per row; the kept ones are visible, ids_masked is the complement
    assert (m.mask.sum(1) == num_patches - keep).all()
    assert not torch.gather(m.mask, 1, m.ids_keep).any()
    assert torch.gather(m.mask, 1, m.ids_masked).all()
    both = torch.cat([m.ids_keep, m.ids_masked], 1).sort(1).values
    assert torch.equal(both, arange)


@pytest.mark.parametrize("num_patches", [1, 7, 50, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_masking_counts_and_indices(num_patches, ratio):
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        with pytest.raises(ValueError, match="no visible patch"):
            random_masking(3, num_patches, ratio)
        return
    m = random_masking(5, num_patches, ratio, generator=_generator(1))
    _check_consistent(m, num_patches, keep)


def test_extreme_ratios():
    m = random_masking(4, 196, 0.0)
    assert not m.mask.any() and m.ids_masked.shape == (4, 0)
    _check_consistent(m, 196, 196)
    m = random_masking(4, 196, 0.99)
    assert num_visible(196, 0.99) == 1
    _check_consistent(m, 196, 1)


def test_random_masking_is_maes_draw():
    # same generator state -> the same noise -> MAE's argsort-twice construction, bit for bit
    m = random_masking(64, 196, 0.75, generator=_generator(3))
    noise = torch.rand(64, 196, generator=_generator(3))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(64, 196)
    mask[:, :49] = 0
    mask = torch.gather(mask, 1, ids_restore)
    assert torch.equal(m.ids_keep, ids_shuffle[:, :49])
    assert torch.equal(m.ids_restore, ids_restore)
    assert torch.equal(m.mask, mask.bool())


def test_determinism_under_a_generator():
    a = random_masking(8, 49, 0.75, generator=_generator(7))
    b = random_masking(8, 49, 0.75, generator=_generator(7))
    c = random_masking(8, 49, 0.75, generator=_generator(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.mask, c.mask)


def test_random_masking_is_uniform():
    # L=7, 3 masked: each of the C(7,3) = 35 masked sets is equally likely
    draws = 35 * 200
    m = random_masking(draws, 7, 0.5, generator=_generator(11))
    codes = (m.mask.long() << torch.arange(7)).sum(1)
    counts = torch.bincount(codes, minlength=128)[codes.unique()]
    assert counts.numel() == 35
    expected = draws / 35
    assert ((counts - expected) ** 2 / expected).sum().item() < CHI2_BOUND[34]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_outside_range(bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, bad)
    with pytest.raises(ValueError, match="mask_ratio"):
        hard_patch_masking(torch.rand(2, 16), bad, 0)


def test_bad_sizes():
    with pytest.raises(ValueError, match="no visible patch"):
        random_masking(2, 10, 0.95)
    with pytest.raises(ValueError, match="batch"):
        random_masking(0, 10, 0.5)
    with pytest.raises(ValueError, match="num_patches"):
        random_masking(2, 0, 0.5)


# ---- hard_patch_masking ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_hard", [1, 5, 12])
def test_hard_patches_are_masked(num_hard):
    scores = torch.randn(6, 16)
    m = hard_patch_masking(scores, 0.75, num_hard, generator=_generator(2))
    _check_consistent(m, 16, 4)
    hard = torch.topk(scores, num_hard, dim=1).indices
    assert torch.gather(m.mask, 1, hard).all()
    # the hard patches come last in the shuffle (the random ones fill the rest of the masked set)
    assert torch.equal(m.ids_shuffle[:, -num_hard:].sort(1).values, hard.sort(1).values)


def test_all_masked_patches_hard():
    scores = torch.randn(3, 16, dtype=torch.bfloat16)
    m = hard_patch_masking(scores, 0.75, 12)
    assert torch.equal(m.mask, scores.float() >= torch.topk(scores.float(), 12, dim=1).values[:, -1:])


def test_no_hard_patch_is_a_random_mask():
    scores = torch.randn(5, 49)
    hard = hard_patch_masking(scores, 0.75, 0, generator=_generator(5))
    plain = random_masking(5, 49, 0.75, generator=_generator(5))
    assert all(torch.equal(x, y) for x, y in zip(hard, plain))


def test_random_part_is_uniform():
    # L=8, 4 masked, 1 hard (patch 0): the other 3 masked are uniform over the 7 remaining patches
    draws = 7000
    scores = torch.zeros(draws, 8)
    scores[:, 0] = 1.0
    m = hard_patch_masking(scores, 0.5, 1, generator=_generator(13))
    assert m.mask[:, 0].all() and (m.mask.sum(1) == 4).all()
    counts = m.mask[:, 1:].sum(0).double()
    expected = draws * 3 / 7
    assert ((counts - expected) ** 2 / expected).sum().item() < CHI2_BOUND[6]
    # and so are the sets: C(7,3) = 35 equally likely
    codes = (m.mask[:, 1:].long() << torch.arange(7)).sum(1)
    sets = torch.bincount(codes, minlength=128)[codes.unique()]
    assert sets.numel() == 35
    assert ((sets - draws / 35) ** 2 / (draws / 35)).sum().item() < CHI2_BOUND[34]


def test_hard_patch_masking_bad_inputs():
    scores = torch.randn(2, 16)
    with pytest.raises(ValueError, match="num_hard"):
        hard_patch_masking(scores, 0.75, 13)    # only 12 masked
    with pytest.raises(ValueError, match="num_hard"):
        hard_patch_masking(scores, 0.75, -1)
    with pytest.raises(ValueError, match="num_hard"):
        hard_patch_masking(scores, 0.75, 2.5)
    with pytest.raises(ValueError, match="pred_score"):
        hard_patch_masking(scores[0], 0.75, 1)
    with pytest.raises(ValueError, match="pred_score"):
        hard_patch_masking(scores[None], 0.75, 1)
    with pytest.raises(TypeError, match="pred_score"):
        hard_patch_masking(scores.long(), 0.75, 1)
    with pytest.raises(TypeError, match="pred_score"):
        hard_patch_masking(scores.tolist(), 0.75, 1)


@pytest.mark.parametrize("backend", ["reference"])
def test_tied_scores_give_hard_sets_spread_over_positions(backend):
    # every score equal: the 4 hard patches must be uniform over the 16 positions, not the first 4
    draws = 4000
    scores = torch.zeros(draws, 16)
    m = hard_patch_masking(scores, 0.25, 4, generator=_generator(21), backend=backend)
    hard = m.ids_shuffle[:, -4:]
    counts = torch.bincount(hard.flatten(), minlength=16).double()
    expected = draws * 4 / 16
    assert ((counts - expected) ** 2 / expected).sum().item() < CHI2_BOUND[15]
    # the old fixed rule, still available, always takes the lowest positions
    fixed = hard_patch_masking(scores[:8], 0.25, 4, generator=_generator(21), tie_break="position")
    assert torch.equal(fixed.ids_shuffle[:, -4:].sort(1).values, torch.arange(4).expand(8, 4))


def test_random_tie_break_keeps_distinct_scores_and_is_reproducible():
    scores = torch.randn(6, 16)
    a = hard_patch_masking(scores, 0.75, 5, generator=_generator(3))
    b = hard_patch_masking(scores, 0.75, 5, generator=_generator(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    top = torch.topk(scores, 5, dim=1).indices
    assert torch.equal(a.ids_shuffle[:, -5:].sort(1).values, top.sort(1).values)
    with pytest.raises(ValueError, match="tie_break"):
        hard_patch_masking(scores, 0.75, 5, tie_break="first")
