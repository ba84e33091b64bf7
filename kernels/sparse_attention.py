"""Encoder attention over short, ragged or order-masked token sets (MAE visible tokens, SemAIM order).

Per (sample, head), with scale c (default Dh^-0.5) and a visibility mask M:
    S = c Q K^T,   S_ij = -inf where M_ij = 0,   P = softmax_rows(S),   O = P V.
Masks: none (full attention); packed [T, H, Dh] with ``cu_seqlens`` (block diagonal: a token sees only its
own sample); or ``order[B, N]``, where query i sees key j iff order[j] <= order[i] (< with ``strict``).
A query that sees no key (possible only with ``strict``) gets O = 0 and zero gradients.

Forward (FlashAttention-2 style): one program per (query tile, sample, head) streams the key tiles with an
online softmax in fp32 (running max m, running sum l, exp2 with log2(e) folded into the scale) and stores
LSE = m + log2(l) per query row (in log2 units; +inf for a row that sees nothing, so that P = 0 there).
Key tiles whose order minimum exceeds the query tile's order maximum are skipped whole.

Backward: with P = exp2(S log2(e) - LSE) recomputed from the stored LSE and Delta_i = sum_d dO_id O_id,
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ = c dS K,   dK = c dS^T Q.
The dK/dV kernel owns a key tile and loops over query tiles; the dQ kernel owns a query tile and loops over
key tiles (no atomics, deterministic). When a sample fits in one key tile (MAE: N = 50 with 64-wide tiles),
the dK/dV program is the only one touching each query tile, so it also writes dQ and computes Delta inline:
the whole backward is one launch.
"""
import contextlib
import math
from typing import Iterator, Optional

import torch

from . import _validate
from ._backend import Impl, define_op, triton_reason
from ._custom_op import define_with_grad
from ._triton import INTERPRET, tl, triton
from ._validate import FLOAT_DTYPES, check_tensor, compute_dtype

LOG2E = 1.4426950408889634
MAX_TRITON_HEAD_DIM = 128
ORDER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------

def _masked_softmax_attention(q, k, v, visible, scale: float):
    """q, k, v [..., N, Dh]; visible broadcastable to [..., N, N] or None. Rows that see nothing give 0."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs @ v


def _order_visibility(order: torch.Tensor, strict: bool) -> torch.Tensor:
    """[B, N] -> [B, 1, N, N] bool, entry (b, 0, i, j) = query i sees key j."""
    order_q, order_k = order[:, None, :, None], order[:, None, None, :]
    return order_k < order_q if strict else order_k <= order_q


def sparse_attention_ref(q, k, v, *, cu_seqlens=None, max_seqlen=None, order=None, strict=False, scale=None,
                         upcast: bool = True):
    """Explicit-softmax attention (fp32, float64 for float64 inputs, unless ``upcast=False``: the input dtype);
    packed inputs loop over samples."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = q.dtype
    if upcast:
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [_masked_softmax_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                            v[s:e].transpose(0, 1), None, scale).transpose(0, 1)
                  for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        out = torch.cat(pieces, dim=0) if pieces else q.new_empty(q.shape)
    else:
        visible = None if order is None else _order_visibility(order, strict)
        out = _masked_softmax_attention(q, k, v, visible, scale)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN: tl.constexpr):
    """First token and length of sample b: from cu_seqlens when packed, else (0, N)."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - start
    else:
        start = 0
        seqlen = seqlen_dense
    return start, seqlen


@triton.jit
def _load_tile(ptr, stride_n, offs_n, offs_d, seqlen, head_dim, UPCAST: tl.constexpr):
    """[len(offs_n), BLOCK_D] rows of one (sample, head); zero outside the sequence and the head dim."""
    mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < head_dim)
    tile = tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter cannot do bf16 arithmetic
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(ptr, stride_n, offs_n, offs_d, seqlen, head_dim, tile):
    mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < head_dim)
    tl.store(ptr + offs_n[:, None] * stride_n + offs_d[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_order(order_row, offs, seqlen, first):
    """Order values of a tile and the values valid rows reduce over (``first`` pads the invalid rows)."""
    values = tl.load(order_row + offs, mask=offs < seqlen, other=0)
    return tl.where(offs < seqlen, values, first)


@triton.jit
def _tiles_interact(order_q, order_k, STRICT: tl.constexpr):
    """Whether any query of the tile sees any key of the tile (padded entries hold valid values)."""
    if STRICT:
        return tl.min(order_k, axis=0) < tl.max(order_q, axis=0)
    return tl.min(order_k, axis=0) <= tl.max(order_q, axis=0)


@triton.jit
def _visibility(order_q, order_k, offs_n, seqlen, HAS_ORDER: tl.constexpr, STRICT: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: key in the sequence and (with an order) visible to the query."""
    visible = (offs_n < seqlen)[None, :]
    if HAS_ORDER:
        if STRICT:
            visible = visible & (order_k[None, :] < order_q[:, None])
        else:
            visible = visible & (order_k[None, :] <= order_q[:, None])
    return visible


