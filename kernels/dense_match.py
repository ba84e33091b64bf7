"""Dense matching (DenseCL): for each location of view 1, the most similar location of view 2.

With features f1 [B, S1, C] and f2 [B, S2, C] (locations as rows: a [B, C, H, W] map is passed as
``x.flatten(2).transpose(1, 2)``, a view, no copy) and cosine similarity
    sim[b, i, j] = <f1[b, i], f2[b, j]> / (max(|f1[b, i]|, eps) max(|f2[b, j]|, eps)),   eps = 1e-12
(F.normalize's convention), the op returns
    index[b, i] = argmax_j sim[b, i, j]        (int64 [B, S1]; ties: the lowest j)
    similarity[b, i] = sim[b, i, index[b, i]]  (fp32 [B, S1]; float64 for float64 inputs on the reference)

Forward only. The index is a choice, with no gradient; the similarity is returned detached (DenseCL uses only
the index: its positive pairs are then formed from other features). Inputs that require grad are fine.

The Triton kernel streams S2 in tiles of BLOCK_N locations for a tile of BLOCK_M rows of view 1 (and C in chunks
of BLOCK_C), keeping a running max and its index per row: O(B (S1 + S2)) memory, never the [B, S1, S2] matrix.
Norms are computed once per location beforehand (the inverse norms are the only extra tensors). A tile's
argmax takes its lowest maximal index and a later tile replaces the running best only when strictly greater,
so ties go to the lowest index as in ``torch.argmax``. Exact ties (repeated or equally similar locations) are
therefore resolved alike by both backends; near-ties (within rounding of the dot products) may resolve
differently, as any two summation orders may.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import Impl, define_op, triton_reason
from ._custom_op import define
from ._triton import INTERPRET, tl, triton
from ._validate import FLOAT_DTYPES, check_tensor, compute_dtype

EPS = 1e-12  # F.normalize's floor on the norm: an all-zero location has similarity 0 with everything


def dense_match_ref(f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [B, S1, S2] similarity materialised, then argmax (first maximal index) and its value."""
    dtype = compute_dtype(f1.dtype, f2.dtype)
    a = F.normalize(f1.detach().to(dtype), dim=-1, eps=EPS)
    b = F.normalize(f2.detach().to(dtype), dim=-1, eps=EPS)
    sim = a @ b.transpose(1, 2)
    index = sim.argmax(dim=-1)
    return index, sim.gather(-1, index[..., None]).squeeze(-1)


@triton.jit
def _dense_match_kernel(A, B, INV_A, INV_B, INDEX, SIM, len_a, len_b, dim,
                        stride_ab, stride_as, stride_ac, stride_bb, stride_bs, stride_bc,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_a
    inv_a = tl.load(INV_A + batch * len_a + rows, mask=row_ok, other=0.0)
    a_rows = A + batch * stride_ab + rows.to(tl.int64)[:, None] * stride_as
    best = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    best_index = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, len_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < len_b
        b_rows = B + batch * stride_bb + cols.to(tl.int64)[:, None] * stride_bs
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, dim, BLOCK_C):
            offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_ok = offs_c < dim
            a = tl.load(a_rows + offs_c[None, :] * stride_ac, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_rows + offs_c[None, :] * stride_bc, mask=col_ok[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter cannot do bf16 arithmetic
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            dots += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        inv_b = tl.load(INV_B + batch * len_b + cols, mask=col_ok, other=0.0)
        sim = tl.where(col_ok[None, :], dots * inv_a[:, None] * inv_b[None, :], float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_index = tl.argmax(sim, axis=1, tie_break_left=True)
        better = tile_best > best   # strictly: an equal value in a later tile has a higher index
        best_index = tl.where(better, start + tile_index, best_index)
        best = tl.where(better, tile_best, best)
    tl.store(INDEX + batch * len_a + rows, best_index.to(tl.int64), mask=row_ok)
    tl.store(SIM + batch * len_a + rows, best, mask=row_ok)


# 64-row tiles at least: a 32-row tile lowers tl.dot to mma.sync instead of wgmma on sm_90 (make aot-check)
_GPU_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=st)
                for bm, bn, bc, w, st in ((64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 32, 64, 4, 2),
                                          (64, 32, 32, 4, 2))]
_tuned = None


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1).clamp_min(EPS).reciprocal().contiguous()


