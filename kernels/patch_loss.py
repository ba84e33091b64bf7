"""MAE's reconstruction loss with per-patch normalised targets (``forward_loss``).

For each patch with target t (P values) and prediction y:
    t_hat = (t - mean(t)) / sqrt(var(t) + eps)     (unbiased var, eps inside the sqrt)
    per_patch = mean((y - t_hat)^2)
    loss = sum(per_patch * mask) / max(sum(mask), 1)
Gradient: d loss / d y = 2 (y - t_hat) / P * mask / max(sum(mask), 1). Computed in fp32.
"""
from __future__ import annotations

import torch

from . import _cuda
from ._backend import Impl, cuda_reason, define_op, triton_reason
from ._custom_op import define_with_grad
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, check_shape, check_tensor, compute_dtype
from .patchify import patchify


def normalize_patches(target: torch.Tensor, eps: float) -> torch.Tensor:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps) ** 0.5


def patch_loss_ref(pred, target, mask, norm_pix: bool, eps: float):
    dtype = compute_dtype(pred.dtype, target.dtype)  # fp32, or float64 for a float64 input
    pred, target = pred.to(dtype), target.to(dtype)
    if norm_pix:
        target = normalize_patches(target, eps)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    weight = mask.to(dtype)
    # a mask with no masked patch (mask_ratio 0) gives loss 0, not 0/0
    loss = (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, per_patch


# ---------------------------------------------------------------------------------------------
# Triton kernels.
#
# Forward, per row r = (b, l) of P values, all math in fp32:
#     mu = sum(t) / P,  var = sum((t - mu)^2) / (P - 1),  t_hat = (t - mu) / sqrt(var + eps)
#     diff = y - t_hat,  per_patch = sum(diff^2) / P
# Backward. With w = mask, n = max(sum(w), 1), g = grad of loss, g_r = grad of per_patch[r]:
#     d per_patch[r] / d y = 2 diff / P   and   d loss / d per_patch[r] = w_r / n, so
#     grad_y[r] = (g * w_r / n + g_r) * 2 diff[r] / P.
# Nothing is stored between the passes: the backward re-reads pred and target and recomputes diff with
# the forward's own code (bitwise the same diff). The forward then moves only the bytes it must
# (pred and target read once: at the benchmark's byte count its ceiling is 100 % of bandwidth, against
# 75 % when it also wrote diff), and no [B, L, P] buffer stays alive between forward and backward.
# Bytes per element, bf16 pred and fp32 target: forward 6, backward 6 read + 2 written (14 in all; storing
# diff was 8 + 4 = 12), but the target can be read straight from the image (``patch_size``): t[b, l, j]
# is a pixel of imgs[b] (patchify's (row, col, channel) order inside the patch), which saves the
# patchify copy of the target (4 read + 4 written per element in fp32) that every step made before.
# The scalar loss is summed deterministically: each program writes one partial of
# sum(per_patch * w) and of sum(w), and a one-program kernel adds them in a fixed order.
# ---------------------------------------------------------------------------------------------

_MAX_SINGLE_BLOCK = 8192   # widest patch kept in registers in one piece
_CHUNK = 4096              # chunk width for wider patches (three passes over the row)
_TILE = 4096               # rows per program: as many as fit a tile of this many values


@triton.jit
def _target_base(b, l, stride_t0, stride_t1, stride_t2, stride_t3, grid_w, PATCH: tl.constexpr):
    """Offset of row (b, l)'s first target value: a [B, L, P] tensor (PATCH 0) or patch l of image b."""
    if PATCH == 0:
        return b * stride_t0 + l * stride_t1
    else:
        return b * stride_t0 + (l // grid_w) * PATCH * stride_t2 + (l % grid_w) * PATCH * stride_t3


@triton.jit
def _target_cols(offs, stride_t1, stride_t2, stride_t3, PATCH: tl.constexpr, CHANNELS: tl.constexpr):
    """Offsets of values ``offs`` of a row: strided in P, or (row, col, channel) of an NCHW patch."""
    if PATCH == 0:
        return offs * stride_t2
    else:
        pixel = offs // CHANNELS
        return (offs % CHANNELS) * stride_t1 + (pixel // PATCH) * stride_t2 + (pixel % PATCH) * stride_t3


@triton.jit
def _row_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, cols, patch_dim, eps,
              stride_pp, stride_t1, stride_t2, stride_t3,
              NORM_PIX: tl.constexpr, PATCH: tl.constexpr, CHANNELS: tl.constexpr):
    """diff = y - t_hat of rows that fit one tile (0 outside the patch), statistics from the tile in registers."""
    ok = row_ok[:, None] & (cols < patch_dim)
    t = tl.load(target_ptr + target_row + _target_cols(cols, stride_t1, stride_t2, stride_t3, PATCH, CHANNELS),
                mask=ok, other=0.0).to(tl.float32)
    y = tl.load(pred_ptr + pred_row + cols * stride_pp, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / patch_dim
        t = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(t * t, axis=1) / (patch_dim - 1)
        var = tl.where(row_ok, var, 1.0)   # padding rows: no 0/0 when eps == 0
        t = t / tl.sqrt(var + eps)[:, None]
    return tl.where(ok, y - t, 0.0)


@triton.jit
def _row_stats(target_ptr, target_row, row_ok, cols, patch_dim, eps, stride_t1, stride_t2, stride_t3,
               NORM_PIX: tl.constexpr, PATCH: tl.constexpr, CHANNELS: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_P: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """(mean, 1 / std) of rows too wide for registers, in two streaming passes (0 and 1 without NORM_PIX)."""
    mean = tl.zeros([ROWS], dtype=tl.float32)
    rstd = tl.full([ROWS], 1.0, dtype=tl.float32)
    if NORM_PIX:
        acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = cols + c * BLOCK_P
            ok = row_ok[:, None] & (offs < patch_dim)
            acc += tl.load(target_ptr + target_row + _target_cols(offs, stride_t1, stride_t2, stride_t3, PATCH,
                                                                  CHANNELS), mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / patch_dim
        acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = cols + c * BLOCK_P
            ok = row_ok[:, None] & (offs < patch_dim)
            t = tl.load(target_ptr + target_row + _target_cols(offs, stride_t1, stride_t2, stride_t3, PATCH,
                                                               CHANNELS), mask=ok, other=0.0)
            t = tl.where(ok, t.to(tl.float32) - mean[:, None], 0.0)
            acc += t * t
        var = tl.where(row_ok, tl.sum(acc, axis=1) / (patch_dim - 1), 1.0)
        rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd


@triton.jit
def _chunk_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, offs, patch_dim, mean, rstd,
                stride_pp, stride_t1, stride_t2, stride_t3, PATCH: tl.constexpr, CHANNELS: tl.constexpr):
    """diff = y - t_hat of one chunk of wide rows, given their statistics."""
    ok = row_ok[:, None] & (offs < patch_dim)
    t = tl.load(target_ptr + target_row + _target_cols(offs, stride_t1, stride_t2, stride_t3, PATCH, CHANNELS),
                mask=ok, other=0.0).to(tl.float32)
    y = tl.load(pred_ptr + pred_row + offs * stride_pp, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, y - (t - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _patch_loss_fwd_kernel(pred_ptr, target_ptr, mask_ptr, per_patch_ptr, part_loss_ptr, part_weight_ptr,
                           num_rows, num_patches, patch_dim, eps, grid_w,
                           stride_pb, stride_pl, stride_pp, stride_t0, stride_t1, stride_t2, stride_t3,
                           stride_mb, stride_ml,
                           NORM_PIX: tl.constexpr, PATCH: tl.constexpr, CHANNELS: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_P: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    b = rows // num_patches
    l = rows % num_patches
    pred_row = (b * stride_pb + l * stride_pl)[:, None]
    target_row = _target_base(b, l, stride_t0, stride_t1, stride_t2, stride_t3, grid_w, PATCH)[:, None]
    cols = tl.arange(0, BLOCK_P)[None, :]
    if NUM_CHUNKS == 1:
        diff = _row_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, cols, patch_dim, eps, stride_pp,
                         stride_t1, stride_t2, stride_t3, NORM_PIX, PATCH, CHANNELS)
        sq_sum = tl.sum(diff * diff, axis=1)
    else:  # patches too wide for registers: statistics first, then the loss, re-reading the row
        mean, rstd = _row_stats(target_ptr, target_row, row_ok, cols, patch_dim, eps, stride_t1, stride_t2,
                                stride_t3, NORM_PIX, PATCH, CHANNELS, ROWS, BLOCK_P, NUM_CHUNKS)
        acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            diff = _chunk_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, cols + c * BLOCK_P, patch_dim,
                               mean, rstd, stride_pp, stride_t1, stride_t2, stride_t3, PATCH, CHANNELS)
            acc += diff * diff
        sq_sum = tl.sum(acc, axis=1)

    per_patch = sq_sum / patch_dim
    tl.store(per_patch_ptr + rows, per_patch, mask=row_ok)
    w = tl.load(mask_ptr + b * stride_mb + l * stride_ml, mask=row_ok, other=0).to(tl.float32)
    tl.store(part_loss_ptr + pid, tl.sum(tl.where(row_ok, per_patch * w, 0.0), axis=0))
    tl.store(part_weight_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _patch_loss_finish_kernel(part_loss_ptr, part_weight_ptr, loss_ptr, count_ptr, num_parts,
                              BLOCK: tl.constexpr):
    # one program: a fixed summation order makes the loss bitwise reproducible
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    weight = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        loss += tl.load(part_loss_ptr + offs, mask=offs < num_parts, other=0.0)
        weight += tl.load(part_weight_ptr + offs, mask=offs < num_parts, other=0.0)
    count = tl.maximum(tl.sum(weight, axis=0), 1.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0) / count)
    tl.store(count_ptr, count)


@triton.jit
def _patch_loss_bwd_kernel(pred_ptr, target_ptr, mask_ptr, grad_loss_ptr, count_ptr, grad_per_patch_ptr,
                           grad_pred_ptr, num_rows, num_patches, patch_dim, eps, grid_w,
                           stride_pb, stride_pl, stride_pp, stride_t0, stride_t1, stride_t2, stride_t3,
                           stride_mb, stride_ml,
                           NORM_PIX: tl.constexpr, PATCH: tl.constexpr, CHANNELS: tl.constexpr,
                           HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_PER_PATCH: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_P: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    b = rows // num_patches
    l = rows % num_patches
    scale = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_GRAD_LOSS:
        w = tl.load(mask_ptr + b * stride_mb + l * stride_ml, mask=row_ok, other=0).to(tl.float32)
        scale += w * (tl.load(grad_loss_ptr) / tl.load(count_ptr))
    if HAS_GRAD_PER_PATCH:
        scale += tl.load(grad_per_patch_ptr + rows, mask=row_ok, other=0.0)
    scale = (scale * (2.0 / patch_dim))[:, None]
    pred_row = (b * stride_pb + l * stride_pl)[:, None]
    target_row = _target_base(b, l, stride_t0, stride_t1, stride_t2, stride_t3, grid_w, PATCH)[:, None]
    grad_row = (rows * patch_dim)[:, None]
    cols = tl.arange(0, BLOCK_P)[None, :]
    if NUM_CHUNKS == 1:
        diff = _row_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, cols, patch_dim, eps, stride_pp,
                         stride_t1, stride_t2, stride_t3, NORM_PIX, PATCH, CHANNELS)
        tl.store(grad_pred_ptr + grad_row + cols, (diff * scale).to(grad_pred_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < patch_dim))
    else:
        mean, rstd = _row_stats(target_ptr, target_row, row_ok, cols, patch_dim, eps, stride_t1, stride_t2,
                                stride_t3, NORM_PIX, PATCH, CHANNELS, ROWS, BLOCK_P, NUM_CHUNKS)
        for c in range(NUM_CHUNKS):
            offs = cols + c * BLOCK_P
            diff = _chunk_diff(pred_ptr, pred_row, target_ptr, target_row, row_ok, offs, patch_dim, mean, rstd,
                               stride_pp, stride_t1, stride_t2, stride_t3, PATCH, CHANNELS)
            tl.store(grad_pred_ptr + grad_row + offs, (diff * scale).to(grad_pred_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (offs < patch_dim))


def _layout(patch_dim: int) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_P, NUM_CHUNKS, num_warps) for patches of ``patch_dim`` values."""
    block = triton.next_power_of_2(max(patch_dim, 1))
    if block <= _MAX_SINGLE_BLOCK:
        rows = max(1, min(128, _TILE // block))
        return rows, block, 1, 8 if block >= 4096 else 4
    return 1, _CHUNK, triton.cdiv(patch_dim, _CHUNK), 8


def _as_loadable(mask: torch.Tensor) -> torch.Tensor:
    # bool tensors are read as bytes (a free reinterpretation), so kernels see 0/1 values
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _target_args(target: torch.Tensor, patch_size: int) -> tuple:
    """(4 strides, grid_w, PATCH, CHANNELS): a [B, L, P] target (patch_size 0) or a [B, C, H, W] image."""
    if patch_size:
        return (*target.stride(), target.shape[3] // patch_size, patch_size, target.shape[1])
    return (*target.stride(), 0, 1, 0, 1)


def _launch_args(pred, target, mask, patch_size):
    """The shape, layout, strides and constexprs both kernels take."""
    batch, num_patches, patch_dim = pred.shape
    num_rows = batch * num_patches
    rows, block, chunks, warps = _layout(patch_dim)
    *target_strides, grid_w, patch, channels = _target_args(target, patch_size)
    strides = (*pred.stride(), *target_strides, *mask.stride())
    meta = {"PATCH": patch, "CHANNELS": channels, "ROWS": rows, "BLOCK_P": block, "NUM_CHUNKS": chunks,
            "num_warps": warps}
    return num_rows, num_patches, patch_dim, grid_w, max(triton.cdiv(num_rows, rows), 1), strides, meta


def patch_loss_fwd(pred, target, mask, norm_pix: bool, eps: float, patch_size: int = 0):
    """Launch the forward: (loss, per_patch, count = max(sum(mask), 1)). ``patch_size`` > 0: target is the
    [B, C, H, W] image whose patchify would be the [B, L, P] target."""
    mask = _as_loadable(mask)
    num_rows, num_patches, patch_dim, grid_w, grid, strides, meta = _launch_args(pred, target, mask, patch_size)
    per_patch = torch.empty(pred.shape[:2], device=pred.device, dtype=torch.float32)
    parts = torch.empty(2, grid, device=pred.device, dtype=torch.float32)
    _patch_loss_fwd_kernel[(grid,)](
        pred, target, mask, per_patch, parts[0], parts[1], num_rows, num_patches, patch_dim, eps, grid_w,
        *strides, NORM_PIX=norm_pix, **meta)
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    count = torch.empty((), device=pred.device, dtype=torch.float32)
    _patch_loss_finish_kernel[(1,)](parts[0], parts[1], loss, count, grid, BLOCK=1024, num_warps=4)
    return loss, per_patch, count


def patch_loss_bwd(pred, target, mask, grad_loss, count, grad_per_patch, norm_pix: bool, eps: float,
                   patch_size: int = 0):
    """Launch the backward: grad of pred (contiguous, pred's dtype), diff recomputed; either grad may be None."""
    mask = _as_loadable(mask)
    num_rows, num_patches, patch_dim, grid_w, grid, strides, meta = _launch_args(pred, target, mask, patch_size)
    grad_pred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    if grad_per_patch is not None:
        grad_per_patch = grad_per_patch.float().contiguous()
    _patch_loss_bwd_kernel[(grid,)](
        pred, target, mask, grad_loss if grad_loss is not None else count, count,
        grad_per_patch if grad_per_patch is not None else count, grad_pred,
        num_rows, num_patches, patch_dim, eps, grid_w, *strides, NORM_PIX=norm_pix,
        HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_PER_PATCH=grad_per_patch is not None, **meta)
    return grad_pred


# ---------------------------------------------------------------------------------------------
# Autograd binding, as custom ops so that torch.compile treats them as opaque nodes.
# Triton: sslpt::patch_loss_triton (loss, per_patch, count) saves its inputs, and the backward op
# sslpt::patch_loss_triton_bwd recomputes diff from them.
# ---------------------------------------------------------------------------------------------

def _triton_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool, eps: float,
                patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return patch_loss_fwd(pred, target, mask, norm_pix, eps, patch_size)


def _triton_fake(pred, target, mask, norm_pix, eps, patch_size):
    scalar = pred.new_empty((), dtype=torch.float32)
    return scalar, pred.new_empty(pred.shape[:2], dtype=torch.float32), torch.empty_like(scalar)


def _triton_bwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor | None,
                count: torch.Tensor, grad_per_patch: torch.Tensor | None, norm_pix: bool, eps: float,
                patch_size: int) -> torch.Tensor:
    return patch_loss_bwd(pred, target, mask, grad_loss, count, grad_per_patch, norm_pix, eps, patch_size)


def _triton_setup_context(ctx, inputs, output):
    pred, target, mask, norm_pix, eps, patch_size = inputs
    ctx.save_for_backward(pred, target, mask, output[2])
    ctx.norm_pix, ctx.eps, ctx.patch_size = norm_pix, eps, patch_size
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)   # an unused per_patch then gives None: no zeros to read


def _triton_backward(grad_op, ctx, grad_loss, grad_per_patch, _grad_count):
    pred, target, mask, count = ctx.saved_tensors
    if (grad_loss is None and grad_per_patch is None) or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    grad = grad_op(pred, target, mask, grad_loss, count, grad_per_patch, ctx.norm_pix, ctx.eps, ctx.patch_size)
    return grad, None, None, None, None, None


_patch_loss_op, _patch_loss_bwd_op = define_with_grad(
    "patch_loss_triton", _triton_fwd, _triton_bwd, fake=_triton_fake,
    grad_fake=lambda pred, *_: pred.new_empty(pred.shape), backward=_triton_backward,
    setup_context=_triton_setup_context)


def patch_loss_triton(pred, target, mask, norm_pix: bool, eps: float, patch_size: int | None = None):
    loss, per_patch, _ = _patch_loss_op(pred, target, mask, norm_pix, eps, int(patch_size or 0))
    return loss, per_patch


# ---------------------------------------------------------------------------------------------
# CUDA binding: the forward stores diff and the backward rescales it (csrc/patch_loss.cu).
# ---------------------------------------------------------------------------------------------

def _fake(pred, target, mask, norm_pix, eps, store_diff):
    batch, num_patches, _ = pred.shape
    scalar = pred.new_empty((), dtype=torch.float32)
    diff = pred.new_empty(pred.shape if store_diff else (0,))
    return scalar, pred.new_empty(batch, num_patches, dtype=torch.float32), diff, torch.empty_like(scalar)


def _grad_fake(diff, mask, grad_loss, count, grad_per_patch):
    return torch.empty_like(diff)


def _setup_context(ctx, inputs, output):
    _, _, mask, _, _, store_diff = inputs
    _, _, diff, count = output
    if not store_diff:
        raise RuntimeError("patch_loss: the forward ran without storing its gradient (pred did not require grad)")
    ctx.save_for_backward(diff, mask, count)
    ctx.mark_non_differentiable(diff, count)
    ctx.set_materialize_grads(False)   # an unused per_patch then gives None: no zeros to read


def _backward(grad_op, ctx, grad_loss, grad_per_patch, _grad_diff, _grad_count):
    diff, mask, count = ctx.saved_tensors
    if grad_loss is None and grad_per_patch is None:
        return None, None, None, None, None, None
    return grad_op(diff, mask, grad_loss, count, grad_per_patch), None, None, None, None, None


def _bind(name: str, forward, grad):
    """sslpt::<name> (loss, per_patch, diff, count) and sslpt::<name>_bwd (grad of pred from diff)."""
    return define_with_grad(name, forward, grad, fake=_fake, grad_fake=_grad_fake, backward=_backward,
                            setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# CUDA (csrc/patch_loss.cu): the forward stores diff and the backward rescales it, one warp per patch,
# 4-wide loads, deterministic partial sums. An image target is patchified first (one copy).
# ---------------------------------------------------------------------------------------------

def _cuda_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool, eps: float,
              store_diff: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pred, target = _cuda.unit_last(pred), _cuda.unit_last(target)
    batch, num_patches, _ = pred.shape
    per_patch = torch.empty(batch, num_patches, device=pred.device, dtype=torch.float32)
    diff = torch.empty(pred.shape if store_diff else (0,), device=pred.device, dtype=pred.dtype)
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    count = torch.empty((), device=pred.device, dtype=torch.float32)
    _cuda.load().patch_loss_fwd(pred, target, mask, per_patch, diff if store_diff else None, loss, count, norm_pix,
                                eps, _cuda.stream(pred))
    return loss, per_patch, diff, count


def _cuda_bwd(diff: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor | None, count: torch.Tensor,
              grad_per_patch: torch.Tensor | None) -> torch.Tensor:
    grad_pred = torch.empty_like(diff)
    _cuda.load().patch_loss_bwd(diff, mask, None if grad_loss is None else grad_loss.float(), count,
                                None if grad_per_patch is None else grad_per_patch.float().contiguous(), grad_pred,
                                _cuda.stream(diff))
    return grad_pred


_patch_loss_cuda_op, _patch_loss_cuda_bwd_op = _bind("patch_loss_cuda", _cuda_fwd, _cuda_bwd)


def patch_loss_cuda(pred, target, mask, norm_pix: bool, eps: float, patch_size: int | None = None):
    if patch_size:
        target = patchify(target, patch_size)
    store_diff = torch.is_grad_enabled() and pred.requires_grad
    loss, per_patch, _, _ = _patch_loss_cuda_op(pred, target, mask, norm_pix, eps, store_diff)
    return loss, per_patch


def _patch_loss_ref_any(pred, target, mask, norm_pix: bool, eps: float, patch_size: int | None = None):
    """The reference, given a [B, L, P] target or (patch_size) the images."""
    return patch_loss_ref(pred, patchify(target, patch_size) if patch_size else target, mask, norm_pix, eps)


_OP = define_op(
    "patch_loss",
    reference=Impl(_patch_loss_ref_any),
    triton=Impl(patch_loss_triton, lambda device, pred, target, *_: triton_reason(device, pred, target)),
    cuda=Impl(patch_loss_cuda, lambda device, pred, target, *_: cuda_reason(device, pred, target)),
)


def patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
               eps: float = 1e-6, *, patch_size: int | None = None,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch (normalised-)pixel MSE and its mean over the masked patches.

    Args:
        pred: [B, L, P] predicted patches.
        target: [B, L, P] target patches (``patchify(imgs, p)``); never receives gradient. With ``patch_size``,
            the [B, C, H, W] images themselves: the Triton kernels then read each target patch straight from
            the image (no patchified copy); the reference and CUDA backends patchify it first.
        mask: [B, L] bool or float, True/1 = masked (counted in the loss); never receives gradient.
        norm_pix: normalise each target patch by its own mean and unbiased variance.
        eps: added to the variance inside the square root (norm_pix).
        patch_size: p, when ``target`` is the image (P = C * p * p, L = (H / p) * (W / p)); None: target is
            already [B, L, P].
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        (loss, per_patch): a scalar and [B, L], both fp32 (float64 where pred or target is float64).

    Backends: reference (fp32 torch ops; keeps fp32 copies of pred and target and the squared errors alive
    for autograd); triton (one pass over pred and target in the forward, nothing stored for the backward,
    which re-reads them and recomputes y - t_hat); cuda (the forward stores y - t_hat in pred's dtype when pred
    requires grad, and the backward only rescales it). Both sum the loss from partials in a fixed order.
    Dtypes: pred and target float32, float16 or bfloat16, independently (e.g. bf16 pred, fp32 target), fp32
    accumulation; float64 on the reference only. mask bool or any of those float dtypes.
    Limits: P >= 2 with norm_pix; any P otherwise (the kernels hold a patch of up to 8192 values in registers and
    stream wider ones in chunks of 4096).
    """
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dtypes=FLOAT_DTYPES, device=pred.device)
    if patch_size is None:
        check_shape("target", target, pred.shape)
    else:
        _check_image_target(pred, target, patch_size)
        patch_size = int(patch_size)
    check_tensor("mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES), device=pred.device)
    check_shape("mask", mask, pred.shape[:2])
    if norm_pix and pred.shape[-1] < 2:
        raise ValueError("norm_pix=True needs at least 2 values per patch (unbiased variance); "
                         f"pred has P={pred.shape[-1]}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _OP(backend, pred.device, pred, target.detach(), mask.detach(), bool(norm_pix), float(eps), patch_size)


def _check_image_target(pred: torch.Tensor, imgs: torch.Tensor, patch_size) -> None:
    """``imgs`` [B, C, H, W] must patchify (patch ``patch_size``) to pred's [B, L, P]."""
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    p = int(patch_size)
    if imgs.dim() != 4:
        raise ValueError(f"target must be [B, C, H, W] images with patch_size, got shape {list(imgs.shape)}")
    batch, channels, height, width = imgs.shape
    if height % p or width % p:
        raise ValueError(f"patch_size={p} must divide the image size, got {height}x{width}")
    wanted = [batch, (height // p) * (width // p), channels * p * p]
    if list(pred.shape) != wanted:
        raise ValueError(f"target images {list(imgs.shape)} with patch_size={p} patchify to {wanted}, "
                         f"but pred has shape {list(pred.shape)}")

