"""Prototype cross-entropy (the DINO / MOKD multi-crop loss) without materialising the N x K logits.

Student rows h_r (bottleneck features) and teacher rows t_i are scored against K prototypes:
    s_r = Ws h_r / tau_s                                 (student logits, K of them)
    p_i = softmax((Wt t_i - c) / tau_t)                  (teacher targets; no gradient ever reaches them)
    loss = mean over pairs (i, r) of  -sum_k p_ik log softmax(s_r)_k
Pairing "cross" (DINO): rows are crop-major (row v*B + b); the teacher has the num_global global crops,
the student n_c >= num_global crops; teacher crop i pairs with every student crop v != i of the same image
b, so there are n_terms = num_global * (n_c - 1) crop pairs. Pairing "identity": row r with row r.

Equivalent form used by the kernels. With Q_r = sum of the p_i paired with student row r, of mass m_r
(cross: num_global - [v < num_global]; identity: 1), and alpha = 1 / (number of pairs):
    loss = alpha * sum_r [ m_r lse(s_r) - (1/tau_s) h_r . Usum_r ],   Usum_r = sum_{i paired with r} U_i,
    U_i = Ws^T p_i  (the teacher-weighted expected student prototype, [N_t, d]).
Forward: a teacher pass (rows of t against tiles of prototypes: online max / sum for lse_t, and U
accumulated flash-attention style with the student prototypes as values; the prototypes are split across
programs when there are few teacher rows, the partial results merged in torch), a student pass (online
lse_s, info_nce's kernel), then O(N d) torch. Saved for the backward: the inputs and U, lse_s, lse_t.

Backward (sigma_r = softmax(s_r), E_r = Ws^T sigma_r, G_i = sum of the student rows paired with teacher row i):
    dh_r  = (alpha / tau_s) (m_r E_r - Usum_r)            a row-parallel recompute pass (info_nce's kernel)
    dWs_k = (alpha / tau_s) (sum_r m_r sigma_rk h_r - sum_i p_ik G_i)
dWs is one program per tile of prototypes looping over every student and teacher row (no atomics,
deterministic), skipped when ``student_weight`` does not require grad (DINO's frozen last layer). The
pairing only enters through m, Usum and G, O(N d) torch, so the kernels do not know about crops.

Numerics: exp, lse and every accumulator in fp32; the matmul operands in the input dtype. The softmax
weights are multiplied by W_SCALE = 1024 (exact, undone in fp32) before they are rounded for the second
matmul, so that fp16 keeps the weights of K = 65,536 near-uniform prototypes (~1.5e-5) out of its
subnormal range. No bound on the logits is assumed (unnormalised features, trainable prototype norms).
dh and dWs are differences of two terms accumulated apart (m E against Usum; the student sum against the
teacher sum), so where student and teacher agree closely they cancel, and in fp16 / bf16 the error is relative
to the terms (the softmax weights rounded for the matmuls), not to their difference (which a materialised
logit gradient, formed elementwise in fp32, would keep).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import Impl, define_op, triton_reason
from ._custom_op import define
from ._triton import INTERPRET, tl, triton
from ._validate import FLOAT_DTYPES, check_tensor, compute_dtype
from .info_nce import SHARED_MEMORY_LIMIT, _block_d, _flags, gpu_width_reason, lse_backward, lse_forward

MAX_TRITON_DIM = 1024  # the kernels keep a [rows, d] fp32 accumulator per program
PAIRINGS = ("cross", "identity")
W_SCALE = 1024.0       # see the module docstring (fp16 subnormals); a power of two, so exact
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Reference: the logits materialised, DINO's loop over crop pairs (student log-softmax once per crop)
# ----------------------------------------------------------------------------------------------
def prototype_cross_entropy_ref(student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor,
                                teacher_weight: torch.Tensor, center: Optional[torch.Tensor], student_temp: float,
                                teacher_temp: float, num_global: int, pairing: str) -> torch.Tensor:
    dtype = compute_dtype(student.dtype, teacher.dtype, student_weight.dtype, teacher_weight.dtype)
    log_q = F.log_softmax(student.to(dtype) @ student_weight.to(dtype).T / student_temp, dim=-1)
    with torch.no_grad():
        z = teacher.to(dtype) @ teacher_weight.to(dtype).T
        if center is not None:
            z = z - center.to(dtype)
        p = F.softmax(z / teacher_temp, dim=-1)
    if pairing == "identity":
        return -(p * log_q).sum(-1).mean()
    batch = teacher.shape[0] // num_global
    log_q, p = log_q.split(batch), p.split(batch)
    total, terms = 0.0, 0
    for i, target in enumerate(p):
        for v, log_student in enumerate(log_q):
            if v != i:
                total = total + (-(target * log_student).sum(-1)).mean()
                terms += 1
    return total / terms


# ----------------------------------------------------------------------------------------------
# The pairing as per-row quantities (O(N d) torch). num_global = 0 means the identity pairing.
# ----------------------------------------------------------------------------------------------
def _crops(num_student: int, num_teacher: int, num_global: int) -> tuple[int, int]:
    """(batch B, student crops n_c) of the cross pairing."""
    batch = num_teacher // num_global
    return batch, num_student // batch


def _pair_count(num_student: int, num_teacher: int, num_global: int) -> int:
    """The number of (teacher row, student row) pairs the loss averages over."""
    if num_global == 0:
        return num_student
    batch, crops = _crops(num_student, num_teacher, num_global)
    return batch * num_global * (crops - 1)


def _student_mass(num_student: int, num_teacher: int, num_global: int, device) -> torch.Tensor:
    """m_r: how many teacher rows student row r is paired with, fp32 [N_s]."""
    mass = torch.ones(num_student, device=device, dtype=torch.float32)
    if num_global == 0:
        return mass
    batch, crops = _crops(num_student, num_teacher, num_global)
    mass = mass.mul_(num_global).view(crops, batch)
    mass[:num_global] -= 1.0  # a global crop is not paired with its own teacher view
    return mass.view(-1)


def _sum_over_pairs(x: torch.Tensor, num_out: int, num_global: int, teacher_to_student: bool) -> torch.Tensor:
    """For each output row, the sum of the rows of ``x`` paired with it (fp32).

    teacher_to_student: x is [N_t, d] (U), the result [N_s, d] (Usum); else x is [N_s, d] (h), the result
    [N_t, d] (G). In both directions the pairs of image b are all crops of b except the matching global crop.
    """
    if num_global == 0:
        return x.float()
    dim = x.shape[1]
    if teacher_to_student:
        batch = x.shape[0] // num_global
        crops, globals_ = num_out // batch, x.float().view(num_global, batch, dim)
        out = globals_.sum(0).expand(crops, batch, dim).clone()
        out[:num_global] -= globals_
    else:
        batch = num_out // num_global
        crops = x.shape[0] // batch
        views = x.float().view(crops, batch, dim)
        out = views.sum(0) - views[:num_global]
    return out.reshape(-1, dim)


# ----------------------------------------------------------------------------------------------
# Triton kernels (logits in log2 units: s2 = s * log2(e), exp2 is the native instruction)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _teacher_pass_kernel(HT, WT, WS, CENTER, U_PART, M_PART, L_PART, num_rows, num_protos, dim, chunk,
                         stride_t, stride_wt, stride_ws, inv_temp2,
                         HAS_CENTER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         WEIGHT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # Over the prototypes [split * chunk, (split + 1) * chunk): a2 = (t Wt^T - c) * log2(e) / tau_t, running
    # max m and sum l = sum exp2(a2 - m), and acc = W_SCALE * sum exp2(a2 - m) Ws (rescaled as m grows).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    d_ok = offs_d < dim
    t = tl.load(HT + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter cannot do bf16 arithmetic
        t = t.to(tl.float32)
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, num_protos)
    m = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < k_hi
        tile_mask = col_ok[:, None] & d_ok[None, :]
        wt = tl.load(WT + cols.to(tl.int64)[:, None] * stride_wt + offs_d[None, :], mask=tile_mask, other=0.0)
        ws = tl.load(WS + cols.to(tl.int64)[:, None] * stride_ws + offs_d[None, :], mask=tile_mask, other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
            ws = ws.to(tl.float32)
        z = tl.dot(t, tl.trans(wt), input_precision=PRECISION)
        if HAS_CENTER:
            z -= tl.load(CENTER + cols, mask=col_ok, other=0.0)[None, :]
        a2 = tl.where(col_ok[None, :], z * inv_temp2, float("-inf"))
        m_new = tl.maximum(m, tl.max(a2, axis=1))  # finite: every tile of the range has a valid prototype
        rescale = tl.exp2(m - m_new)
        p = tl.exp2(a2 - m_new[:, None])
        l = l * rescale + tl.sum(p, axis=1)
        w = p * WEIGHT_SCALE
        if UPCAST:  # round as the GPU does before its low-precision matmul
            w = w.to(WS.dtype.element_ty).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(w.to(ws.dtype), ws, input_precision=PRECISION)
        m = m_new
    part = split.to(tl.int64) * num_rows + rows
    tl.store(U_PART + part[:, None] * dim + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(M_PART + part, m, mask=row_ok)
    tl.store(L_PART + part, l, mask=row_ok)


@triton.jit
def _prototype_grad_kernel(HS, WS, LSE_S, MASS, HT, WT, CENTER, LSE_T, G, DW,
                           num_student, num_teacher, num_protos, dim,
                           stride_s, stride_ws, stride_t, stride_wt, stride_g, stride_dw,
                           inv_temp_s2, inv_temp_t2,
                           HAS_CENTER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           WEIGHT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    # For this program's prototypes k: dW_k = sum_r m_r sigma_rk h_r - sum_i p_ik G_i, sigma and p recomputed
    # from the saved lse_s / lse_t, both weights scaled by W_SCALE before rounding and unscaled at the end.
    protos = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = protos < num_protos
    d_ok = offs_d < dim
    proto_mask = k_ok[:, None] & d_ok[None, :]
    ws = tl.load(WS + protos.to(tl.int64)[:, None] * stride_ws + offs_d[None, :], mask=proto_mask, other=0.0)
    wt = tl.load(WT + protos.to(tl.int64)[:, None] * stride_wt + offs_d[None, :], mask=proto_mask, other=0.0)
    if UPCAST:
        ws = ws.to(tl.float32)
        wt = wt.to(tl.float32)
    if HAS_CENTER:
        c = tl.load(CENTER + protos, mask=k_ok, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, num_student, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < num_student
        h = tl.load(HS + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
        lse2 = tl.load(LSE_S + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634  # padding: weight 0
        mass = tl.load(MASS + rows, mask=row_ok, other=0.0) * WEIGHT_SCALE
        s2 = tl.dot(h, tl.trans(ws), input_precision=PRECISION) * inv_temp_s2
        w = mass[:, None] * tl.exp2(s2 - lse2[:, None])
        w = tl.where(row_ok[:, None] & k_ok[None, :], w, 0.0)  # select, never multiply, padding away
        if UPCAST:
            w = w.to(HS.dtype.element_ty).to(tl.float32)
        acc += tl.dot(tl.trans(w.to(h.dtype)), h, input_precision=PRECISION)
    for start in range(0, num_teacher, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < num_teacher
        row_mask = row_ok[:, None] & d_ok[None, :]
        t = tl.load(HT + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :], mask=row_mask, other=0.0)
        g = tl.load(G + rows.to(tl.int64)[:, None] * stride_g + offs_d[None, :], mask=row_mask, other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
            g = g.to(tl.float32)
        lse2 = tl.load(LSE_T + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        z = tl.dot(t, tl.trans(wt), input_precision=PRECISION)
        if HAS_CENTER:
            z -= c[None, :]
        p = tl.exp2(z * inv_temp_t2 - lse2[:, None]) * WEIGHT_SCALE
        p = tl.where(row_ok[:, None] & k_ok[None, :], p, 0.0)
        if UPCAST:
            p = p.to(G.dtype.element_ty).to(tl.float32)
        acc -= tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=PRECISION)
    tl.store(DW + protos.to(tl.int64)[:, None] * stride_dw + offs_d[None, :], acc * (1.0 / WEIGHT_SCALE),
             mask=proto_mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations: small tiles under the interpreter, sm_90-sized (shared memory checked) on a GPU
# ----------------------------------------------------------------------------------------------
def _interpret_blocks(num_rows: int, num_cols: int) -> tuple[int, int]:
    # the interpreter runs programs one by one in Python: few, small tiles (tl.dot needs >= 16)
    return (16 if num_rows <= 64 else 32), (16 if num_cols <= 64 else 32)


def shared_bytes(kind: str, block_m: int, block_n: int, block_d: int, num_stages: int, elsize: int) -> int:
    """Shared memory of a config, a bound checked against Triton's sm_90 layouts (``make aot-check``): the tiles a
    program keeps ([BLOCK_M, d] of t, or [BLOCK_K, d] of Ws and Wt), ``num_stages`` buffers of the two streamed
    [BLOCK_N, d] tiles, and the weight tile of the second matmul."""
    kept = block_m * block_d * (1 if kind == "teacher" else 2)
    return (kept + num_stages * 2 * block_n * block_d + block_m * block_n) * elsize


# (rows, BLOCK_N, warps) in order of preference per kind and row width, as compiled for sm_90 (make aot-check):
# the first two that fit in shared memory are offered. 64-row tiles (wgmma) where they neither spill nor
# overflow; the [BLOCK_K, d] fp32 accumulator of the prototype gradient at d = 512 does not fit in registers
# with 64 rows, so that kernel falls back to 32-row (mma.sync) tiles there, as info_nce's backward does.
_PREFERRED = {
    ("teacher", 128): [(128, 64, 8), (64, 64, 4), (64, 32, 4)],
    ("teacher", 256): [(64, 64, 8), (128, 32, 8), (64, 32, 8)],
    ("teacher", 512): [(64, 32, 8), (32, 32, 8), (16, 32, 8), (16, 16, 8)],
    ("teacher", 1024): [(32, 32, 8), (16, 32, 8), (16, 16, 8)],
    ("grad", 128): [(64, 64, 8), (64, 32, 4), (64, 16, 4)],
    ("grad", 256): [(64, 32, 8), (64, 16, 8), (32, 16, 8)],
    ("grad", 512): [(32, 32, 8), (16, 32, 8), (16, 16, 8)],
    ("grad", 1024): [(16, 32, 8), (16, 16, 8)],
}


def _gpu_configs(kind: str, block_d: int, elsize: int) -> list:
    """Autotuning configs (at most two: cold compiles cost seconds each) that fit in shared memory, only 64-row
    (wgmma) ones where any fits, or []. For "teacher" the rows are teacher rows (BLOCK_M); for "grad" the
    prototypes of one program (BLOCK_K)."""
    fits = [(rows, bn, warps) for rows, bn, warps in _PREFERRED[kind, max(128, block_d)]
            if shared_bytes(kind, rows, bn, block_d, 2, elsize) <= SHARED_MEMORY_LIMIT]
    wgmma = [c for c in fits if c[0] >= 64]
    return [triton.Config({_ROWS[kind]: rows, "BLOCK_N": bn}, num_warps=warps, num_stages=2)
            for rows, bn, warps in (wgmma or fits)[:2]]


_ROWS = {"teacher": "BLOCK_M", "grad": "BLOCK_K"}


def width_reason(dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why the GPU kernels cannot serve rows of ``dim`` values of ``dtype``, or None (this op's and
    info_nce's, whose lse kernels it reuses)."""
    if dim > MAX_TRITON_DIM:
        return f"d={dim} > {MAX_TRITON_DIM} (the Triton kernel's limit)"
    elsize = torch.empty((), dtype=dtype).element_size()
    for kind in _ROWS:
        if not _gpu_configs(kind, _block_d(dim), elsize):
            return (f"d={dim} in {str(dtype).replace('torch.', '')}: no {kind} tile of the Triton kernel fits "
                    f"{SHARED_MEMORY_LIMIT // 1024} KB of shared memory")
    return gpu_width_reason(dim, dtype)