@triton.jit
def _sparse_attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, ORDER,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_order_b,
    num_heads, seqlen_dense, head_dim, qk_scale,
    IS_VARLEN: tl.constexpr, HAS_ORDER: tl.constexpr, STRICT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    start, seqlen = _sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + start * stride_qn, stride_qn, offs_m, offs_d,
                   seqlen, head_dim, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vn
    order_row = ORDER + b * stride_order_b
    order_q = offs_m  # placeholder, replaced when there is an order
    if HAS_ORDER:
        order_q = _load_order(order_row, offs_m, seqlen, tl.load(order_row + pid_m * BLOCK_M))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + offs_n0
        order_k = offs_n
        interact = True
        if HAS_ORDER:
            order_k = _load_order(order_row, offs_n, seqlen, tl.load(order_row + start_n))
            interact = _tiles_interact(order_q, order_k, STRICT)
        if interact:
            k = _load_tile(k_base, stride_kn, offs_n, offs_d, seqlen, head_dim, UPCAST)
            v = _load_tile(v_base, stride_vn, offs_n, offs_d, seqlen, head_dim, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(_visibility(order_q, order_k, offs_n, seqlen, HAS_ORDER, STRICT), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    _store_tile(O + b * stride_ob + h * stride_oh + start * stride_on, stride_on, offs_m, offs_d, seqlen,
                head_dim, out)
    tl.store(LSE + b * stride_lb + h * stride_lh + start + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _sparse_attention_bwd_delta_kernel(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_lb, stride_lh,
    num_heads, seqlen_dense, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta_i = sum_d dO_id O_id in fp32 (the softmax-gradient row term)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    start, seqlen = _sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh + start * stride_on, stride_on, offs_m, offs_d,
                   seqlen, head_dim, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + start * stride_don, stride_don, offs_m, offs_d,
                    seqlen, head_dim, True)
    tl.store(DELTA + b * stride_lb + h * stride_lh + start + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seqlen)


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, CU_SEQLENS, ORDER,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_order_b,
    num_heads, seqlen_dense, head_dim, scale, qk_scale,
    IS_VARLEN: tl.constexpr, HAS_ORDER: tl.constexpr, STRICT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SINGLE_KEY_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile (and, with SINGLE_KEY_TILE, dQ and Delta of every query tile)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    start, seqlen = _sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh + start * stride_kn, stride_kn, offs_n, offs_d,
                   seqlen, head_dim, UPCAST)
    v = _load_tile(V + b * stride_vb + h * stride_vh + start * stride_vn, stride_vn, offs_n, offs_d,
                   seqlen, head_dim, UPCAST)
    q_base = Q + b * stride_qb + h * stride_qh + start * stride_qn
    o_base = O + b * stride_ob + h * stride_oh + start * stride_on
    do_base = DO + b * stride_dob + h * stride_doh + start * stride_don
    dq_base = DQ + b * stride_dqb + h * stride_dqh + start * stride_dqn
    row_base = b * stride_lb + h * stride_lh + start
    order_row = ORDER + b * stride_order_b
    order_k = offs_n
    if HAS_ORDER:
        order_k = _load_order(order_row, offs_n, seqlen, tl.load(order_row + pid_n * BLOCK_N))

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + offs_m0
        order_q = offs_m
        interact = True
        if HAS_ORDER:
            order_q = _load_order(order_row, offs_m, seqlen, tl.load(order_row + start_m))
            interact = _tiles_interact(order_q, order_k, STRICT)
        if interact:
            q = _load_tile(q_base, stride_qn, offs_m, offs_d, seqlen, head_dim, UPCAST)
            do = _load_tile(do_base, stride_don, offs_m, offs_d, seqlen, head_dim, UPCAST)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < seqlen, other=float("inf"))
            if SINGLE_KEY_TILE:
                o = _load_tile(o_base, stride_on, offs_m, offs_d, seqlen, head_dim, True)
                delta = tl.sum(o * do.to(tl.float32), axis=1)
            else:
                delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < seqlen, other=0.0)
            # transposed scores [BLOCK_N, BLOCK_M], so that the reductions below run over the query axis
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            visible_t = (offs_n < seqlen)[:, None] & (offs_m < seqlen)[None, :]
            if HAS_ORDER:
                if STRICT:
                    visible_t = visible_t & (order_k[:, None] < order_q[None, :])
                else:
                    visible_t = visible_t & (order_k[:, None] <= order_q[None, :])
            p_t = tl.where(visible_t, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
            if SINGLE_KEY_TILE:
                dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PRECISION) * scale
                _store_tile(dq_base, stride_dqn, offs_m, offs_d, seqlen, head_dim, dq)
        else:
            if SINGLE_KEY_TILE:  # this query tile sees no key at all
                _store_tile(dq_base, stride_dqn, offs_m, offs_d, seqlen, head_dim,
                            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))

    _store_tile(DK + b * stride_dkb + h * stride_dkh + start * stride_dkn, stride_dkn, offs_n, offs_d, seqlen,
                head_dim, dk * scale)
    _store_tile(DV + b * stride_dvb + h * stride_dvh + start * stride_dvn, stride_dvn, offs_n, offs_d, seqlen,
                head_dim, dv)


