"""Patch embedding of the visible patches only, straight from the image.

MAE embeds all L patches with a stride-p convolution and then keeps K of them; this op
patchifies only the K visible patches and projects them (a [B*K, p*p*C] x [p*p*C, D]
matmul instead of [B*L, ...]), then adds their position embedding:

    out[b, k] = patch(imgs[b], ids_keep[b, k]) @ W^T + bias + pos_embed[ids_keep[b, k]]

with W the conv weight [D, C, p, p] laid out as (row, col, channel) to match patchify (the
reference's layout; the Triton kernel reduces in the conv's own (channel, row, col) order, see below).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import Impl, define_op, triton_reason
from ._custom_op import define
from ._triton import INTERPRET, tl, triton
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_shape, check_tensor
from .gather_tokens import _gather_tokens_bwd_op, gather_tokens_ref
from .patchify import patchify
from .scatter_tokens import inverse_positions

# Every buffer a launcher fills comes from here; the tests swap in a NaN-filled allocator.
_alloc = torch.empty


def conv_weight_as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[D, C, p, p] conv weight -> [D, p*p*C] in patchify's (row, col, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def embed_visible_patches_ref(imgs, ids_keep, weight, bias, pos_embed, patch_size):
    patches = gather_tokens_ref(patchify(imgs, patch_size), ids_keep)  # [B, K, p*p*C]
    out = torch.nn.functional.linear(patches, conv_weight_as_matrix(weight), bias)
    return out + gather_tokens_ref(pos_embed.expand(imgs.shape[0], -1, -1), ids_keep).to(out.dtype)


# --- Triton ---------------------------------------------------------------------------------
# Forward: out = A @ Wm + bias + pos[ids], A[m, :] = pixels of visible patch m (m flattened over
# (b, k)), Wm[P, D] = the conv weight as a matrix, P = C*p*p. One program per (BLOCK_M patches,
# BLOCK_N features) loads A's tiles straight from the NCHW image: patch m starts at pixel
# (row (id // grid_w) * p, col (id % grid_w) * p) of image b. The reduction index runs in
# (channel, row, col) order, the conv weight's own layout: a patch row is then p contiguous
# pixels of the image (coalesced loads) and Wm is weight.reshape(D, P) transposed, a view with no
# copy. patchify's (row, col, channel) order would make consecutive elements a whole image plane
# apart. Order does not change the sum; accumulation is fp32, bias and pos are added in fp32 and
# the result is rounded once.
#
# Backward (dout = dL/dout, [B*K, D]):
#   dW    = dout^T @ A          (A re-gathered from the image by _embed_visible_patches_gather_kernel, torch mm)
#   dpos  = sum over b of dout[b, k] at position ids_keep[b, k], only for a learnable table (MAE's sin-cos
#           pos_embed is a frozen buffer: no dpos at all). _embed_visible_patches_bwd_kernel walks positions
#           through the inverse map; the batch is split into chunks (grid axis 2) so that the launch fills the
#           GPU (one chunk per program, in order), and the fp32 partials [S, L, D] are summed over S by torch:
#           a fixed order (deterministic, no atomics; index_add_ would use float atomics).
#   dbias = sum of all dout rows: a plain fp32 column reduction of dout when pos is frozen (bandwidth-bound,
#           no inverse map), else the sum over positions of the fp32 dpos.
#   dimgs = (dout @ Wm^T) put back at the visible patches, zero elsewhere (gather_tokens' backward op,
#           then a permute back to NCHW).


@triton.jit
def _embed_visible_patches_fwd_kernel(
        img_ptr, ids_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
        num_rows, num_keep, dim, patch_dim, grid_w,
        stride_ib, stride_ic, stride_ih, stride_iw, stride_wk, stride_wn, stride_pl, stride_pd,
        PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < dim
    patch = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    batch = (rows // num_keep).to(tl.int64)
    corner = batch * stride_ib + (patch // grid_w) * PATCH * stride_ih + (patch % grid_w) * PATCH * stride_iw
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, patch_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < patch_dim
        # kk -> (channel, row in patch, col in patch)
        offset = (kk // (PATCH * PATCH)) * stride_ic + ((kk // PATCH) % PATCH) * stride_ih + (kk % PATCH) * stride_iw
        a = tl.load(img_ptr + corner[:, None] + offset[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pos = tl.load(pos_ptr + patch[:, None] * stride_pl + cols[None, :] * stride_pd,
                  mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    acc += pos.to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _embed_visible_patches_gather_kernel(
        img_ptr, ids_ptr, out_ptr, num_rows, num_keep, patch_dim, grid_w,
        stride_ib, stride_ic, stride_ih, stride_iw,
        PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[m, :] = pixels of visible patch m in (channel, row, col) order, the forward's A tiles."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < num_rows
    k_ok = kk < patch_dim
    patch = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    batch = (rows // num_keep).to(tl.int64)
    corner = batch * stride_ib + (patch // grid_w) * PATCH * stride_ih + (patch % grid_w) * PATCH * stride_iw
    offset = (kk // (PATCH * PATCH)) * stride_ic + ((kk // PATCH) % PATCH) * stride_ih + (kk % PATCH) * stride_iw
    mask = row_ok[:, None] & k_ok[None, :]
    pixels = tl.load(img_ptr + corner[:, None] + offset[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * patch_dim + kk[None, :], pixels, mask=mask)


@triton.jit
def _embed_visible_patches_bwd_kernel(dout_ptr, inv_ptr, dpos_ptr, batch_size, batch_chunk, num_patches, num_keep,
                                      dim, stride_ob, stride_ok, stride_od,
                                      BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpos[s, l] = sum over b in chunk s of dout[b, inv[b, l]] (visible positions only), fp32, batch in order."""
    pos = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    pos_ok = pos < num_patches
    col_ok = cols < dim
    first = split * batch_chunk
    steps = tl.minimum(batch_chunk, batch_size - first)
    inv_ptr += first.to(tl.int64) * num_patches  # 64-bit pointers advance, rather than b * stride in int32
    dout_ptr += first.to(tl.int64) * stride_ob
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for _ in range(0, steps):
        k = tl.load(inv_ptr + pos, mask=pos_ok, other=-1)
        src = dout_ptr + k.to(tl.int64)[:, None] * stride_ok + cols[None, :] * stride_od
        grad = tl.load(src, mask=(k >= 0)[:, None] & col_ok[None, :], other=0.0)
        acc += grad.to(tl.float32)
        inv_ptr += num_patches
        dout_ptr += stride_ob
    out = dpos_ptr + split.to(tl.int64) * num_patches * dim + pos[:, None] * dim + cols[None, :]
    tl.store(out, acc, mask=pos_ok[:, None] & col_ok[None, :])