_TUNED: dict = {}


def _tuned(kind: str, block_d: int, elsize: int):
    key = (kind, block_d, elsize)
    if key not in _TUNED:
        kernel = _teacher_pass_kernel if kind == "teacher" else _prototype_grad_kernel
        _TUNED[key] = triton.autotune(configs=_gpu_configs(kind, block_d, elsize),
                                      key=["num_protos", "HAS_CENTER", "UPCAST", "PRECISION"])(kernel)
    return _TUNED[key]


def split_size(num_rows: int, num_protos: int, target_programs: int) -> int:
    """Prototypes per program of the teacher pass. Few teacher rows (2B) would leave most of a GPU idle, so the
    prototypes are split until there are about ``target_programs`` programs (64-row tiles assumed), each with at
    least 512 prototypes; the partial statistics cost [splits, N_t, d] fp32, bounded by that program count."""
    splits = max(1, min(triton.cdiv(num_protos, 512), triton.cdiv(target_programs, triton.cdiv(num_rows, 64))))
    return triton.cdiv(triton.cdiv(num_protos, splits), 64) * 64


def _teacher_split(num_rows: int, num_protos: int, device: torch.device) -> int:
    if INTERPRET:
        return 256  # several splits at the tests' K = 600 and 4096: the merge is exercised
    # 132 SMs (H100 / H200) where there is no GPU to ask: benchmarks/aot_check compiles for one on the CPU
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return split_size(num_rows, num_protos, 2 * sms)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def teacher_pass(teacher: torch.Tensor, teacher_weight: torch.Tensor, student_weight: torch.Tensor,
                 center: Optional[torch.Tensor], inv_temp_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U = softmax((t Wt^T - c) / tau_t) Ws [N_t, d], lse of those logits [N_t]), both fp32."""
    t, wt, ws = teacher.contiguous(), teacher_weight.contiguous(), student_weight.contiguous()
    (num_rows, dim), num_protos = t.shape, wt.shape[0]
    chunk = _teacher_split(num_rows, num_protos, t.device)
    splits = triton.cdiv(num_protos, chunk)
    u_part = torch.empty(splits, num_rows, dim, device=t.device, dtype=torch.float32)
    m_part, l_part = (torch.empty(splits, num_rows, device=t.device, dtype=torch.float32) for _ in range(2))
    c = center.contiguous() if center is not None else m_part  # unused pointer when HAS_CENTER is off
    args = (t, wt, ws, c, u_part, m_part, l_part, num_rows, num_protos, dim, chunk,
            t.stride(0), wt.stride(0), ws.stride(0), inv_temp_t * _LOG2E)
    flags = {"HAS_CENTER": center is not None, **_kernel_flags(t)}
    block_d = _block_d(dim)
    if INTERPRET:
        bm, bn = _interpret_blocks(num_rows, min(chunk, num_protos))
        _teacher_pass_kernel[(triton.cdiv(num_rows, bm), splits)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                                                                   BLOCK_D=block_d)
    else:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), splits)  # noqa: E731
        _tuned("teacher", block_d, t.element_size())[grid](*args, **flags, BLOCK_D=block_d)
    if splits == 1:
        m, l, u = m_part[0], l_part[0], u_part[0]
    else:  # merge the splits' online-softmax states
        m = m_part.amax(0)
        rescale = torch.exp2(m_part - m)
        l = (l_part * rescale).sum(0)
        u = (u_part * rescale[..., None]).sum(0)
    return u / (l * W_SCALE)[:, None], (m + torch.log2(l)) * _LN2


def prototype_grad(student: torch.Tensor, student_weight: torch.Tensor, lse_s: torch.Tensor, mass: torch.Tensor,
                   teacher: torch.Tensor, teacher_weight: torch.Tensor, center: Optional[torch.Tensor],
                   lse_t: torch.Tensor, values: torch.Tensor, inv_temp_s: float, inv_temp_t: float) -> torch.Tensor:
    """sum_r mass_r softmax(s_r)_k h_r - sum_i p_ik values_i for every prototype k: fp32 [K, d]."""
    h, ws, t, wt = (x.contiguous() for x in (student, student_weight, teacher, teacher_weight))
    g = values.to(h.dtype).contiguous()
    (num_student, dim), num_teacher, num_protos = h.shape, t.shape[0], ws.shape[0]
    out = torch.empty(num_protos, dim, device=h.device, dtype=torch.float32)
    c = center.contiguous() if center is not None else out
    args = (h, ws, lse_s.contiguous(), mass.float().contiguous(), t, wt, c, lse_t.contiguous(), g, out,
            num_student, num_teacher, num_protos, dim, h.stride(0), ws.stride(0), t.stride(0), wt.stride(0),
            g.stride(0), out.stride(0), inv_temp_s * _LOG2E, inv_temp_t * _LOG2E)
    flags = {"HAS_CENTER": center is not None, **_kernel_flags(h)}
    block_d = _block_d(dim)
    if INTERPRET:
        bn, bk = _interpret_blocks(max(num_student, num_teacher), num_protos)
        _prototype_grad_kernel[(triton.cdiv(num_protos, bk),)](*args, **flags, BLOCK_K=bk, BLOCK_N=bn,
                                                               BLOCK_D=block_d)
    else:
        grid = lambda meta: (triton.cdiv(num_protos, meta["BLOCK_K"]),)  # noqa: E731
        _tuned("grad", block_d, h.element_size())[grid](*args, **flags, BLOCK_D=block_d)
    return out


def _kernel_flags(x: torch.Tensor) -> dict:
    flags = _flags(x, None)
    return {"UPCAST": flags["UPCAST"], "PRECISION": flags["PRECISION"], "WEIGHT_SCALE": W_SCALE}


# ----------------------------------------------------------------------------------------------
# Custom ops (traceable by torch.compile). The teacher-side inputs arrive detached: no gradient for them.
# ----------------------------------------------------------------------------------------------
def _forward(student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor,
             teacher_weight: torch.Tensor, center: Optional[torch.Tensor], inv_temp_s: float, inv_temp_t: float,
             num_global: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, U, lse_s, lse_t); the last three are what the backward needs."""
    num_student, num_teacher = student.shape[0], teacher.shape[0]
    u, lse_t = teacher_pass(teacher, teacher_weight, student_weight, center, inv_temp_t)
    scale = torch.full((), inv_temp_s, device=student.device, dtype=torch.float32)  # no host copy
    lse_s = lse_forward(student, student_weight, scale)[0]
    mass = _student_mass(num_student, num_teacher, num_global, student.device)
    u_sum = _sum_over_pairs(u, num_student, num_global, teacher_to_student=True)
    total = (mass * lse_s).sum() - inv_temp_s * (student.float() * u_sum).sum()
    return total / _pair_count(num_student, num_teacher, num_global), u, lse_s, lse_t


