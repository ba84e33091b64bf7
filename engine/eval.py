"""Evaluation of frozen features: linear probe, weighted kNN, and Spearman rank correlation.

- `linear_probe`: features standardised with train statistics (MAE's linear probe puts a BatchNorm without
  affine before the head), then multinomial logistic regression trained full-batch with L-BFGS. The problem
  is convex and starts from zero weights, so the result is deterministic.
- `few_shot_linear_probe`: the same probe fitted on a few labelled images per class (class-balanced draws, the
  mean over several draws), where self-supervised features matter most: the label-scarce setting of MSN's low-shot
  evaluation. A random encoder's features are nearly as linearly separable as pre-trained ones given every label
  of an easy set such as digits; given five per class they are not.
- `knn_accuracy`: DINO's weighted kNN: cosine similarity of L2-normalised features, the k nearest train
  samples vote for their class with weight exp(similarity / temperature).
- `spearman` / `rowwise_spearman`: rank correlation with average ranks for ties, used to report how well
  HPM's predicted per-patch loss ranks the actual one.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

_KNN_CHUNK = 1024  # val rows scored at a time: bounds the [chunk, num_train] similarity matrix
# Below this many multiply-adds per pass (N * D * classes) the probe runs on one CPU thread: each L-BFGS step
# is a few small matmuls, and on a busy machine every multi-threaded op waits for all its threads to be
# scheduled (measured: 1.5 ms per step on one thread against 110 ms on two, 2 cores shared with other jobs).
_SINGLE_THREAD_WORK = 1 << 24


@contextlib.contextmanager
def _cpu_threads(num: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], imgs: torch.Tensor, batch_size: int = 256,
                     device=None) -> torch.Tensor:
    """Run `fn` over `imgs` in batches (on `device`, default imgs.device); return float32 CPU features [N, D]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = imgs.device if device is None else torch.device(device)
    features = []
    for lo in range(0, len(imgs), batch_size):
        out = fn(imgs[lo:lo + batch_size].to(device, non_blocking=True))
        features.append(out.detach().float().flatten(1).cpu())
    return torch.cat(features)


