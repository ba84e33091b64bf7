"""MAE's reconstruction loss with per-patch normalised targets (``forward_loss``).

For each patch with target t (P values) and prediction y:
    t_hat = (t - mean(t)) / sqrt(var(t) + eps)     (unbiased var, eps inside the sqrt)
    per_patch = mean((y - t_hat)^2)
    loss = sum(per_patch * mask) / sum(mask)
Gradient: d loss / d y = 2 (y - t_hat) / P * mask / sum(mask). Computed in fp32.
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._validate import FLOAT_DTYPES, check_shape, check_tensor


def normalize_patches(target: torch.Tensor, eps: float) -> torch.Tensor:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps) ** 0.5


def patch_loss_ref(pred, target, mask, norm_pix: bool, eps: float):
    pred, target = pred.float(), target.float()
    if norm_pix:
        target = normalize_patches(target, eps)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    weight = mask.float()
    # a mask with no masked patch (mask_ratio 0) gives loss 0, not 0/0
    loss = (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, per_patch


_IMPLS = {"reference": patch_loss_ref}


def patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
               eps: float = 1e-6, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch (normalised-)pixel MSE and its mean over the masked patches.

    Args:
        pred: [B, L, P] predicted patches.
        target: [B, L, P] target patches (``patchify(imgs, p)``); never receives gradient.
        mask: [B, L] bool or float, True/1 = masked (counted in the loss).
        norm_pix: normalise each target patch by its own mean and unbiased variance.
    Returns:
        (loss, per_patch): a scalar and [B, L], both fp32.
    """
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dtypes=FLOAT_DTYPES, device=pred.device)
    check_shape("target", target, pred.shape)
    check_tensor("mask", mask, device=pred.device)
    check_shape("mask", mask, pred.shape[:2])
    if norm_pix and pred.shape[-1] < 2:
        raise ValueError("norm_pix=True needs at least 2 values per patch (unbiased variance); "
                         f"pred has P={pred.shape[-1]}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    impl = dispatch("patch_loss", backend, pred.device, _IMPLS)
    return impl(pred, target.detach(), mask, bool(norm_pix), float(eps))