def _forward_fake(student, teacher, student_weight, teacher_weight, center, inv_temp_s, inv_temp_t, num_global):
    f32 = dict(dtype=torch.float32)
    return (student.new_empty((), **f32), teacher.new_empty(teacher.shape, **f32),
            student.new_empty(student.shape[0], **f32), teacher.new_empty(teacher.shape[0], **f32))


def _grads(student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor, teacher_weight: torch.Tensor,
           center: Optional[torch.Tensor], u: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
           grad: torch.Tensor, inv_temp_s: float, inv_temp_t: float, num_global: int, need_student: bool,
           need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d student or [0], d loss / d student_weight or [0]) in the inputs' dtypes, for upstream ``grad``."""
    num_student, num_teacher = student.shape[0], teacher.shape[0]
    mass = _student_mass(num_student, num_teacher, num_global, student.device)
    coef = grad.float() / _pair_count(num_student, num_teacher, num_global)  # alpha, times the upstream gradient
    d_student = student.new_empty(0)
    d_weight = student_weight.new_empty(0)
    if need_student:  # (alpha / tau_s) (m E - Usum), formed in fp32 and rounded once
        scale = torch.full((), inv_temp_s, device=student.device, dtype=torch.float32)  # no host copy
        expected = lse_backward(student, student_weight, scale, (lse_s, mass * W_SCALE, None), None)
        u_sum = _sum_over_pairs(u, num_student, num_global, teacher_to_student=True)
        d_student = ((expected * (1.0 / W_SCALE) - inv_temp_s * u_sum) * coef).to(student.dtype)
    if need_weight:
        values = _sum_over_pairs(student, num_teacher, num_global, teacher_to_student=False)
        bracket = prototype_grad(student, student_weight, lse_s, mass, teacher, teacher_weight, center, lse_t,
                                 values, inv_temp_s, inv_temp_t)
        d_weight = (bracket * (coef * inv_temp_s)).to(student_weight.dtype)
    return d_student, d_weight