def _matmul_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's TF32 switch (off by default, like the reference's F.linear)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _embed_fwd(imgs, ids_keep, weight, bias, pos, patch_size):
    batch, _, _, width = imgs.shape
    dim = weight.shape[0]
    num_keep = ids_keep.shape[1]
    num_rows = batch * num_keep
    weight_t = weight.reshape(dim, -1).t()  # [P, D], (channel, row, col) order; a view when weight is contiguous
    patch_dim = weight_t.shape[0]
    out = _alloc((batch, num_keep, dim), dtype=imgs.dtype, device=imgs.device)
    if out.numel() == 0:
        return out
    block_m, block_n = 64, min(128, max(16, triton.next_power_of_2(dim)))
    block_k = min(64, max(16, triton.next_power_of_2(patch_dim)))
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(dim, block_n))
    pos2d = pos.reshape(pos.shape[-2], pos.shape[-1])
    _embed_visible_patches_fwd_kernel[grid](
        imgs, ids_keep, weight_t, bias if bias is not None else weight_t, pos2d, out,
        num_rows, num_keep, dim, patch_dim, width // patch_size,
        *imgs.stride(), *weight_t.stride(), *pos2d.stride(),
        PATCH=patch_size, HAS_BIAS=bias is not None, UPCAST=INTERPRET,
        PRECISION=_matmul_precision(imgs.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3)
    return out


# --- autograd binding -----------------------------------------------------------------------

def _embed_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  pos_embed: torch.Tensor, patch_size: int) -> torch.Tensor:
    bias = bias.contiguous() if bias is not None else None
    return _embed_fwd(imgs, ids_keep.contiguous(), weight, bias, pos_embed, patch_size)