@triton.jit
def _sparse_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, ORDER,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_lb, stride_lh, stride_order_b,
    num_heads, seqlen_dense, head_dim, scale, qk_scale,
    IS_VARLEN: tl.constexpr, HAS_ORDER: tl.constexpr, STRICT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query tile, streaming the key tiles."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    start, seqlen = _sequence_bounds(CU_SEQLENS, b, seqlen_dense, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + start * stride_qn, stride_qn, offs_m, offs_d,
                   seqlen, head_dim, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + start * stride_don, stride_don, offs_m, offs_d,
                    seqlen, head_dim, UPCAST)
    row_base = b * stride_lb + h * stride_lh + start
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < seqlen, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < seqlen, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + start * stride_vn
    order_row = ORDER + b * stride_order_b
    order_q = offs_m
    if HAS_ORDER:
        order_q = _load_order(order_row, offs_m, seqlen, tl.load(order_row + pid_m * BLOCK_M))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + offs_n0
        order_k = offs_n
        interact = True
        if HAS_ORDER:
            order_k = _load_order(order_row, offs_n, seqlen, tl.load(order_row + start_n))
            interact = _tiles_interact(order_q, order_k, STRICT)
        if interact:
            k = _load_tile(k_base, stride_kn, offs_n, offs_d, seqlen, head_dim, UPCAST)
            v = _load_tile(v_base, stride_vn, offs_n, offs_d, seqlen, head_dim, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            visible = _visibility(order_q, order_k, offs_n, seqlen, HAS_ORDER, STRICT)
            p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh + start * stride_dqn, stride_dqn, offs_m, offs_d, seqlen,
                head_dim, dq * scale)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of [B, H, N, Dh] or packed [T, H, Dh] (batch stride 0: cu_seqlens)."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(1), t.stride(0)