def _grads_fake(student, teacher, student_weight, teacher_weight, center, u, lse_s, lse_t, grad, inv_temp_s,
                inv_temp_t, num_global, need_student, need_weight):
    return (student.new_empty(student.shape if need_student else (0,)),
            student_weight.new_empty(student_weight.shape if need_weight else (0,)))


prototype_ce_bwd = define("prototype_cross_entropy_bwd", _grads, fake=_grads_fake)


def _setup(ctx, inputs, output):
    student, teacher, student_weight, teacher_weight, center, inv_temp_s, inv_temp_t, num_global = inputs
    _, u, lse_s, lse_t = output
    ctx.mark_non_differentiable(u, lse_s, lse_t)
    ctx.save_for_backward(student, teacher, student_weight, teacher_weight, center, u, lse_s, lse_t)
    ctx.consts = (inv_temp_s, inv_temp_t, num_global)


def _backward(ctx, grad_loss, _grad_u, _grad_lse_s, _grad_lse_t):
    need_student, _, need_weight = ctx.needs_input_grad[:3]
    if grad_loss is None or not (need_student or need_weight):
        return (None,) * 8
    d_student, d_weight = prototype_ce_bwd(*ctx.saved_tensors, grad_loss, *ctx.consts, need_student, need_weight)
    return (d_student if need_student else None), None, (d_weight if need_weight else None), None, None, None, None, \
        None


