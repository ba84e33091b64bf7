"""Select the visible tokens: out[b, k] = x[b, ids_keep[b, k]].

Gradient: dx[b, ids_keep[b, k]] += dout[b, k]; ids_keep holds distinct indices per row
(a subset of a permutation), so the backward is a plain scatter without atomics.
"""
from __future__ import annotations

import torch

from . import _cuda
from ._backend import Impl, cuda_reason, define_op, triton_reason
from ._custom_op import define_with_grad
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_indices, check_tensor
from .scatter_tokens import inverse_positions, row_tiles, scatter_rows

# Every buffer a launcher fills comes from here; the tests swap in a NaN-filled allocator.
_alloc = torch.empty


def gather_tokens_ref(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


# --- Triton ---------------------------------------------------------------------------------
# Forward: one program per (BLOCK_T output rows, flattened over (b, k); BLOCK_D columns). Each row
# loads its index once and copies a BLOCK_D slice of x[b, ids_keep[b, k]]. x is read through its
# strides (no copy for transposed or sliced views); the unit stride of a contiguous last dimension
# is specialised by Triton, so those loads vectorise.
#
# Backward: dx[b, l] = dout[b, k] where ids_keep[b, k] = l, else 0. Because the ids are distinct in
# a row, this is scatter_tokens' forward kernel with zero fill: it walks dx in position order
# through the inverse map (position -> k or -1) and writes every element of dx exactly once, so
# no zero-initialisation pass and no atomics.


@triton.jit
def _gather_tokens_fwd_kernel(x_ptr, ids_ptr, out_ptr, num_rows, num_keep, dim,
                              stride_xb, stride_xl, stride_xd,
                              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    batch = (rows // num_keep).to(tl.int64)
    src = x_ptr + batch[:, None] * stride_xb + pos[:, None] * stride_xl + cols[None, :] * stride_xd
    values = tl.load(src, mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], values, mask=mask)


def gather_rows(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x: [B, L, D] with any strides; ids_keep: contiguous [B, K] int32/int64. Returns contiguous [B, K, D]."""
    batch, _, dim = x.shape
    num_keep = ids_keep.shape[1]
    out = _alloc((batch, num_keep, dim), dtype=x.dtype, device=x.device)
    num_rows = batch * num_keep
    if out.numel() == 0:
        return out
    block_t, block_d = row_tiles(num_rows, dim)
    grid = (triton.cdiv(num_rows, block_t), triton.cdiv(dim, block_d))
    _gather_tokens_fwd_kernel[grid](x, ids_keep, out, num_rows, num_keep, dim, *x.stride(),
                                    BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


# --- autograd binding (the Triton and the CUDA ops share fakes, setup_context and backward) -------------

def _fake(x, ids_keep):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


def _grad_fake(dout, ids_keep, num_patches):
    return dout.new_empty((dout.shape[0], num_patches, dout.shape[2]))


def _setup_context(ctx, inputs, output):
    x, ids_keep = inputs
    ctx.save_for_backward(ids_keep)
    ctx.num_patches, ctx.x_dtype = x.shape[1], x.dtype


def _backward(grad_op, ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return grad_op(grad, ids_keep, ctx.num_patches).to(ctx.x_dtype), None


def _bind(name: str, forward, grad):
    return define_with_grad(name, forward, grad, fake=_fake, grad_fake=_grad_fake, backward=_backward,
                            setup_context=_setup_context)


def _triton_fwd(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    return gather_rows(x, ids_keep.contiguous())


def _triton_bwd(dout: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """dx [B, L, D]: dout's rows at the positions ids_keep, zeros elsewhere."""
    return scatter_rows(dout, inverse_positions(ids_keep, num_patches), None)


_gather_tokens_op, _gather_tokens_bwd_op = _bind("gather_tokens_triton", _triton_fwd, _triton_bwd)


def gather_tokens_triton(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    return _gather_tokens_op(x, ids_keep)


# --- CUDA (csrc/gather_scatter.cu) ------------------------------------------------------------
# The same row copies in hand-written CUDA: 16-byte loads and stores whenever D * elem is a multiple of 16
# and the rows are aligned (narrower accesses otherwise). The backward walks dx in position order through
# the inverse map with zero fill, as the Triton one does. x may have any batch/token strides; a last
# dimension that is not unit-stride is copied first.

def _cuda_fwd(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    x, ids_keep = _cuda.unit_last(x), ids_keep.contiguous()
    out = _alloc((x.shape[0], ids_keep.shape[1], x.shape[2]), dtype=x.dtype, device=x.device)
    _cuda.load().gather_rows(x, ids_keep, out, _cuda.stream(x))
    return out


def _cuda_bwd(dout: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    dout = _cuda.unit_last(dout)
    out = _alloc((dout.shape[0], num_patches, dout.shape[2]), dtype=dout.dtype, device=dout.device)
    _cuda.load().scatter_rows(dout, inverse_positions(ids_keep, num_patches), None, out, _cuda.stream(dout))
    return out


_gather_tokens_cuda_op, _gather_tokens_cuda_bwd_op = _bind("gather_tokens_cuda", _cuda_fwd, _cuda_bwd)


def gather_tokens_cuda(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    return _gather_tokens_cuda_op(x, ids_keep)


_OP = define_op(
    "gather_tokens",
    reference=Impl(gather_tokens_ref),
    triton=Impl(gather_tokens_triton, lambda device, x, ids_keep: triton_reason(device, x)),
    cuda=Impl(gather_tokens_cuda, lambda device, x, ids_keep: cuda_reason(device, x)),
)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Visible tokens of each sample, differentiable in ``x``: out[b, k] = x[b, ids_keep[b, k]].

    Args:
        x: [B, L, D] tokens (any strides; the Triton kernel reads them in place).
        ids_keep: [B, K] int64 or int32 indices into L, distinct within a row. Both are checked: an index
            outside [0, L) raises IndexError and a repeated index ValueError on CPU tensors (or with
            ``set_index_checks(True)``); on CUDA, and under torch.compile, they are device-side asserts (no
            host sync). Repeats are refused, not accumulated: the kernels' backward writes each row of dx
            once, without atomics.
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        [B, K, D], same dtype as ``x``.

    Backends: reference (torch.gather); triton and cuda (row copies; the backward walks dx in position order
    through a [B, L] int32 inverse map and writes every element once: no zero fill, no atomics).
    Dtypes: float32, float16, bfloat16 on every backend; float64 on the reference only.
    Limits: none beyond memory (the output, and an int32 [B, L] map in the backward).
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if ids_keep.shape[0] != x.shape[0]:
        raise ValueError(f"ids_keep must have batch size {x.shape[0]} like x, got {ids_keep.shape[0]}")
    check_indices("ids_keep", ids_keep, x.shape[1], distinct=True)
    return _OP(backend, x.device, x, ids_keep)