def _match_triton(f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sslpt::dense_match_argmax: (index int64 [B, S1], similarity fp32 [B, S1]); any strides, no copies."""
    global _tuned
    (batch, len_a, dim), len_b = f1.shape, f2.shape[1]
    index = torch.empty(batch, len_a, device=f1.device, dtype=torch.int64)
    sim = torch.empty(batch, len_a, device=f1.device, dtype=torch.float32)
    fp32_ieee = f1.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    args = (f1, f2, _inverse_norms(f1), _inverse_norms(f2), index, sim, len_a, len_b, dim,
            *f1.stride(), *f2.stride())
    flags = {"UPCAST": INTERPRET and f1.dtype == torch.bfloat16, "PRECISION": "ieee" if fp32_ieee else "tf32"}
    if INTERPRET:  # programs run one by one in Python: few, small tiles (tl.dot needs >= 16)
        bm, bn = (16 if len_a <= 64 else 32), (16 if len_b <= 64 else 32)
        bc = min(64, max(16, triton.next_power_of_2(dim)))
        _dense_match_kernel[(triton.cdiv(len_a, bm), batch)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc)
    else:
        if _tuned is None:
            _tuned = triton.autotune(configs=_GPU_CONFIGS, key=["len_b", "dim", "UPCAST", "PRECISION"])(
                _dense_match_kernel)
        _tuned[lambda meta: (triton.cdiv(len_a, meta["BLOCK_M"]), batch)](*args, **flags)
    return index, sim


def _match_fake(f1, f2):
    shape = f1.shape[:2]
    return f1.new_empty(shape, dtype=torch.int64), f1.new_empty(shape, dtype=torch.float32)


dense_match_argmax = define("dense_match_argmax", _match_triton, fake=_match_fake)


def dense_match_triton(f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dense_match_argmax(f1.detach(), f2.detach())


def triton_supports(device, f1: torch.Tensor, f2: torch.Tensor) -> Optional[str]:
    return triton_reason(device, f1, f2)


_OP = define_op("dense_match", reference=Impl(dense_match_ref), triton=Impl(dense_match_triton, triton_supports))


def dense_match(f1: torch.Tensor, f2: torch.Tensor, *, backend: Optional[str] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each location of view 1, the location of view 2 with the highest cosine similarity (DenseCL).

    Args:
        f1: [B, S1, C] features of view 1, one row per location (a [B, C, H, W] map:
            ``x.flatten(2).transpose(1, 2)``). f2: [B, S2, C] of view 2, same B, C, dtype and device. Any
            strides. Not normalised: the op divides by the norms (cosine similarity, F.normalize's eps).
        backend: "auto" | "reference" | "triton" (None: the process default, ``set_backend``).
    Returns:
        (index, similarity): int64 [B, S1], argmax over view 2's locations (ties: the lowest index), and the
        similarity there, fp32 (float64 for float64 inputs), detached. No gradient flows through either.

    Backends: reference (materialises the [B, S1, S2] similarity, then argmax); triton (streams S2 in tiles
    with a running max and argmax: O(B (S1 + S2)) memory). ``auto`` picks Triton on CUDA tensors.
    Dtypes: float32, float16, bfloat16 (the dot products accumulate in fp32); float64 on the reference only.
    fp32 dot products follow torch's float32 matmul precision (TF32 unless it is "highest"), as a matmul would.
    Limits: S1, S2, C >= 1; no limit on S2 or C in the Triton kernel (both are streamed).
    """
    check_tensor("f1", f1, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("f2", f2, ndim=3, dtypes=FLOAT_DTYPES, device=f1.device)
    if f2.dtype != f1.dtype:
        raise TypeError(f"f2 must have the dtype of f1 ({f1.dtype}), got {f2.dtype}")
    if f2.shape[0] != f1.shape[0] or f2.shape[2] != f1.shape[2]:
        raise ValueError(f"f2 must have shape [{f1.shape[0]}, *, {f1.shape[2]}] (the batch and channels of f1), "
                         f"got {list(f2.shape)}")
    if min(f1.shape) < 1 or f2.shape[1] < 1:
        raise ValueError(f"f1 and f2 need at least one image, location and channel, got {list(f1.shape)} and "
                         f"{list(f2.shape)}")
    return _OP(backend, f1.device, f1, f2)