prototype_ce = define("prototype_cross_entropy", _forward, fake=_forward_fake, backward=_backward,
                      setup_context=_setup)


def triton_supports(device, student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor,
                    teacher_weight: torch.Tensor, *_) -> Optional[str]:
    why = triton_reason(device, student, teacher, student_weight, teacher_weight)
    if why is None and student.shape[1] > MAX_TRITON_DIM:
        why = f"d={student.shape[1]} > {MAX_TRITON_DIM} (the Triton kernel's limit)"
    if why is None and device.type == "cuda":  # the interpreter has no shared memory to run out of
        why = width_reason(student.shape[1], student.dtype)
    return why


def prototype_cross_entropy_triton(student, teacher, student_weight, teacher_weight, center, student_temp: float,
                                   teacher_temp: float, num_global: int, pairing: str) -> torch.Tensor:
    # a copy (K values): the caller updates its running centre in place after the loss, before the backward
    c = center.detach().float().clone() if center is not None else None
    return prototype_ce(student, teacher.detach(), student_weight, teacher_weight.detach(), c, 1.0 / student_temp,
                        1.0 / teacher_temp, num_global if pairing == "cross" else 0)[0]


_OP = define_op(
    "prototype_cross_entropy",
    reference=Impl(prototype_cross_entropy_ref),
    triton=Impl(prototype_cross_entropy_triton, triton_supports),
)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _check_temp(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def _check_inputs(student, teacher, student_weight, teacher_weight, center, num_global, pairing) -> None:
    check_tensor("student", student, ndim=2, dtypes=FLOAT_DTYPES)
    device, dtype, dim = student.device, student.dtype, student.shape[1]
    for name, t in (("teacher", teacher), ("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of student ({dtype}), got {t.dtype}")
        if t.shape[1] != dim:
            raise ValueError(f"{name} must have d={dim} columns like student, got shape {list(t.shape)}")
    num_protos = student_weight.shape[0]
    if dim < 1 or num_protos < 1:
        raise ValueError(f"student_weight must be [K, d] with K, d >= 1, got shape {list(student_weight.shape)}")
    if teacher_weight.shape[0] != num_protos:
        raise ValueError(f"teacher_weight must have K={num_protos} rows like student_weight, "
                         f"got shape {list(teacher_weight.shape)}")
    if center is not None:
        check_tensor("center", center, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if center.shape[0] != num_protos:
            raise ValueError(f"center must have shape [{num_protos}] (one value per prototype), "
                             f"got {list(center.shape)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    num_student, num_teacher = student.shape[0], teacher.shape[0]
    if pairing == "identity":
        if num_student != num_teacher or num_student < 1:
            raise ValueError(f"pairing='identity' needs student and teacher with the same number (>= 1) of rows, "
                             f"got {num_student} and {num_teacher}")
        return
    if isinstance(num_global, bool) or not isinstance(num_global, int) or num_global < 1:
        raise ValueError(f"num_global must be an int >= 1, got {num_global!r}")
    if num_teacher < num_global or num_teacher % num_global:
        raise ValueError(f"teacher must have num_global * B rows (num_global={num_global} global crops of B "
                         f"images), got {num_teacher} rows")
    batch = num_teacher // num_global
    if num_student % batch or num_student // batch < num_global:
        raise ValueError(f"student must have n_c * B rows with n_c >= num_global={num_global} crops of B={batch} "
                         f"images (crop-major), got {num_student} rows")
    if num_student // batch == 1:
        raise ValueError("pairing='cross' with one student crop and num_global=1 pairs no crops: "
                         "the student needs a crop other than the teacher's")


def prototype_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor,
                            teacher_weight: torch.Tensor, center: Optional[torch.Tensor] = None, *,
                            student_temp: float = 0.1, teacher_temp: float = 0.04, num_global: int = 2,
                            pairing: str = "cross", backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy between teacher and student softmaxes over K prototypes (DINO's loss), logits never stored.

    Args:
        student: [n_c * B, d] student features (bottleneck outputs), crop-major: row v * B + b is crop v of
            image b; the first ``num_global`` crops are the global crops the teacher also saw.
        teacher: [num_global * B, d] teacher features, crop-major; no gradient flows into it ("cross"), or
            [N, d] with N = student rows ("identity").
        student_weight: [K, d] the effective student prototypes (apply weight norm g * v / |v| before the call:
            the gradient reaches v and g through it). Not requiring grad (a frozen last layer) skips the
            prototype-gradient pass.
        teacher_weight: [K, d] the teacher prototypes; no gradient flows into it.
        center: None or [K] subtracted from the raw teacher logits before the temperature (see
            ``prototype_center``); no gradient flows into it. Any float dtype (used in fp32).
        student_temp, teacher_temp: temperatures tau_s, tau_t > 0 (floats).
        num_global: teacher crops ("cross" only).
        pairing: "cross": teacher crop i against every student crop v != i of the same image, the mean over
            the num_global * (n_c - 1) crop pairs and the B images; "identity": row r against row r, the mean
            over rows (MOKD's feature-search term).
        backend: "auto" | "reference" | "triton" (None: the process default, ``set_backend``).
    Returns:
        a 0-dim loss, mean over pairs of -sum_k p_k log softmax(s)_k with s = student Ws^T / tau_s and
        p = softmax((teacher Wt^T - center) / tau_t): fp32 (float64 for float64 inputs).

    Backends: reference (materialises the [N, K] logits; the student log-softmax is computed once per crop, not
    once per pair); triton (never materialises them: saves O(N d), recomputes the logits tile by tile in the
    backward; see the module docstring). ``auto`` picks Triton on CUDA tensors, the reference elsewhere.
    Dtypes: student, teacher and both weights share one of float32, float16, bfloat16 (fp32 accumulation; the
    loss is fp32), or float64 (reference only). Limits: the Triton kernels need d <= 1024 (MAX_TRITON_DIM), and
    d <= 512 on a GPU (info_nce's lse kernels spill registers beyond); ``auto`` uses the reference beyond. No bound on
    the logits' magnitude is assumed. The centre is copied (K values): updating it in place after the loss, before
    the backward, is safe; ``teacher`` and the weights must not be modified in place before the backward.
    """
    _check_inputs(student, teacher, student_weight, teacher_weight, center, num_global, pairing)
    student_temp = _check_temp("student_temp", student_temp)
    teacher_temp = _check_temp("teacher_temp", teacher_temp)
    return _OP(backend, student.device, student, teacher, student_weight, teacher_weight, center, student_temp,
               teacher_temp, num_global, pairing)


def prototype_center(teacher: torch.Tensor, teacher_weight: torch.Tensor,
                     group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """The batch mean of the raw teacher logits, ``(teacher @ teacher_weight.T).mean(0)``, as one GEMV.

    The logits have no bias, so their mean is ``teacher_weight @ mean(teacher)``: the mean of the [N, d]
    features (all-reduced over ``group`` when given: every rank must hold the same number of rows), then
    one [K, d] x [d] product. No gradient. Returns [K] in float32 (float64 for float64 inputs). The caller
    keeps the running centre, e.g. ``center = 0.9 * center + 0.1 * prototype_center(t, Wt)`` after the loss.
    """
    check_tensor("teacher", teacher, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("teacher_weight", teacher_weight, ndim=2, dtypes=FLOAT_DTYPES, device=teacher.device)
    if teacher_weight.shape[1] != teacher.shape[1]:
        raise ValueError(f"teacher_weight must have d={teacher.shape[1]} columns like teacher, "
                         f"got shape {list(teacher_weight.shape)}")
    if teacher.shape[0] < 1:
        raise ValueError("teacher must have at least one row")
    dtype = compute_dtype(teacher.dtype, teacher_weight.dtype)
    with torch.no_grad():
        mean = teacher.to(dtype).mean(0)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(mean, group=group)
            mean = mean / dist.get_world_size(group)
        return teacher_weight.to(dtype) @ mean