def _row_strides(lse: torch.Tensor) -> tuple[int, int]:
    """(batch, head) strides of the per-row fp32 buffers: dense [B, H, N], packed [H, T]."""
    if lse.dim() == 3:
        return lse.stride(0), lse.stride(1)
    return 0, lse.stride(0)


def _problem(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """(batch, heads, dense length or 0, head dim)."""
    if q.dim() == 4:
        return q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    return cu_seqlens.numel() - 1, q.shape[1], 0, q.shape[2]


def _row_buffer(q: torch.Tensor) -> torch.Tensor:
    if q.dim() == 4:
        return torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    return torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)


def _launch_config(q: torch.Tensor, head_dim: int) -> dict:
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs keep fp32 products, as torch does
    return dict(UPCAST=INTERPRET, PRECISION=precision, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _order_args(order: Optional[torch.Tensor], dummy: torch.Tensor):
    if order is None:
        return dummy, 0
    return order, order.stride(0)


def _fwd(q, k, v, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n):
    batch, heads, seqlen_dense, head_dim = _problem(q, cu_seqlens)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = _row_buffer(q)
    if q.numel() == 0 or batch == 0:
        return out, lse.fill_(float("inf"))
    order_ptr, stride_order_b = _order_args(order, q)
    grid = (batch * heads, triton.cdiv(max_seqlen, block_m))
    _sparse_attention_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens if cu_seqlens is not None else q, order_ptr,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(out), *_row_strides(lse),
        stride_order_b, heads, seqlen_dense, head_dim, scale * LOG2E,
        IS_VARLEN=cu_seqlens is not None, HAS_ORDER=order is not None, STRICT=strict,
        BLOCK_M=block_m, BLOCK_N=block_n, **_launch_config(q, head_dim))
    return out, lse


def _bwd(grad_out, q, k, v, out, lse, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n):
    batch, heads, seqlen_dense, head_dim = _problem(q, cu_seqlens)
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    if q.numel() == 0 or batch == 0:
        return dq, dk, dv
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    config = _launch_config(q, head_dim)
    cu_ptr = cu_seqlens if cu_seqlens is not None else q
    order_ptr, stride_order_b = _order_args(order, q)
    flags = dict(IS_VARLEN=cu_seqlens is not None, HAS_ORDER=order is not None, STRICT=strict)
    single_key_tile = max_seqlen <= block_n
    delta = lse  # unused placeholder when Delta is computed inside the dK/dV kernel
    if not single_key_tile:
        delta = _row_buffer(q)
        _sparse_attention_bwd_delta_kernel[(batch * heads, triton.cdiv(max_seqlen, block_m))](
            out, grad_out, delta, cu_ptr, *_bhn_strides(out), *_bhn_strides(grad_out), *_row_strides(lse),
            heads, seqlen_dense, head_dim, IS_VARLEN=flags["IS_VARLEN"], BLOCK_M=block_m,
            BLOCK_D=config["BLOCK_D"], num_warps=4)
    _sparse_attention_bwd_dkdv_kernel[(batch * heads, triton.cdiv(max_seqlen, block_n))](
        q, k, v, out, grad_out, lse, delta, dq, dk, dv, cu_ptr, order_ptr,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(out), *_bhn_strides(grad_out),
        *_bhn_strides(dq), *_bhn_strides(dk), *_bhn_strides(dv), *_row_strides(lse), stride_order_b,
        heads, seqlen_dense, head_dim, scale, scale * LOG2E, SINGLE_KEY_TILE=single_key_tile,
        BLOCK_M=block_m, BLOCK_N=block_n, **flags, **config)
    if not single_key_tile:
        _sparse_attention_bwd_dq_kernel[(batch * heads, triton.cdiv(max_seqlen, block_m))](
            q, k, v, grad_out, lse, delta, dq, cu_ptr, order_ptr,
            *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(grad_out), *_bhn_strides(dq),
            *_row_strides(lse), stride_order_b, heads, seqlen_dense, head_dim, scale, scale * LOG2E,
            BLOCK_M=block_m, BLOCK_N=block_n, **flags, **config)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Autograd binding (torch.library, so that torch.compile can trace through it)