def _check_split(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name} features must be [N, D] and labels [N] with N > 0, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def fit_linear_classifier(train_x: torch.Tensor, train_y: torch.Tensor, *, num_classes: int | None = None,
                          weight_decay: float = 1e-4, max_iter: int = 200,
                          seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardised features (L-BFGS, zero init); returns ``predict``,
    which maps [N, D] features to [N] class indices.

    Args:
        weight_decay: L2 penalty (weight_decay / 2) * ||W||^2 on the weights (not the bias).
        max_iter: L-BFGS iterations (strong Wolfe line search).
        seed: seeds torch's RNG around the fit; the fit itself draws no random numbers (zero init).
    """
    _check_split("train", train_x, train_y)
    train_x, train_y = train_x.detach().float().cpu(), train_y.detach().long().cpu()
    mean, var = train_x.mean(0), train_x.var(0, unbiased=False)
    inv_std = torch.rsqrt(var + 1e-6)
    train_x = (train_x - mean) * inv_std
    num_classes = num_classes or int(train_y.max()) + 1

    threads = 1 if train_x.numel() * num_classes < _SINGLE_THREAD_WORK else torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), _cpu_threads(threads):
        torch.manual_seed(seed)
        weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def predict(x: torch.Tensor) -> torch.Tensor:
        return (((x.detach().float().cpu() - mean) * inv_std) @ weight + bias).argmax(1)

    return predict


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
                 weight_decay: float = 1e-4, max_iter: int = 200, seed: int = 0) -> float:
    """Validation accuracy in [0, 1] of a logistic-regression probe on frozen features
    (``fit_linear_classifier``; train_x, val_x: [N, D] features, train_y, val_y: [N] integer labels)."""
    _check_split("val", val_x, val_y)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    predict = fit_linear_classifier(train_x, train_y, num_classes=num_classes, weight_decay=weight_decay,
                                    max_iter=max_iter, seed=seed)
    return (predict(val_x) == val_y.detach().long().cpu()).float().mean().item()


def few_shot_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          shots: int, *, draws: int = 20, seed: int = 0, weight_decay: float = 1e-4) -> float:
    """Mean validation accuracy of `linear_probe` fitted on ``shots`` train samples per class, over ``draws`` draws.

    Draw ``i`` picks each class's samples with a generator seeded by ``seed + i`` from the labels alone, so two
    encoders probed on the same split see the same labelled images.
    """
    _check_split("train", train_x, train_y)
    if shots < 1 or draws < 1:
        raise ValueError(f"shots and draws must be >= 1, got shots={shots}, draws={draws}")
    train_y = train_y.detach().long().cpu()
    classes, counts = train_y.unique(return_counts=True)
    if counts.min() < shots:
        short = classes[counts < shots].tolist()
        raise ValueError(f"shots={shots} labelled samples per class needs at least that many of every class in the "
                         f"train split; classes {short} have only {counts[counts < shots].tolist()}")
    members = [torch.nonzero(train_y == c).flatten() for c in classes]
    accuracies = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(seed + draw)
        picked = torch.cat([m[torch.randperm(len(m), generator=g)[:shots]] for m in members])
        accuracies.append(linear_probe(train_x[picked], train_y[picked], val_x, val_y, weight_decay=weight_decay))
    return sum(accuracies) / draws


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Validation accuracy in [0, 1] of DINO's temperature-weighted kNN classifier on cosine similarity."""
    _check_split("train", train_x, train_y)
    _check_split("val", val_x, val_y)
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be positive and temperature > 0, got k={k}, temperature={temperature}")
    train_x = F.normalize(train_x.float(), dim=1)
    val_x = F.normalize(val_x.float().to(train_x.device), dim=1)
    train_y, val_y = train_y.long().to(train_x.device), val_y.long().to(train_x.device)
    k = min(k, len(train_x))
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    correct = 0
    for lo in range(0, len(val_x), _KNN_CHUNK):
        sim, nearest = (val_x[lo:lo + _KNN_CHUNK] @ train_x.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[nearest], (sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[lo:lo + _KNN_CHUNK]).sum().item()
    return correct / len(val_x)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) along the last dim of [R, L]; tied values share the mean of their ranks."""
    values, order = x.sort(dim=1)
    length = x.shape[1]
    pos = torch.arange(length, device=x.device).expand_as(values)
    starts_group = torch.ones_like(values, dtype=torch.bool)
    starts_group[:, 1:] = values[:, 1:] != values[:, :-1]
    ends_group = torch.ones_like(starts_group)
    ends_group[:, :-1] = starts_group[:, 1:]
    # first / last sorted position of each element's tie group, by running max / min
    first = torch.where(starts_group, pos, 0).cummax(dim=1).values
    last = torch.where(ends_group, pos, length).flip(1).cummin(dim=1).values.flip(1)
    ranks = torch.empty_like(values, dtype=torch.float64)
    return ranks.scatter_(1, order, (first + last).double() / 2)


def spearman_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] float64 Spearman correlation of a[i] and b[i] ([B, L] each); NaN where either row is constant."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
        raise ValueError(f"a and b must both be [B, L] with L >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _average_ranks(a.detach().double()), _average_ranks(b.detach().double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp_min(1e-300), torch.nan)


def rowwise_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of a[i] and b[i] ([B, L] each).

    Rows where either side is constant have no correlation and are left out; NaN if every row is constant.
    """
    rho = spearman_per_row(a, b)
    defined = ~rho.isnan()
    return rho[defined].mean().item() if defined.any() else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two tensors of the same number of elements (flattened); NaN if constant."""
    if a.numel() != b.numel():
        raise ValueError(f"a and b must have the same number of elements, got {a.numel()} and {b.numel()}")
    return rowwise_spearman(a.reshape(1, -1), b.reshape(1, -1))
