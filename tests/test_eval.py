"""Evaluation: feature extraction, linear probe, weighted kNN, Spearman rank correlation."""
import math

import numpy as np
import pytest
import torch

from sslpt.engine.data import load_digits
from sslpt.engine.eval import (extract_features, few_shot_linear_probe, knn_accuracy, linear_probe, rowwise_spearman,
                         spearman)


def _clusters(num_per_class: int, num_classes: int = 5, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def _random_task(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(600, 64, generator=g), torch.randint(0, 10, (600,), generator=g)


def test_extract_features_batches_and_returns_float32_cpu():
    imgs = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    calls = []

    def fn(x):
        calls.append(len(x))
        return x.flatten(1)[:, :3] * 2

    features = extract_features(fn, imgs, batch_size=4)
    assert calls == [4, 4, 2]
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, (imgs.flatten(1)[:, :3] * 2).float())


def test_linear_probe_separable_is_near_perfect_and_deterministic():
    train_x, train_y = _clusters(60)
    val_x, val_y = _clusters(40, seed=0)
    val_x = val_x + 0.1 * torch.randn_like(val_x)
    acc = linear_probe(train_x, train_y, val_x, val_y)
    assert acc >= 0.98
    assert acc == linear_probe(train_x, train_y, val_x, val_y)


def test_linear_probe_random_labels_is_near_chance():
    train_x, train_y = _random_task(1)
    val_x, val_y = _random_task(2)
    assert linear_probe(train_x, train_y, val_x, val_y) < 0.2  # chance is 0.1


def test_linear_probe_on_digits_pixels_and_random_features():
    train_x, train_y = load_digits("train")
    val_x, val_y = load_digits("val")
    assert linear_probe(train_x.flatten(1), train_y, val_x.flatten(1), val_y) > 0.9
    projection = torch.randn(64, 192, generator=torch.Generator().manual_seed(0))  # digits-size 1437 x 192
    acc = linear_probe(torch.relu(train_x.flatten(1) @ projection), train_y,
                       torch.relu(val_x.flatten(1) @ projection), val_y, max_iter=100)
    assert acc > 0.85


def test_few_shot_probe_is_the_mean_of_class_balanced_draws():
    train_x, train_y = _clusters(30)
    val_x, val_y = _clusters(30)   # the same centres and points, plus noise
    val_x = val_x + 8.0 * torch.randn(val_x.shape, generator=torch.Generator().manual_seed(2))
    acc = few_shot_linear_probe(train_x, train_y, val_x, val_y, shots=2, draws=3, seed=7)
    expected = []
    for draw in range(3):   # the documented draw: per class, the first `shots` of a permutation seeded by seed + draw
        g = torch.Generator().manual_seed(7 + draw)
        picked = torch.cat([torch.nonzero(train_y == c).flatten()[torch.randperm(30, generator=g)[:2]]
                            for c in range(5)])
        assert train_y[picked].bincount().tolist() == [2] * 5
        expected.append(linear_probe(train_x[picked], train_y[picked], val_x, val_y))
    assert acc == pytest.approx(sum(expected) / 3)
    assert 0.5 < acc < 1.0   # the noisy val set is not perfectly classified from 2 labels per class
    assert acc == few_shot_linear_probe(train_x, train_y, val_x, val_y, shots=2, draws=3, seed=7)
    assert few_shot_linear_probe(train_x, train_y, val_x, val_y, shots=30, draws=2) == pytest.approx(
        linear_probe(train_x, train_y, val_x, val_y), abs=1e-6)   # every sample, in another order


def test_few_shot_probe_rejects_bad_arguments():
    train_x, train_y = _clusters(3)
    with pytest.raises(ValueError, match="shots=4 .* classes \\[0, 1, 2, 3, 4\\] have only \\[3, 3, 3, 3, 3\\]"):
        few_shot_linear_probe(train_x, train_y, train_x, train_y, shots=4)
    with pytest.raises(ValueError, match="shots and draws must be >= 1"):
        few_shot_linear_probe(train_x, train_y, train_x, train_y, shots=0)
    with pytest.raises(ValueError, match="shots and draws must be >= 1"):
        few_shot_linear_probe(train_x, train_y, train_x, train_y, shots=1, draws=0)


def test_knn_separable_and_random():
    train_x, train_y = _clusters(60)
    val_x, val_y = _clusters(40, seed=0)
    assert knn_accuracy(train_x, train_y, val_x, val_y) >= 0.98
    assert knn_accuracy(*_random_task(1), *_random_task(2), k=20) < 0.2
    assert knn_accuracy(train_x[:5], train_y[:5], val_x, val_y, k=20) > 0  # k above the train size is clipped


def test_knn_votes_are_similarity_weighted():
    # one very close neighbour of class 1 outweighs two far ones of class 0
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    val_x = torch.tensor([[1.0, 0.3]])
    assert knn_accuracy(train_x, train_y, val_x, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train_x, train_y, val_x, torch.tensor([0]), k=3, temperature=100.0) == 1.0


def test_spearman_hand_example_with_ties():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    ranks_b = np.array([1, 2, 3.5, 5, 3.5])
    expected = np.corrcoef(np.arange(1, 6), ranks_b)[0, 1]
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a, b) == pytest.approx(0.8207826816681233, abs=1e-12)


def test_spearman_perfect_negative_and_constant():
    x = torch.randn(50)
    assert spearman(x, x.pow(3)) == pytest.approx(1.0)
    assert spearman(x, -torch.exp(x)) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(50)))
    assert spearman(x.view(5, 10), x.view(10, 5) * 2) == pytest.approx(1.0)  # flattened


def test_spearman_matches_scipy_on_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (200,), generator=g).float()
    b = a + torch.randint(0, 4, (200,), generator=g).float()
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-10)


def test_rowwise_spearman_averages_rows_and_skips_constant_ones():
    x = torch.randn(4, 30)
    rows = torch.stack([x[0], x[1], x[2], x[3]])
    other = torch.stack([x[0] * 3, -x[1], x[2] + 10, torch.zeros(30)])
    assert rowwise_spearman(rows, other) == pytest.approx((1 - 1 + 1) / 3)
    per_row = [spearman(rows[i], other[i]) for i in range(3)]
    assert rowwise_spearman(rows[:3], other[:3]) == pytest.approx(sum(per_row) / 3)
    with pytest.raises(ValueError, match="a and b"):
        rowwise_spearman(torch.randn(2, 3), torch.randn(3, 2))


def test_fit_linear_classifier_predicts_what_linear_probe_scores():
    from sslpt.engine.eval import fit_linear_classifier

    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    predict = fit_linear_classifier(x[:150], y[:150])
    accuracy = (predict(x[150:]) == y[150:]).float().mean().item()
    assert accuracy == linear_probe(x[:150], y[:150], x[150:], y[150:]) and accuracy > 0.9
