"""NT-Xent (SimCLR's normalised temperature-scaled cross-entropy) without the 2N x 2N logits.

z = [z1; z2] L2-normalised row-wise ([2N, d]); s_ij = z_i . z_j / tau. For each of the 2N views the
positive is the other view of the same sample (i +- N), the negatives are all other views, and the
view itself is excluded:
    loss = mean_i [ lse_i - s_{i, i+-N} ],   lse_i = log sum_{j != i} exp(s_ij)

The kernels are info_nce's (``kernels.info_nce``) with the self entry excluded. S = z z^T is
symmetric, so with g_i the gradient of the loss w.r.t. lse_i and P_ij = exp(s_ij - lse_i):
    dL/dz_i = c sum_j W_ij z_j,   W_ij = g_i P_ij + g_j P_ji + p_i [j == pos(i)] + p_j [i == pos(j)],   c = 1/tau
(p the gradient w.r.t. the positive logits)
which is ONE backward pass (row and column softmax terms in the same tile) instead of a dQ and a dK pass;
and dL/dc = (1/(2c)) sum_i z_i . dL/dz_i. The forward is one 2N x 2N pass (it does not yet use the
symmetry of S to halve it).

Across GPUs each rank holds N_local samples; its 2 N_local views are compared with the views of all
ranks (all-gathered with gradient) and each rank returns the mean over its own 2 N_local rows. The
convention is info_nce's: average the loss and the gradients over ranks (DDP) to get the global-batch
loss and its gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import Impl, define_op
from ._custom_op import define
from .info_nce import (check_pair, check_temperature, gather_with_grad, inverse_temperature, lse_bwd_op, lse_forward,
                       rank_in, triton_supports)


def _views(z1: torch.Tensor, z2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[2N, d] normalised views, computed in fp32 (or the given wider dtype) and rounded to ``dtype``."""
    wide = torch.promote_types(z1.dtype, torch.float32)
    return torch.cat([F.normalize(z1.to(wide), dim=-1), F.normalize(z2.to(wide), dim=-1)]).to(dtype)


def nt_xent_ref(z1: torch.Tensor, z2: torch.Tensor, temperature, group=None) -> torch.Tensor:
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z = _views(z1, z2, dtype)
    num_views, n = z.shape[0], z1.shape[0]
    offset = rank_in(group) * num_views if group is not None else 0
    keys = gather_with_grad(z, group) if group is not None else z
    logits = z @ keys.T * inverse_temperature(temperature, z.device, dtype)
    rows = torch.arange(num_views, device=z.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, rows + offset] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    labels = offset + (rows + n) % num_views
    return F.cross_entropy(logits, labels)


# One process: rows and columns are the same z, so one fused backward pass.
def _self_lse(z: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_i = log sum_{j != i} exp(s_ij), positive logits s_{i, i+-N}) for s = scale * z z^T, fp32 [2N]."""
    half = z.shape[0] // 2
    return lse_forward(z, z, scale, self_offset=0, positive=(0, half, 2 * half))


def _lse_fake(z, *_):
    lse = z.new_empty(z.shape[0], dtype=torch.float32)
    return lse, torch.empty_like(lse)


def _self_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[0])


def _self_backward(ctx, grad_lse, grad_pos):
    z, scale, lse = ctx.saved_tensors
    half = z.shape[0] // 2
    stats = (lse, torch.zeros_like(lse) if grad_lse is None else grad_lse, grad_pos)
    dz = lse_bwd_op(z, z, scale, *stats, *stats, True, 0, 0, half, 2 * half)
    dscale = (z.float() * dz).sum() / (2 * scale) if ctx.needs_input_grad[1] else None
    return dz.to(z.dtype), dscale


nt_xent_lse = define("nt_xent_lse", _self_lse, fake=_lse_fake, backward=_self_backward, setup_context=_self_setup)


# Across ranks: local rows against all ranks' views; row r's self is column offset + r, its positive is
# column offset + (r + N_local) % (2 N_local).
def _rows_lse(z: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, offset: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    half = z.shape[0] // 2
    return lse_forward(z, keys, scale, self_offset=offset, positive=(offset, half, 2 * half))


def _rows_setup(ctx, inputs, output):
    z, keys, scale, offset = inputs
    ctx.save_for_backward(z, keys, scale, output[0])
    ctx.offset = offset


def _rows_backward(ctx, grad_lse, grad_pos):
    z, keys, scale, lse = ctx.saved_tensors
    need_z, need_keys, need_scale = ctx.needs_input_grad[:3]
    half, offset = z.shape[0] // 2, ctx.offset
    stats = (lse, torch.zeros_like(lse) if grad_lse is None else grad_lse, grad_pos)
    none = (None, None, None)
    dz = dkeys = dscale = None
    if need_z or need_scale:
        dz = lse_bwd_op(z, keys, scale, *stats, *none, True, offset, offset, half, 2 * half)
        dscale = (z.float() * dz).sum() / scale if need_scale else None
        dz = dz.to(z.dtype) if need_z else None
    if need_keys:
        dkeys = lse_bwd_op(keys, z, scale, *none, *stats, True, -offset, offset, half, 2 * half).to(keys.dtype)
    return dz, dkeys, dscale, None


nt_xent_lse_rows = define("nt_xent_lse_rows", _rows_lse, fake=_lse_fake, backward=_rows_backward,
                          setup_context=_rows_setup)


def nt_xent_triton(z1, z2, temperature, group) -> torch.Tensor:
    scale = inverse_temperature(temperature, z1.device)
    z = _views(z1, z2, z1.dtype)
    if group is None:
        lse, pos = nt_xent_lse(z, scale)
    else:
        lse, pos = nt_xent_lse_rows(z, gather_with_grad(z, group), scale, rank_in(group) * z.shape[0])
    return (lse - pos).mean()


_OP = define_op("nt_xent", reference=Impl(nt_xent_ref), triton=Impl(nt_xent_triton, triton_supports))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float | torch.Tensor, *,
            group: torch.distributed.ProcessGroup | None = None, backend: Optional[str] = None) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views of N samples (inputs are L2-normalised inside).

    Args:
        z1, z2: [N, d] projections of two views of the same N samples (same dtype and device).
        temperature: a float > 0 or a 0-dim floating tensor (may require grad), as for ``info_nce``.
        group: a torch.distributed process group: negatives come from the views of all its ranks. Each rank
            returns the mean over its own 2N rows; average gradients over ranks (DDP), as for ``info_nce``.
        backend: "auto" | "reference" | "triton" (None: the process default, ``set_backend``).
    Returns:
        a 0-dim loss: fp32 (float64 for float64 inputs).

    Backends: reference (materialises the [2N, 2N] logits, [2N, 2WN] with a group of W ranks); triton (info_nce's
    kernels with the self-similarity excluded: O(N d) memory, one fused backward pass). No CUDA-extension kernel.
    Dtypes: float32, float16, bfloat16 (fp32 accumulation, fp32 loss); float64 on the reference only.
    Limits: the Triton kernels need d <= 2048 (``auto`` falls back to the reference above it). N >= 1; with a
    group, every rank must hold the same N.
    """
    check_pair(("z1", "z2"), z1, z2)
    check_temperature(temperature, z1.device)
    return _OP(backend, z1.device, z1, z2, temperature, group)