def _embed_fake(imgs, ids_keep, weight, bias, pos_embed, patch_size):
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], weight.shape[0]))


def _gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B*K, C*p*p]: the visible patches' pixels in (channel, row, col) order."""
    batch, channels, _, width = imgs.shape
    ids_keep = ids_keep.contiguous()
    num_rows, patch_dim = batch * ids_keep.shape[1], channels * patch_size * patch_size
    out = _alloc((num_rows, patch_dim), dtype=imgs.dtype, device=imgs.device)
    if out.numel() == 0:
        return out
    block_m, block_k = 32, min(128, triton.next_power_of_2(patch_dim))
    _embed_visible_patches_gather_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(patch_dim, block_k))](
        imgs, ids_keep, out, num_rows, ids_keep.shape[1], patch_dim, width // patch_size, *imgs.stride(),
        PATCH=patch_size, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return out


_gather_patches_op = define(
    "embed_visible_patches_triton_patches", _gather_patches,
    fake=lambda imgs, ids_keep, p: imgs.new_empty((imgs.shape[0] * ids_keep.shape[1], imgs.shape[1] * p * p)))


# programs the dpos launch aims at: None = 4 per SM on a GPU (a handful under the interpreter)
_DPOS_PROGRAMS: Optional[int] = None


def _dpos_splits(batch: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(chunks S, batch rows per chunk): enough programs to fill the device, every chunk non-empty."""
    target = _DPOS_PROGRAMS
    if target is None:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    chunk = triton.cdiv(batch, max(1, min(batch, triton.cdiv(target, tiles))))
    return triton.cdiv(batch, chunk), chunk


def _pos_grad(dout: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[L, D] fp32: dpos[l] = sum over the batch of dout[b, k] with ids_keep[b, k] == l."""
    batch, num_keep, dim = dout.shape
    if batch == 0 or num_patches == 0 or dim == 0:
        return torch.zeros((num_patches, dim), dtype=torch.float32, device=dout.device)
    inverse = inverse_positions(ids_keep, num_patches)
    block_l, block_d = 8, min(128, triton.next_power_of_2(dim))
    grid = (triton.cdiv(num_patches, block_l), triton.cdiv(dim, block_d))
    splits, chunk = _dpos_splits(batch, grid[0] * grid[1], dout.device)
    dpos = _alloc((splits, num_patches, dim), dtype=torch.float32, device=dout.device)
    _embed_visible_patches_bwd_kernel[(*grid, splits)](
        dout, inverse, dpos, batch, chunk, num_patches, num_keep, dim, *dout.stride(),
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    return dpos[0] if splits == 1 else dpos.sum(0)


_pos_grad_op = define(
    "embed_visible_patches_triton_pos_grad", _pos_grad,
    fake=lambda dout, ids_keep, num_patches: dout.new_empty((num_patches, dout.shape[2]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    imgs, ids_keep, weight, bias, pos_embed, patch_size = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.patch_size = patch_size
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_shape, ctx.pos_dtype = pos_embed.shape, pos_embed.dtype


def _backward(ctx, grad):
    imgs, ids_keep, weight = ctx.saved_tensors
    need_imgs, _, need_weight, need_bias, need_pos, _ = ctx.needs_input_grad
    batch, channels, height, width = imgs.shape
    p = ctx.patch_size
    dim, num_patches = weight.shape[0], ctx.pos_shape[-2]
    grad_rows = grad.reshape(-1, dim)
    dimgs = dweight = dbias = dpos = None
    if need_weight:
        patches = _gather_patches_op(imgs, ids_keep, p)
        dweight = (grad_rows.t().to(patches.dtype) @ patches).reshape(weight.shape).to(weight.dtype)
    if need_pos:  # a learnable table
        dpos32 = _pos_grad_op(grad, ids_keep, num_patches)
        dpos = dpos32.reshape(ctx.pos_shape).to(ctx.pos_dtype)
        if need_bias:
            dbias = dpos32.sum(0).to(ctx.bias_dtype)
    elif need_bias:  # a frozen pos_embed (MAE's): no dpos, the bias gradient is a column sum of dout
        dbias = grad_rows.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if need_imgs:
        dpatches = (grad_rows.to(weight.dtype) @ weight.reshape(dim, -1)).reshape(batch, -1, channels * p * p)
        grid_h, grid_w = height // p, width // p
        dimgs = _gather_tokens_bwd_op(dpatches, ids_keep, num_patches)  # [B, L, C*p*p], zeros at masked patches
        dimgs = dimgs.reshape(batch, grid_h, grid_w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        dimgs = dimgs.reshape(imgs.shape).to(imgs.dtype)
    return dimgs, None, dweight, dbias, dpos, None


_embed_op = define("embed_visible_patches_triton", _embed_triton, fake=_embed_fake, backward=_backward,
                   setup_context=_setup_context)


def embed_visible_patches_triton(imgs, ids_keep, weight, bias, pos_embed, patch_size):
    return _embed_op(imgs, ids_keep, weight, bias, pos_embed, patch_size)


_OP = define_op(
    "embed_visible_patches",
    reference=Impl(embed_visible_patches_ref),
    triton=Impl(embed_visible_patches_triton,
                lambda device, imgs, ids_keep, weight, bias, pos, p: triton_reason(device, imgs, weight, bias, pos)),
)


def embed_visible_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, pos_embed: torch.Tensor, patch_size: int,
                          *, backend: str | None = None) -> torch.Tensor:
    """Embed the visible patches of each image and add their position embedding.

    Args:
        imgs: [B, C, H, W] (any strides).
        ids_keep: [B, K] patch indices (raster order) to embed.
        weight: [D, C, p, p] patch-embedding conv weight, imgs's dtype; bias: [D] (weight's dtype) or None.
            Under autocast, imgs, weight and bias are first cast to the autocast dtype, as F.linear would.
        pos_embed: [1, L, D] or [L, D] position embedding of the patches (no cls entry), any float dtype.
        patch_size: p, which must divide H and W; L = (H / p) * (W / p).
        backend: "auto" | "reference" | "triton" (None: the process default, ``set_backend``).
    Returns:
        [B, K, D] in imgs's dtype, differentiable in weight, bias and pos_embed (and imgs).

    ``ids_keep`` holds distinct indices within a row, checked as in ``gather_tokens`` (a repeat raises
    ValueError on CPU, a device assert on CUDA): the Triton backward would drop the repeated bias and
    position gradients.

    Backends: reference (patchify all L patches, gather K, F.linear); triton (reads the K visible patches
    straight from the NCHW image inside a fused matmul + bias + position kernel: the [B, L, C*p*p] patch
    tensor is never built). No CUDA-extension kernel.
    Dtypes: float32, float16, bfloat16 (fp32 accumulation); float64 on the reference only. fp32 matmuls
    follow torch's TF32 switch.
    Limits: none beyond memory; the Triton backward regathers the [B*K, C*p*p] patches for the weight gradient.
    """
    check_tensor("imgs", imgs, ndim=4, dtypes=FLOAT_DTYPES)
    device = imgs.device
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    if torch.is_autocast_enabled(device.type):  # F.linear's autocast rule: project in the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)
        imgs, weight = imgs.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
    check_tensor("weight", weight, dtypes=(imgs.dtype,))
    p = int(patch_size)
    if p != patch_size or p < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    dim = weight.shape[0]
    check_shape("weight", weight, [dim, imgs.shape[1], p, p])
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype,), device=device)
        check_shape("bias", bias, [dim])
    check_tensor("pos_embed", pos_embed, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device)
    if imgs.shape[2] % p or imgs.shape[3] % p:
        raise ValueError(f"patch_size={p} must divide the image size, got {imgs.shape[2]}x{imgs.shape[3]}")
    num_patches = (imgs.shape[2] // p) * (imgs.shape[3] // p)
    pos = pos_embed.reshape(1, *pos_embed.shape[-2:])
    check_shape("pos_embed", pos, [1, num_patches, dim])
    if ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(f"ids_keep must have batch size {imgs.shape[0]} like imgs, got {ids_keep.shape[0]}")
    check_indices("ids_keep", ids_keep, num_patches, distinct=True)
    return _OP(backend, device, imgs, ids_keep, weight, bias, pos, p)
