"""Put visible tokens back at their positions and ``fill`` (the mask token) elsewhere.

out[b, l] = x_vis[b, k] if ids_keep[b, k] == l else fill. Gradients: dx_vis[b, k] =
dout[b, ids_keep[b, k]]; dfill = sum of dout over the positions not in ids_keep.
"""
from __future__ import annotations

import torch

from . import _cuda
from ._backend import Impl, cuda_reason, define_op, triton_reason
from ._custom_op import define_with_grad
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_shape, check_tensor

# Every buffer a launcher fills comes from here; the tests swap in a NaN-filled allocator to
# prove that each element is written.
_alloc = torch.empty


def scatter_tokens_ref(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int,
                       fill: torch.Tensor) -> torch.Tensor:
    batch, _, dim = x_vis.shape
    base = fill.to(x_vis.dtype).reshape(1, 1, dim).expand(batch, num_patches, dim)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, dim)
    return base.scatter(1, index, x_vis)


def inverse_positions(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, L] int32: the k with ids_keep[b, k] == l, or -1 where position l is masked.

    One small torch scatter (B*K int32 writes); it lets every kernel below walk the output
    in position order and write each output row exactly once, with no atomics.
    """
    batch, num_keep = ids_keep.shape
    inverse = torch.full((batch, num_patches), -1, dtype=torch.int32, device=ids_keep.device)
    source = torch.arange(num_keep, dtype=torch.int32, device=ids_keep.device).expand(batch, num_keep)
    return inverse.scatter_(1, ids_keep.long(), source)


def row_tiles(num_rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_T rows, BLOCK_D columns) for the row-copy kernels: about 4096 elements per program.

    BLOCK_D is a power of two up to 256, so 768 and 1024 split into whole blocks and other widths
    (1000, 192) are masked in their last block.
    """
    block_d = min(triton.next_power_of_2(dim), 256)
    block_t = min(max(1, 4096 // block_d), triton.next_power_of_2(num_rows))
    return block_t, block_d


# --- Triton ---------------------------------------------------------------------------------
# Forward: one program per (BLOCK_T output rows (b, l), BLOCK_D columns). Row (b, l) reads the
# inverse map k = inv[b, l] and copies x_vis[b, k], or the fill where k = -1, so each output
# element is stored exactly once. With HAS_FILL=False the masked rows get zeros: that is the
# backward of gather_tokens (dx[b, ids_keep[b, k]] = dout[b, k], zero elsewhere).
#
# Backward: out is linear in x_vis and fill, so dx_vis[b, k] = dout[b, ids_keep[b, k]] and
# dfill = sum over masked (b, l) of dout[b, l]. One pass over dout does both: a row either goes
# to dx_vis or into the program's fp32 column sums; each program stores its partial sums in its
# own row of `partial`, and torch.sum over those rows finishes dfill (deterministic, no float
# atomics).


@triton.jit
def _scatter_tokens_fwd_kernel(src_ptr, inv_ptr, fill_ptr, out_ptr, num_rows, num_patches, dim,
                               stride_sb, stride_sk, stride_sd,
                               HAS_FILL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < dim
    k = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    visible = k >= 0
    batch = (rows // num_patches).to(tl.int64)
    src = src_ptr + batch[:, None] * stride_sb + k.to(tl.int64)[:, None] * stride_sk + cols[None, :] * stride_sd
    values = tl.load(src, mask=visible[:, None] & col_ok[None, :], other=0.0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0)
        values = tl.where(visible[:, None], values, fill[None, :])
    out = out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(out, values, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_tokens_bwd_kernel(dout_ptr, inv_ptr, dx_ptr, partial_ptr, num_rows, num_patches, num_keep, dim,
                               stride_ob, stride_ol, stride_od,
                               TILES_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    fill_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(TILES_PER_PROGRAM):
        rows = (group * TILES_PER_PROGRAM + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_rows
        k = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
        batch = (rows // num_patches).to(tl.int64)
        pos = (rows % num_patches).to(tl.int64)
        src = dout_ptr + batch[:, None] * stride_ob + pos[:, None] * stride_ol + cols[None, :] * stride_od
        grad = tl.load(src, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        visible = k >= 0
        dst = dx_ptr + (batch * num_keep + k.to(tl.int64))[:, None] * dim + cols[None, :]
        tl.store(dst, grad, mask=visible[:, None] & col_ok[None, :])
        masked = (k < 0) & row_ok
        fill_sum += tl.sum(tl.where(masked[:, None], grad.to(tl.float32), 0.0), axis=0)
    tl.store(partial_ptr + group * dim + cols, fill_sum, mask=col_ok)


def scatter_rows(src: torch.Tensor, inverse: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """out[b, l] = src[b, inverse[b, l]], or ``fill`` (zeros if None) where inverse is -1.

    src: [B, K, D] with any strides (passed to the kernel, no copy); inverse: [B, L] int32.
    fill must be a contiguous [D] tensor of src's dtype. Returns a contiguous [B, L, D].
    """
    batch, _, dim = src.shape
    num_patches = inverse.shape[1]
    out = _alloc((batch, num_patches, dim), dtype=src.dtype, device=src.device)
    num_rows = batch * num_patches
    if out.numel() == 0:
        return out
    block_t, block_d = row_tiles(num_rows, dim)
    grid = (triton.cdiv(num_rows, block_t), triton.cdiv(dim, block_d))
    _scatter_tokens_fwd_kernel[grid](
        src, inverse, fill if fill is not None else src, out, num_rows, num_patches, dim, *src.stride(),
        HAS_FILL=fill is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


def _scatter_tokens_bwd(dout: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_patches, dim = dout.shape
    num_keep = ids_keep.shape[1]
    inverse = inverse_positions(ids_keep, num_patches)
    num_rows = batch * num_patches
    block_t, block_d = row_tiles(num_rows, dim)
    tiles_per_program = min(8, triton.cdiv(num_rows, block_t))
    num_groups = triton.cdiv(num_rows, block_t * tiles_per_program)
    dx_vis = _alloc((batch, num_keep, dim), dtype=dout.dtype, device=dout.device)
    partial = _alloc((num_groups, dim), dtype=torch.float32, device=dout.device)
    _scatter_tokens_bwd_kernel[(num_groups, triton.cdiv(dim, block_d))](
        dout, inverse, dx_vis, partial, num_rows, num_patches, num_keep, dim, *dout.stride(),
        TILES_PER_PROGRAM=tiles_per_program, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return dx_vis, partial.sum(0)


# --- autograd binding (the Triton and the CUDA ops share fakes, setup_context and backward) -------------

def _fake(x_vis, ids_keep, num_patches, fill):
    return x_vis.new_empty((x_vis.shape[0], num_patches, x_vis.shape[2]))


def _grad_fake(dout, ids_keep):
    return (dout.new_empty((dout.shape[0], ids_keep.shape[1], dout.shape[2])),
            dout.new_empty((dout.shape[2],), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x_vis, ids_keep, _, fill = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_dtype, ctx.fill_dtype = x_vis.dtype, fill.dtype


def _backward(grad_op, ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    dx_vis, dfill = grad_op(grad, ids_keep)
    return dx_vis.to(ctx.x_dtype), None, None, dfill.to(ctx.fill_dtype)


def _bind(name: str, forward, grad):
    return define_with_grad(name, forward, grad, fake=_fake, grad_fake=_grad_fake, backward=_backward,
                            setup_context=_setup_context)


def _triton_fwd(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, fill: torch.Tensor) -> torch.Tensor:
    inverse = inverse_positions(ids_keep, num_patches)
    return scatter_rows(x_vis, inverse, fill.to(x_vis.dtype).contiguous())


def _triton_bwd(dout: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx_vis [B, K, D] in dout's dtype, dfill [D] in fp32)."""
    if dout.numel() == 0:
        return (dout.new_zeros((dout.shape[0], ids_keep.shape[1], dout.shape[2])),
                dout.new_zeros(dout.shape[2], dtype=torch.float32))
    return _scatter_tokens_bwd(dout, ids_keep)


_scatter_tokens_op, _scatter_tokens_bwd_op = _bind("scatter_tokens_triton", _triton_fwd, _triton_bwd)


def scatter_tokens_triton(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int,
                          fill: torch.Tensor) -> torch.Tensor:
    return _scatter_tokens_op(x_vis, ids_keep, num_patches, fill)


# --- CUDA (csrc/gather_scatter.cu) ------------------------------------------------------------
# Forward: the row copy through the inverse map with the fill, 16-byte accesses where the rows allow.
# Backward: one pass over dout writes dx_vis and per-group fp32 column sums of the masked rows (fixed groups
# of _CUDA_ROWS_PER_GROUP rows, reduced in a fixed order in the kernel, then torch.sum over the groups):
# deterministic, no atomics, the same split as the Triton kernel.
_CUDA_ROWS_PER_GROUP = 128


def _cuda_fwd(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, fill: torch.Tensor) -> torch.Tensor:
    x_vis = _cuda.unit_last(x_vis)
    out = _alloc((x_vis.shape[0], num_patches, x_vis.shape[2]), dtype=x_vis.dtype, device=x_vis.device)
    _cuda.load().scatter_rows(x_vis, inverse_positions(ids_keep, num_patches), fill.to(x_vis.dtype).contiguous(),
                              out, _cuda.stream(x_vis))
    return out


def _cuda_bwd(dout: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx_vis [B, K, D] in dout's dtype, dfill [D] in fp32)."""
    batch, num_patches, dim = dout.shape
    if dout.numel() == 0:
        return dout.new_zeros((batch, ids_keep.shape[1], dim)), dout.new_zeros(dim, dtype=torch.float32)
    dout = _cuda.unit_last(dout)
    groups = -(-batch * num_patches // _CUDA_ROWS_PER_GROUP)
    dx_vis = _alloc((batch, ids_keep.shape[1], dim), dtype=dout.dtype, device=dout.device)
    partial = _alloc((groups, dim), dtype=torch.float32, device=dout.device)
    _cuda.load().scatter_rows_bwd(dout, inverse_positions(ids_keep, num_patches), dx_vis, partial,
                                  _CUDA_ROWS_PER_GROUP, _cuda.stream(dout))
    return dx_vis, partial.sum(0)


_scatter_tokens_cuda_op, _scatter_tokens_cuda_bwd_op = _bind("scatter_tokens_cuda", _cuda_fwd, _cuda_bwd)


def scatter_tokens_cuda(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int,
                        fill: torch.Tensor) -> torch.Tensor:
    return _scatter_tokens_cuda_op(x_vis, ids_keep, num_patches, fill)


_OP = define_op(
    "scatter_tokens",
    reference=Impl(scatter_tokens_ref),
    triton=Impl(scatter_tokens_triton, lambda device, x_vis, ids_keep, n, fill: triton_reason(device, x_vis, fill)),
    cuda=Impl(scatter_tokens_cuda, lambda device, x_vis, ids_keep, n, fill: cuda_reason(device, x_vis, fill)),
)


def scatter_tokens(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, fill: torch.Tensor,
                   *, backend: str | None = None) -> torch.Tensor:
    """Tokens back in patch order with ``fill`` at the masked positions.

    Args:
        x_vis: [B, K, D] visible tokens (any strides).
        ids_keep: [B, K] their positions, distinct within a row, in [0, num_patches); checked as in
            ``gather_tokens`` (a repeated position raises ValueError: it would make the output ambiguous).
        num_patches: L, the length of the output.
        fill: [D] (or anything with D elements, e.g. a [1, 1, D] mask token).
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        [B, L, D] in ``x_vis``'s dtype; differentiable in ``x_vis`` and ``fill``.

    Backends: reference (expand + torch.scatter); triton and cuda (one pass writing every output row once
    through a [B, L] int32 inverse map; the backward also sums the fill gradient in fp32 per block of rows,
    deterministic, no atomics).
    Dtypes: float32, float16, bfloat16 on every backend; float64 on the reference only.
    Limits: none beyond memory (the [B, L, D] output, a [B, L] int32 map).
    """
    check_tensor("x_vis", x_vis, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x_vis.device)
    check_shape("ids_keep", ids_keep, x_vis.shape[:2])
    check_tensor("fill", fill, dtypes=FLOAT_DTYPES, device=x_vis.device)
    if fill.numel() != x_vis.shape[-1]:
        raise ValueError(f"fill must have {x_vis.shape[-1]} elements (x_vis's width), got shape {list(fill.shape)}")
    if int(num_patches) != num_patches or num_patches < x_vis.shape[1]:
        raise ValueError(f"num_patches must be an integer >= K={x_vis.shape[1]}, got {num_patches}")
    check_indices("ids_keep", ids_keep, int(num_patches), distinct=True)
    return _OP(backend, x_vis.device, x_vis, ids_keep, int(num_patches), fill.reshape(-1))