# ----------------------------------------------------------------------------------------------------------

def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            order: Optional[torch.Tensor], max_seqlen: int, strict: bool, scale: float,
            block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n)


def _fwd_fake(q, k, v, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n):
    return q.new_empty(q.shape), _row_buffer(q)


def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            order: Optional[torch.Tensor], max_seqlen: int, strict: bool, scale: float,
            block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(grad_out, q, k, v, out, lse, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n)


def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, order, max_seqlen, strict, scale, block_m, block_n = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, order)
    ctx.params = (max_seqlen, strict, scale, block_m, block_n)


def _backward(grad_op, ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, order = ctx.saved_tensors
    dq, dk, dv = grad_op(grad_out, q, k, v, out, lse, cu_seqlens, order, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None


_sparse_attention_fwd_op, _sparse_attention_bwd_op = define_with_grad(
    "sparse_attention_fwd_triton", _fwd_op, _bwd_op, fake=_fwd_fake, grad_fake=_bwd_fake, backward=_backward,
    setup_context=_setup_context, grad_name="sparse_attention_bwd_triton")


# ----------------------------------------------------------------------------------------------------------
# Triton entry point and public function
# ----------------------------------------------------------------------------------------------------------

_block_override: Optional[tuple[int, int]] = None


@contextlib.contextmanager
def triton_block_sizes(block_m: int, block_n: int) -> Iterator[None]:
    """Force the Triton tile sizes (powers of two >= 16); tests use small tiles to cover multi-tile paths."""
    global _block_override
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    previous, _block_override = _block_override, (block_m, block_n)
    try:
        yield
    finally:
        _block_override = previous


def _block_sizes(max_seqlen: int, dtype: torch.dtype) -> tuple[int, int]:
    if _block_override is not None:
        return _block_override
    # a short sample (MAE: 50 visible tokens) is one 64-wide tile; never wider (register pressure), and
    # 32 for fp32 on a GPU, whose full-precision (non tensor-core) products hold twice the registers
    widest = 32 if dtype == torch.float32 and not INTERPRET else 64
    block = min(widest, max(16, triton.next_power_of_2(max(max_seqlen, 1))))
    return block, block


def _kernel_order(order: torch.Tensor) -> torch.Tensor:
    """Order in a dtype the kernel compares exactly: fp16/bf16 -> fp32, small ints -> int32."""
    if order.dtype in (torch.float16, torch.bfloat16):
        order = order.float()
    elif order.dtype in (torch.uint8, torch.int8, torch.int16):
        order = order.int()
    return order.contiguous()


def sparse_attention_triton(q, k, v, *, cu_seqlens=None, max_seqlen=None, order=None, strict=False, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        max_seqlen = q.shape[2]
    else:
        cu_seqlens = cu_seqlens.contiguous()
        if max_seqlen is None:
            max_seqlen = max(int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), 1)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    order = None if order is None else _kernel_order(order)
    block_m, block_n = _block_sizes(max_seqlen, q.dtype)
    out, _ = _sparse_attention_fwd_op(q, k, v, cu_seqlens, order, int(max_seqlen), bool(strict), scale,
                                      block_m, block_n)
    return out


def triton_supports(device, q, k=None, v=None, **_) -> Optional[str]:
    """Whether the Triton kernels serve q [.., Dh] on ``device`` (shared with kernels.attention): None, or why not."""
    why = triton_reason(device, q)
    if why is None and q.shape[-1] > MAX_TRITON_HEAD_DIM:
        why = f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM} (the Triton kernel's limit)"
    return why


_OP = define_op("sparse_attention", reference=Impl(sparse_attention_ref),
                triton=Impl(sparse_attention_triton, triton_supports))


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: Optional[int], device) -> int:
    """Validate the packing offsets; returns max_seqlen (computed, with a host sync, when not given)."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold B+1 >= 2 offsets, got {cu_seqlens.numel()}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive python int, got {max_seqlen!r}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if cu_seqlens.device.type == "cpu" or _validate._full_index_checks or max_seqlen is None:
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {first} ... {last}")
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        longest = int(lengths.max())
        if max_seqlen is None:
            return max(longest, 1)
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sample ({longest} tokens)")
        return max_seqlen
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all() & (lengths.max() <= max_seqlen)
    torch._assert_async(ok, "cu_seqlens must start at 0, end at T, not decrease, and respect max_seqlen")
    return max_seqlen


def check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, order, scale) -> Optional[int]:
    """The public contract of sparse_attention / attention, with errors naming the argument; returns
    max_seqlen for packed inputs (derived from cu_seqlens when not given), None for dense ones."""
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {list(q.shape)}, got {list(t.shape)}")
    if q.shape[-1] < 1:
        raise ValueError("q must have a head dim >= 1")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a python float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float (it multiplies Q K^T), got {scale}")
    if q.dim() == 3:
        if cu_seqlens is None:
            raise ValueError("packed q [T, H, Dh] needs cu_seqlens (and max_seqlen)")
        if order is not None:
            raise ValueError("order is supported for dense [B, H, N, Dh] inputs only")
        return _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device)
    if cu_seqlens is not None or max_seqlen is not None:
        raise ValueError("cu_seqlens and max_seqlen are for packed [T, H, Dh] inputs; q is [B, H, N, Dh]")
    if order is not None:
        check_tensor("order", order, ndim=2, dtypes=ORDER_DTYPES, device=q.device)
        if tuple(order.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"order must have shape [B, N] = {[q.shape[0], q.shape[2]]}, got {list(order.shape)}")
    return None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                     max_seqlen: Optional[int] = None, order: Optional[torch.Tensor] = None, strict: bool = False,
                     scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention of each sample's tokens with each other (no attention across samples).

    Args:
        q, k, v: [B, H, N, Dh] (dense), or [T, H, Dh] packed samples with ``cu_seqlens``; same dtype and shape.
        cu_seqlens: [B+1] int32 offsets of the packed samples: 0 = cu[0] <= cu[1] <= ... <= cu[B] = T.
        max_seqlen: longest packed sample (bounds the kernel grid); computed (a host sync) when omitted.
        order: [B, N] per-token rank (float or int, dense inputs only): query i sees key j iff
            order[j] <= order[i] (``strict``: order[j] < order[i]); ties see each other unless strict. A token
            ranked below all others (e.g. a cls token at -1) is seen by every query. With ``strict`` the
            lowest-ranked token sees nothing: its output is defined as 0 (and it passes no gradient); callers
            that want it to see itself (SemAIM's cls) must give it a non-strict path.
        strict: use < instead of <= in the order mask.
        scale: multiplies Q K^T; default Dh^-0.5. Must be finite (nan or inf raises ValueError).
        backend: "auto" | "reference" | "triton" (None: the process default, ``set_backend``).
    Returns:
        Attention output with the shape and dtype of ``q``.

    Backends: reference (explicit fp32 softmax: materialises [B, H, N, N] scores; packed samples one at a
    time); triton (FlashAttention-2-style online softmax: O(N) memory per (sample, head), key tiles that an
    order mask hides skipped whole; deterministic backward, no atomics). No CUDA-extension kernel.
    Dtypes: float32, float16, bfloat16 (fp32 softmax); float64 on the reference only.
    Limits: Triton head dims up to 128 (MAX_TRITON_HEAD_DIM); cu_seqlens int32; ``order`` any real or
    integer dtype (compared exactly).
    """
    max_seqlen = check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, order, scale)
    return _OP(backend, q.device, q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, order=order,
               strict=bool(strict), scale=scale)
