"""AdamW (or SGD) with MAE's weight-decay rules and its per-iteration warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm 0.3.2 ``add_weight_decay``: no decay for 1-D params and biases; frozen params
    skipped. The 1x1xD cls and mask tokens are 3-D and so *are* decayed, as in MAE."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """``optim.name``: fused AdamW (one kernel per step; it skips a step on the device when told of inf/NaN
    gradients, which the engine's non-finite guard relies on to avoid a host sync per step), or momentum SGD.
    SGD is not fused: PyTorch's fused SGD leaves its momentum buffers uninitialised when the first step is
    skipped that way, so a skipped SGD step costs one host sync instead."""
    groups = param_groups(model, optim_cfg.weight_decay)
    if getattr(optim_cfg, "name", "adamw") == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.sgd_momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), fused=True)


@torch.no_grad()
def clip_grad_per_param_(params, max_norm: float) -> None:
    """DINO's ``clip_gradients`` (DropPos's default): each parameter's gradient is scaled by
    ``min(1, max_norm / (norm + 1e-6))`` with its *own* L2 norm, instead of one coefficient from the global
    norm. No host sync: the coefficients stay on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0).to(g.dtype) for n, g in zip(norms, grads)])


def base_lr(optim_cfg, effective_batch: int) -> float:
    """``lr = blr * effective_batch / 256`` unless an absolute lr is given."""
    return optim_cfg.lr if optim_cfg.lr is not None else optim_cfg.blr * effective_batch / 256


def lr_at(epoch_float: float, lr: float, min_lr: float, warmup_epochs: float, total_epochs: int) -> float:
    """MAE's ``adjust_learning_rate``: linear warmup from 0, then half-cycle cosine to min_lr."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-8)
    progress = min((epoch_float - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(epoch_float: float, start: float, end: float | None, total_epochs: int) -> float:
    """DINO's per-iteration weight-decay schedule: half-cycle cosine from ``start`` to ``end`` over the run
    (no warmup); ``end`` None: constant ``start``."""
    if end is None:
        return start
    progress = min(max(epoch_float / max(total_epochs, 1e-8), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """The scheduled weight decay times each group's ``wd_scale`` (default 1; 0 for biases and 1-D params)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled ``lr`` times each group's ``lr_scale`` (default 1: objectives set it to give a model or
    a layer its own rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
