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
# The forward stores diff (the Liger-Kernel pattern: the expensive part of the gradient is
# computed while pred and target are in registers) and the backward only rescales rows.
# Bytes per element with bf16 pred and an fp32 target (the usual patchify of fp32 images):
#     store diff:    forward 2 + 4 read, 2 written;  backward 2 read, 2 written  -> 12
#     recompute:     forward 2 + 4 read;             backward 2 + 4 read, 2 written -> 14
# and a bf16 target ties (10 vs 10). Storing also keeps less alive between forward and backward
# (diff, 2 bytes, instead of pred and target, 6). diff is stored in pred's dtype, the dtype the
# gradient ends in anyway (fp32 would cost 4 more bytes per element), and unscaled: 2 diff / P
# would fall into fp16's subnormal range for small errors before the loss scale is applied.
# The scalar loss is summed deterministically: each program writes one partial of
# sum(per_patch * w) and of sum(w), and a one-program kernel adds them in a fixed order.
# ---------------------------------------------------------------------------------------------

_MAX_SINGLE_BLOCK = 8192   # widest patch kept in registers in one piece
_CHUNK = 4096              # chunk width for wider patches (three passes over the row)
_TILE = 4096               # rows per program: as many as fit a tile of this many values


@triton.jit
def _patch_loss_fwd_kernel(pred_ptr, target_ptr, mask_ptr, per_patch_ptr, diff_ptr, part_loss_ptr, part_weight_ptr,
                           num_rows, num_patches, patch_dim, eps,
                           stride_pb, stride_pl, stride_pp, stride_tb, stride_tl, stride_tp, stride_mb, stride_ml,
                           NORM_PIX: tl.constexpr, STORE_DIFF: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_P: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    b = rows // num_patches
    l = rows % num_patches
    pred_row = (b * stride_pb + l * stride_pl)[:, None]
    target_row = (b * stride_tb + l * stride_tl)[:, None]
    diff_row = (rows * patch_dim)[:, None]
    cols = tl.arange(0, BLOCK_P)[None, :]

    if NUM_CHUNKS == 1:
        ok = row_ok[:, None] & (cols < patch_dim)
        t = tl.load(target_ptr + target_row + cols * stride_tp, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(pred_ptr + pred_row + cols * stride_pp, mask=ok, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(t, axis=1) / patch_dim
            t = tl.where(ok, t - mean[:, None], 0.0)
            var = tl.sum(t * t, axis=1) / (patch_dim - 1)
            var = tl.where(row_ok, var, 1.0)   # padding rows: no 0/0 when eps == 0
            t = t / tl.sqrt(var + eps)[:, None]
        diff = tl.where(ok, y - t, 0.0)
        sq_sum = tl.sum(diff * diff, axis=1)
        if STORE_DIFF:
            tl.store(diff_ptr + diff_row + cols, diff.to(diff_ptr.dtype.element_ty), mask=ok)
    else:
        # patches too wide for registers: statistics first, then the loss, re-reading the row
        mean = tl.zeros([ROWS], dtype=tl.float32)
        rstd = tl.full([ROWS], 1.0, dtype=tl.float32)
        if NORM_PIX:
            acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                ok = row_ok[:, None] & (cols + c * BLOCK_P < patch_dim)
                acc += tl.load(target_ptr + target_row + (cols + c * BLOCK_P) * stride_tp, mask=ok,
                               other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=1) / patch_dim
            acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                ok = row_ok[:, None] & (cols + c * BLOCK_P < patch_dim)
                t = tl.load(target_ptr + target_row + (cols + c * BLOCK_P) * stride_tp, mask=ok, other=0.0)
                t = tl.where(ok, t.to(tl.float32) - mean[:, None], 0.0)
                acc += t * t
            var = tl.where(row_ok, tl.sum(acc, axis=1) / (patch_dim - 1), 1.0)
            rstd = 1.0 / tl.sqrt(var + eps)
        acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = cols + c * BLOCK_P
            ok = row_ok[:, None] & (offs < patch_dim)
            t = tl.load(target_ptr + target_row + offs * stride_tp, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(pred_ptr + pred_row + offs * stride_pp, mask=ok, other=0.0).to(tl.float32)
            diff = tl.where(ok, y - (t - mean[:, None]) * rstd[:, None], 0.0)
            acc += diff * diff
            if STORE_DIFF:
                tl.store(diff_ptr + diff_row + offs, diff.to(diff_ptr.dtype.element_ty), mask=ok)
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
def _patch_loss_bwd_kernel(diff_ptr, mask_ptr, grad_loss_ptr, count_ptr, grad_per_patch_ptr, grad_pred_ptr,
                           num_rows, num_patches, patch_dim, stride_mb, stride_ml,
                           HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_PER_PATCH: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_P: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    scale = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_GRAD_LOSS:
        w = tl.load(mask_ptr + (rows // num_patches) * stride_mb + (rows % num_patches) * stride_ml,
                    mask=row_ok, other=0).to(tl.float32)
        scale += w * (tl.load(grad_loss_ptr) / tl.load(count_ptr))
    if HAS_GRAD_PER_PATCH:
        scale += tl.load(grad_per_patch_ptr + rows, mask=row_ok, other=0.0)
    scale = scale * (2.0 / patch_dim)
    row = (rows * patch_dim)[:, None]
    cols = tl.arange(0, BLOCK_P)[None, :]
    for c in range(NUM_CHUNKS):
        offs = row + cols + c * BLOCK_P
        ok = row_ok[:, None] & (cols + c * BLOCK_P < patch_dim)
        diff = tl.load(diff_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_pred_ptr + offs, (diff * scale[:, None]).to(grad_pred_ptr.dtype.element_ty), mask=ok)


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


def patch_loss_fwd(pred, target, mask, norm_pix: bool, eps: float, store_diff: bool):
    """Launch the forward: (loss, per_patch, diff or an empty tensor, count = max(sum(mask), 1))."""
    batch, num_patches, patch_dim = pred.shape
    num_rows = batch * num_patches
    rows, block, chunks, warps = _layout(patch_dim)
    grid = max(triton.cdiv(num_rows, rows), 1)
    per_patch = torch.empty(batch, num_patches, device=pred.device, dtype=torch.float32)
    diff = torch.empty((batch, num_patches, patch_dim) if store_diff else (0,), device=pred.device, dtype=pred.dtype)
    parts = torch.empty(2, grid, device=pred.device, dtype=torch.float32)
    mask = _as_loadable(mask)
    _patch_loss_fwd_kernel[(grid,)](
        pred, target, mask, per_patch, diff, parts[0], parts[1], num_rows, num_patches, patch_dim, eps,
        *pred.stride(), *target.stride(), *mask.stride(),
        NORM_PIX=norm_pix, STORE_DIFF=store_diff, ROWS=rows, BLOCK_P=block, NUM_CHUNKS=chunks, num_warps=warps)
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    count = torch.empty((), device=pred.device, dtype=torch.float32)
    _patch_loss_finish_kernel[(1,)](parts[0], parts[1], loss, count, grid, BLOCK=1024, num_warps=4)
    return loss, per_patch, diff, count


def patch_loss_bwd(diff, mask, grad_loss, count, grad_per_patch):
    """Launch the backward: grad of pred from the stored diff; either grad may be None."""
    batch, num_patches, patch_dim = diff.shape
    num_rows = batch * num_patches
    rows, block, chunks, warps = _layout(patch_dim)
    grad_pred = torch.empty_like(diff)
    mask = _as_loadable(mask)
    if grad_per_patch is not None:
        grad_per_patch = grad_per_patch.float().contiguous()
    grid = max(triton.cdiv(num_rows, rows), 1)
    _patch_loss_bwd_kernel[(grid,)](
        diff, mask, grad_loss if grad_loss is not None else count, count,
        grad_per_patch if grad_per_patch is not None else count, grad_pred,
        num_rows, num_patches, patch_dim, *mask.stride(),
        HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_PER_PATCH=grad_per_patch is not None,
        ROWS=rows, BLOCK_P=block, NUM_CHUNKS=chunks, num_warps=warps)
    return grad_pred


# ---------------------------------------------------------------------------------------------
# Autograd binding, as custom ops so that torch.compile treats them as opaque nodes.
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


def _triton_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool, eps: float,
                store_diff: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return patch_loss_fwd(pred, target, mask, norm_pix, eps, store_diff)


def _triton_bwd(diff: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor | None, count: torch.Tensor,
                grad_per_patch: torch.Tensor | None) -> torch.Tensor:
    return patch_loss_bwd(diff, mask, grad_loss, count, grad_per_patch)


_patch_loss_op, _patch_loss_bwd_op = _bind("patch_loss_triton", _triton_fwd, _triton_bwd)


def patch_loss_triton(pred, target, mask, norm_pix: bool, eps: float):
    store_diff = torch.is_grad_enabled() and pred.requires_grad
    loss, per_patch, _, _ = _patch_loss_op(pred, target, mask, norm_pix, eps, store_diff)
    return loss, per_patch


# ---------------------------------------------------------------------------------------------
# CUDA (csrc/patch_loss.cu): the same split (forward stores diff, backward rescales it), one warp per
# patch, 4-wide loads, deterministic partial sums. Shares the Triton binding's fakes, setup_context and backward.
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


def patch_loss_cuda(pred, target, mask, norm_pix: bool, eps: float):
    store_diff = torch.is_grad_enabled() and pred.requires_grad
    loss, per_patch, _, _ = _patch_loss_cuda_op(pred, target, mask, norm_pix, eps, store_diff)
    return loss, per_patch


_OP = define_op(
    "patch_loss",
    reference=Impl(patch_loss_ref),
    triton=Impl(patch_loss_triton, lambda device, pred, target, *_: triton_reason(device, pred, target)),
    cuda=Impl(patch_loss_cuda, lambda device, pred, target, *_: cuda_reason(device, pred, target)),
)


def patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
               eps: float = 1e-6, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch (normalised-)pixel MSE and its mean over the masked patches.

    Args:
        pred: [B, L, P] predicted patches.
        target: [B, L, P] target patches (``patchify(imgs, p)``); never receives gradient.
        mask: [B, L] bool or float, True/1 = masked (counted in the loss); never receives gradient.
        norm_pix: normalise each target patch by its own mean and unbiased variance.
        eps: added to the variance inside the square root (norm_pix).
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        (loss, per_patch): a scalar and [B, L], both fp32 (float64 where pred or target is float64).

    Backends: reference (fp32 torch ops; keeps fp32 copies of pred and target and the squared errors alive
    for autograd); triton and cuda (one pass over pred and target; the forward stores y - t_hat in pred's
    dtype when pred requires grad, and the backward only rescales it; deterministic partial sums).
    Dtypes: pred and target float32, float16 or bfloat16, independently (e.g. bf16 pred, fp32 target), fp32
    accumulation; float64 on the reference only. mask bool or any of those float dtypes.
    Limits: P >= 2 with norm_pix; any P otherwise (the kernels hold a patch of up to 8192 values in registers and
    stream wider ones in chunks of 4096).
    """
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dtypes=FLOAT_DTYPES, device=pred.device)
    check_shape("target", target, pred.shape)
    check_tensor("mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES), device=pred.device)
    check_shape("mask", mask, pred.shape[:2])
    if norm_pix and pred.shape[-1] < 2:
        raise ValueError("norm_pix=True needs at least 2 values per patch (unbiased variance); "
                         f"pred has P={pred.shape[-1]}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _OP(backend, pred.device, pred, target.detach(), mask.detach(), bool(norm_pix), float(eps))
