"""InfoNCE (CLIP / MoCo v3 contrastive loss) without materialising the N x N logits.

With logits s_ij = q_i . k_j / tau (rows q, columns k, the positive of row i is column i):
    loss = mean_i [ lse_i - s_ii ],   lse_i = log sum_j exp(s_ij)
symmetric=True averages both directions: 0.5 * (loss(q -> k) + loss(k -> q)), the CLIP loss. MoCo v3
additionally multiplies its loss by 2 * tau; that factor is NOT applied here (multiply it yourself).

Split of work. Only the log-sum-exp needs the N x N matrix, so it is the kernel: the op
``sslpt::info_nce_lse`` streams tiles of S = Q K^T, keeps an online max / sum per row and returns
lse_i (and, for symmetric, the column lse) plus the positive logit s_ii, all fp32; loss = mean(lse - s_ii)
is then a torch op on N numbers. The normalisation (q / |q|) and 1/tau are O(N d) torch ops around the
kernel, so autograd differentiates them (a few extra passes over [N, d], negligible beside N^2 d).

Gradient of L = sum_i [g_i lse_i + p_i s_ii] (+ sum_j h_j clse_j for the column direction), c = 1/tau:
    P_ij = exp(s_ij - lse_i),  Pc_ij = exp(s_ij - clse_j),  W_ij = g_i P_ij + h_j Pc_ij + p_i [i == j]
    dL/dq_i = c sum_j W_ij k_j      dL/dk_j = c sum_i W_ij q_i
    dL/dc   = sum_ij W_ij q_i.k_j = (1/c) sum_i q_i . dL/dq_i
With g_i = 1/N, p_i = -1/N this is dQ = (P - I) K / (N tau). W is formed in fp32 inside the kernel before
it is rounded to the input dtype for the second matmul, so P_ii - 1 keeps its precision when P_ii is
near 1 (a confident positive); adding -K/(N tau) outside the kernel in bf16 would cancel catastrophically.
A learnable temperature costs one O(N d) dot product on top of dQ. The backward recomputes S tile by
tile: a row-parallel dQ pass and a column-parallel dK pass, both the same kernel with the roles of q and
k swapped (Inf-CL's design; no atomics, deterministic). For symmetric both directions share these two
passes (one W per tile); the forward runs the row and the column lse as two passes (not fused).
FLOPs per direction: forward 2N^2 d; backward 2 passes x (2N^2 d recompute + 2N^2 d) = 8N^2 d, so 10N^2 d in
all against the 8N^2 d minimum of a backward that recomputes S once.

Across GPUs (group given): each rank holds N_local rows of q and k. Keys (and, for symmetric, queries)
are all-gathered with gradient (the backward sums the key gradients of all ranks onto their owner), so
every rank's rows see all W * N_local keys as negatives. Each rank returns the MEAN over its own rows.
The average of those losses over ranks is the global-batch loss, and DDP's gradient averaging (or FSDP's)
then gives exactly the gradient of the global-batch loss that one process holding the whole batch would
get. Input gradients on a rank are therefore W times the single-process ones. If gradients are summed
across ranks instead of averaged, divide the loss by the world size. Ranks must hold equal N_local.

Against a queue (MoCo v2, DenseCL): ``queue`` [Q, d] holds keys of earlier steps, extra negatives for every row.
With in_batch_negatives=True row i's candidates are all (gathered) keys and the queue; with False (MoCo v2's
form) only its own positive k_i and the queue: logits [q_i . k_i ; q_i . queue_j for all j] / tau, label 0.
The queue is one more block of columns for the same streaming lse kernels (``sslpt::info_nce_queue_lse``):
lse_i over the queue is merged with the positive (or the in-batch lse) by a logaddexp, never an N x (N + Q)
matrix. The queue is a constant: it never receives a gradient (the caller's queue is detached). In MoCo v2's
form the positive's gradient terms (P_pos - 1) k_i are added to the kernel's fp32 queue gradient before one
rounding to the input dtype, for the same reason as above. With a group the queue is the same on every rank
(all ranks enqueue the gathered keys), so it is never gathered.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import Impl, cuda_reason, define_op, triton_reason
from ._custom_op import define
from ._triton import INTERPRET, tl, triton
from ._validate import FLOAT_DTYPES, check_shape, check_tensor

MAX_TRITON_DIM = 2048  # the backward keeps a [BLOCK_M, d] fp32 accumulator per program
# On a GPU, the widest rows whose every tile compiles for sm_90 without spilling registers or overflowing shared
# memory (make aot-check, Triton 3.6-3.9, fp32 with TF32 dots and bf16; at 1000 values every tile spilled). Wider
# rows are matmul-bound anyway, so the CUDA backend's blocked cuBLAS logits lose little there.
MAX_GPU_DIM = 512


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by nt_xent)
# ----------------------------------------------------------------------------------------------
def check_temperature(temperature, device: torch.device) -> None:
    """A positive finite float, or a 0-dim floating tensor (on ``device`` or the CPU).

    A tensor's value is read on the host only where that is free: a CPU tensor outside torch.compile. On an
    accelerator, and while torch.compile traces (a learnable temperature under fullgraph=True), it is a
    device-side assert instead: no host sync, no graph break.
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {list(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor, got {temperature.dtype}")
        if temperature.device.type != "cpu" and temperature.device != device:
            raise ValueError(f"temperature must be on {device} or the CPU, got {temperature.device}")
        value = temperature.detach()
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool((value > 0) & torch.isfinite(value)):
                raise ValueError(f"temperature must be > 0 and finite, got {value.item()}")
        else:
            torch._assert_async((value > 0) & torch.isfinite(value), "temperature must be > 0 and finite")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")


def inverse_temperature(temperature, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 / temperature as a 0-dim tensor on ``device``; differentiable when temperature is a tensor."""
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature.to(device=device, dtype=dtype)
    return torch.tensor(1.0 / temperature, device=device, dtype=dtype)


def gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``x`` from every rank of ``group`` (rank order); the backward sums gradients onto owners.

    One all_gather_into_tensor through torch's functional collectives (whose backward is a sum
    reduce-scatter: every rank gets the sum over ranks of the gradients of its own rows), not the deprecated
    list-based ``torch.distributed.nn.functional.all_gather``.
    """
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd  # torch < 2.13
    return gather(x.contiguous(), 0, group)


def rank_in(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=group)


# ----------------------------------------------------------------------------------------------
# Reference: materialised logits + F.cross_entropy (the truth; the CPU path)
# ----------------------------------------------------------------------------------------------
def info_nce_ref(q: torch.Tensor, k: torch.Tensor, temperature, normalize: bool = True,
                 symmetric: bool = False, group=None, queue: Optional[torch.Tensor] = None,
                 in_batch_negatives: bool = True) -> torch.Tensor:
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    scale = inverse_temperature(temperature, q.device, dtype)
    if queue is not None:
        queue = queue.detach().to(dtype)
        queue = F.normalize(queue, dim=-1) if normalize else queue
        if not in_batch_negatives:  # MoCo v2: [positive ; queue], label 0
            logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], dim=1) * scale
            return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    labels = torch.arange(q.shape[0], device=q.device)
    if group is not None:
        labels = labels + rank_in(group) * q.shape[0]
    keys = gather_with_grad(k, group) if group is not None else k
    if queue is not None:
        return F.cross_entropy(torch.cat([q @ keys.T, q @ queue.T], dim=1) * scale, labels)
    loss = F.cross_entropy(q @ keys.T * scale, labels)
    if symmetric:
        queries = gather_with_grad(q, group) if group is not None else q
        loss = 0.5 * (loss + F.cross_entropy(k @ queries.T * scale, labels))
    return loss


# ----------------------------------------------------------------------------------------------
# Triton kernels. Rows A[R, D] against columns B[C, D]; s = scale * A B^T. Optional:
#  - "self" entries (col == row + self_offset) are excluded (NT-Xent);
#  - the positive of row r is column pos(r) = pos_offset + (r + pos_shift) % pos_period.
# Logits are kept in log2 units (exp2 is the native instruction): s2 = s * log2(e).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _info_nce_fwd_kernel(A, B, SCALE, LSE, POS, num_rows, num_cols, dim, stride_a, stride_b,
                         self_offset, pos_offset, pos_shift, pos_period,
                         HAS_SELF: tl.constexpr, HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # lse_r = log sum_c exp(s_rc) by an online max m_r and sum l_r = sum_c exp2(s2_rc - m_r); pos_r = s_r,pos(r).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    d_ok = offs_d < dim
    a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter cannot do bf16 arithmetic
        a = a.to(tl.float32)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    pos_col = pos_offset + (rows + pos_shift) % pos_period
    m = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        if HAS_POS:
            pos2 += tl.sum(tl.where(cols[None, :] == pos_col[:, None], s2, 0.0), axis=1)
        valid = col_ok[None, :]
        if HAS_SELF:
            valid = valid & (cols[None, :] != rows[:, None] + self_offset)
        s2 = tl.where(valid, s2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        # a row whose columns so far are all excluded keeps m = -inf: subtract 0 there, not -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(LSE + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)
    if HAS_POS:
        tl.store(POS + rows, pos2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def _info_nce_bwd_kernel(A, B, SCALE, A_LSE, A_GRAD, A_PGRAD, B_LSE, B_GRAD, B_PGRAD, DA,
                         num_rows, num_cols, dim, stride_a, stride_b, stride_da,
                         self_offset, pos_offset, pos_shift, pos_period,
                         HAS_A_STATS: tl.constexpr, A_POS: tl.constexpr, HAS_B_STATS: tl.constexpr,
                         B_POS: tl.constexpr, HAS_SELF: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # dA_r = scale * sum_c W_rc B_c, S recomputed per tile, with W the gradient w.r.t. s_rc of
    #   sum_r [gA_r lseA_r + pA_r s_r,pos(r)]   (A's own row lse and positive logit)
    # + sum_c [gB_c lseB_c + pB_c s_pos(c),c]   (B's lse: the column softmax, and B's positive logit):
    #   W_rc = gA_r exp(s_rc - lseA_r) + pA_r [c == pos(r)] + gB_c exp(s_rc - lseB_c) + pB_c [r == pos(c)].
    # The identity terms (P - I) are formed in fp32 before W is rounded for the second tl.dot.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    d_ok = offs_d < dim
    a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    if HAS_A_STATS:
        lse_a = tl.load(A_LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        g_a = tl.load(A_GRAD + rows, mask=row_ok, other=0.0)
        if A_POS:
            p_a = tl.load(A_PGRAD + rows, mask=row_ok, other=0.0)
            pos_of_row = pos_offset + (rows + pos_shift) % pos_period
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_A_STATS:
            w += g_a[:, None] * tl.exp2(s2 - lse_a[:, None])
            if A_POS:
                w += tl.where(cols[None, :] == pos_of_row[:, None], p_a[:, None], 0.0)
        if HAS_B_STATS:
            lse_b = tl.load(B_LSE + cols, mask=col_ok, other=0.0) * 1.4426950408889634
            g_b = tl.load(B_GRAD + cols, mask=col_ok, other=0.0)
            w += g_b[None, :] * tl.exp2(s2 - lse_b[None, :])
            if B_POS:
                p_b = tl.load(B_PGRAD + cols, mask=col_ok, other=0.0)
                pos_of_col = pos_offset + (cols + pos_shift) % pos_period
                w += tl.where(rows[:, None] == pos_of_col[None, :], p_b[None, :], 0.0)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_SELF:
            valid = valid & (cols[None, :] != rows[:, None] + self_offset)
        # excluded entries may hold inf/nan from exp2 overflow: select, never multiply, them away
        w = tl.where(valid, w, 0.0)
        if UPCAST:  # round W as the GPU does before its bf16 matmul, then compute in fp32
            w = w.to(B.dtype.element_ty).to(tl.float32)
        acc += tl.dot(w.to(b.dtype), b, input_precision=PRECISION)
    acc = acc * scale
    tl.store(DA + rows.to(tl.int64)[:, None] * stride_da + offs_d[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _interpret_blocks(num_rows: int, num_cols: int) -> tuple[int, int]:
    # the interpreter runs programs one by one in Python: few, small tiles (tl.dot needs >= 16)
    return (16 if num_rows <= 64 else 32), (16 if num_cols <= 64 else 32)


# Shared memory one block may use on sm_90 (H100/H200): 227 KB. A config beyond it fails at launch (the autotuner
# then skips it, after compiling it: minutes of cold compiles for nothing), so none is offered.
SHARED_MEMORY_LIMIT = 232448
# wgmma (Hopper's tensor-core instruction) works on 64-row tiles per warpgroup: a config with BLOCK_M < 64 is
# lowered to Ampere's mma.sync on sm_90 and is offered only where no 64-row config fits.
WGMMA_MIN_ROWS = 64


def shared_bytes(kind: str, block_m: int, block_n: int, block_d: int, num_stages: int, elsize: int) -> int:
    """Shared memory of a config, as Triton 3.6-3.9 lay it out for sm_90 (checked by ``make aot-check``): the A
    tile, max(1, stages - 1) buffers of B tiles (fp32, whose dots run in TF32: one per stage) and, in the
    backward, the W tile of the second dot."""
    tiles = block_m * block_d + (num_stages if elsize == 4 else max(1, num_stages - 1)) * block_n * block_d
    if kind == "bwd":
        tiles += block_m * block_n
    return tiles * elsize


def _registers_fit(kind: str, block_m: int, block_n: int, block_d: int, num_warps: int, elsize: int) -> bool:
    """Whether a tile stays within the register file without spilling, by the rules ``make aot-check`` found on
    sm_90: the backward's [BLOCK_M, d] fp32 accumulator holds at most 16K values (8K for fp32 inputs, whose A and
    B tiles are fp32 too) and its [BLOCK_N, d] B tile at most 16K values; 4 warps only for rows of <= 256 values
    and, in the forward, A tiles of <= 64 KB; the backward's full-size accumulators on 8 warps."""
    if num_warps == 4 and (block_d > 256 or (kind == "fwd" and block_m * block_d * elsize > 65536)):
        return False
    if kind == "fwd":
        return True
    accumulator = 16384 if elsize == 2 else 8192
    return (block_m * block_d <= accumulator and block_n * block_d <= 16384
            and not (num_warps == 4 and block_m * block_d >= accumulator))


def _gpu_configs(kind: str, block_d: int, elsize: int = 2) -> list:
    """The autotuning configs for rows of ``block_d`` values of ``elsize`` bytes: those that fit in shared memory
    and registers, and among them only wgmma-sized ones where any fits (empty: Triton cannot serve this width)."""
    if kind == "fwd":  # holds a [BLOCK_M, BLOCK_D] tile of A and streams [BLOCK_N, BLOCK_D] tiles of B
        shapes = [(128, 64), (128, 128), (64, 64), (64, 128)] if block_d <= 128 else \
            [(128, 64), (64, 64), (128, 32), (64, 32)] if block_d <= 256 else [(64, 32), (32, 32), (32, 64), (16, 32)]
    else:  # also a [BLOCK_M, BLOCK_D] fp32 accumulator
        block_m = max(16, min(128, (16384 if elsize == 2 else 8192) // block_d))
        shapes = list(dict.fromkeys([(block_m, 64), (block_m, 32), (max(16, block_m // 2), 64),
                                     (max(16, block_m // 2), 32)]))
    # wide rows: fewer pipeline stages, so that the B tiles still fit in shared memory
    warps_stages = ((4, 3), (8, 2)) if block_d <= 256 else ((4, 2), (8, 1))
    fits = [(bm, bn, w, st) for bm, bn in shapes for w, st in warps_stages
            if _registers_fit(kind, bm, bn, block_d, w, elsize)
            and shared_bytes(kind, bm, bn, block_d, st, elsize) <= SHARED_MEMORY_LIMIT]
    wgmma = [c for c in fits if c[0] >= WGMMA_MIN_ROWS]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in (wgmma or fits)]


def gpu_width_reason(dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why the GPU kernels cannot serve rows of ``dim`` values of ``dtype`` (too wide, no config fits), or None."""
    elsize = torch.empty((), dtype=dtype).element_size()
    if dim > MAX_GPU_DIM:
        return (f"d={dim} > {MAX_GPU_DIM}: on a GPU the Triton kernel's tiles spill registers beyond this width "
                "(backend='cuda' serves wide rows with blocked cuBLAS matmuls)")
    for kind in ("fwd", "bwd"):
        if not _gpu_configs(kind, _block_d(dim), elsize):
            return (f"d={dim} in {str(dtype).replace('torch.', '')}: no {kind} tile of the Triton kernel fits "
                    f"{SHARED_MEMORY_LIMIT // 1024} KB of shared memory")
    return None


_TUNED: dict = {}


def _tuned(kind: str, block_d: int, elsize: int):
    """The kernel autotuned over configs that suit ``block_d`` and the element size, once per number of columns,
    flags and dtypes."""
    key = (kind, block_d, elsize)
    if key not in _TUNED:
        kernel = _info_nce_fwd_kernel if kind == "fwd" else _info_nce_bwd_kernel
        _TUNED[key] = triton.autotune(configs=_gpu_configs(kind, block_d, elsize),
                                      key=["num_cols", "HAS_SELF", "UPCAST", "PRECISION"])(kernel)
    return _TUNED[key]


def _launch(kind: str, num_rows: int, num_cols: int, dim: int, args: tuple, flags: dict) -> None:
    block_d = _block_d(dim)
    if INTERPRET:
        bm, bn = _interpret_blocks(num_rows, num_cols)
        kernel = _info_nce_fwd_kernel if kind == "fwd" else _info_nce_bwd_kernel
        kernel[(triton.cdiv(num_rows, bm),)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
    else:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]),)  # noqa: E731
        _tuned(kind, block_d, args[0].element_size())[grid](*args, **flags, BLOCK_D=block_d)


def _flags(x: torch.Tensor, self_offset: Optional[int]) -> dict:
    fp32_ieee = x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return {"HAS_SELF": self_offset is not None, "UPCAST": INTERPRET and x.dtype == torch.bfloat16,
            "PRECISION": "ieee" if fp32_ieee else "tf32"}


Positive = tuple[int, int, int]  # (offset, shift, period): the positive of row r is offset + (r + shift) % period


def lse_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, self_offset: Optional[int] = None,
                positive: Optional[Positive] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Row log-sum-exp of s = scale * a b^T, and the positive logits s_r,pos(r) when ``positive`` is given.

    Entries with col == row + self_offset are excluded. Both outputs are fp32 [R].
    """
    a, b = a.contiguous(), b.contiguous()
    (num_rows, dim), num_cols = a.shape, b.shape[0]
    lse, pos = (torch.empty(num_rows, device=a.device, dtype=torch.float32) for _ in range(2))
    pos_offset, pos_shift, pos_period = positive or (0, 0, 1)
    args = (a, b, scale.detach().float().contiguous(), lse, pos, num_rows, num_cols, dim, a.stride(0), b.stride(0),
            self_offset or 0, pos_offset, pos_shift, pos_period)
    _launch("fwd", num_rows, num_cols, dim, args, {"HAS_POS": positive is not None, **_flags(a, self_offset)})
    return lse, (pos if positive is not None else None)


Stats = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (lse, grad of lse, grad of positive logit)


def lse_backward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a_stats: Optional[Stats],
                 b_stats: Optional[Stats], *, self_offset: Optional[int] = None,
                 positive: Optional[Positive] = None) -> torch.Tensor:
    """d/da (fp32 [R, D]) of sum_r [gA_r lseA_r + pA_r s_r,pos(r)] + sum_c [gB_c lseB_c + pB_c s_pos(c),c].

    a_stats = (lseA, gA, pA): statistics of the rows of s (``lse_forward(a, b)``); b_stats = (lseB, gB, pB):
    statistics of its columns (``lse_forward(b, a)``), either may be None, pA / pB may be None. pos() is
    ``positive`` for A's rows and, for B's, maps b's index to a's. The gradient for b is the same call with
    a, b and the stats swapped and self_offset negated.
    """
    a, b = a.contiguous(), b.contiguous()
    (num_rows, dim), num_cols = a.shape, b.shape[0]
    out = torch.empty(num_rows, dim, device=a.device, dtype=torch.float32)

    def pointers(stats):  # unused pointers (flags off) may be any tensor
        if stats is None:
            return out, out, out
        lse, grad, pgrad = stats
        return lse.contiguous(), grad.float().contiguous(), (out if pgrad is None else pgrad.float().contiguous())

    pos_offset, pos_shift, pos_period = positive or (0, 0, 1)
    args = (a, b, scale.detach().float().contiguous(), *pointers(a_stats), *pointers(b_stats), out,
            num_rows, num_cols, dim, a.stride(0), b.stride(0), out.stride(0),
            self_offset or 0, pos_offset, pos_shift, pos_period)
    flags = {"HAS_A_STATS": a_stats is not None, "A_POS": a_stats is not None and a_stats[2] is not None,
             "HAS_B_STATS": b_stats is not None, "B_POS": b_stats is not None and b_stats[2] is not None,
             **_flags(a, self_offset)}
    _launch("bwd", num_rows, num_cols, dim, args, flags)
    return out


# ----------------------------------------------------------------------------------------------
# Autograd binding as custom ops (traceable by torch.compile). Integers describe the masks:
# exclude_self / self_offset, and the positive (pos_offset, pos_shift, pos_period; period 0 = none).
# ----------------------------------------------------------------------------------------------
def _masks(exclude_self: bool, self_offset: int, pos_offset: int, pos_shift: int, pos_period: int):
    return {"self_offset": self_offset if exclude_self else None,
            "positive": (pos_offset, pos_shift, pos_period) if pos_period > 0 else None}


def _lse_bwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
             a_lse: Optional[torch.Tensor], a_grad: Optional[torch.Tensor], a_pgrad: Optional[torch.Tensor],
             b_lse: Optional[torch.Tensor], b_grad: Optional[torch.Tensor], b_pgrad: Optional[torch.Tensor],
             exclude_self: bool, self_offset: int, pos_offset: int, pos_shift: int, pos_period: int
             ) -> torch.Tensor:
    a_stats = (a_lse, a_grad, a_pgrad) if a_lse is not None else None
    b_stats = (b_lse, b_grad, b_pgrad) if b_lse is not None else None
    return lse_backward(a, b, scale, a_stats, b_stats,
                        **_masks(exclude_self, self_offset, pos_offset, pos_shift, pos_period))


lse_bwd_op = define("info_nce_lse_bwd", _lse_bwd, fake=lambda a, b, *rest: a.new_empty(a.shape, dtype=torch.float32))


def _lse_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, with_col: bool, pos_offset: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row lse [R], column lse [C] or [0], positive logits [R]) of s = scale * q k^T, all fp32.

    Row r's positive is column pos_offset + r; with_col (the column direction) needs R == C, pos_offset 0.
    """
    row, pos = lse_forward(q, k, scale, positive=(pos_offset, 0, q.shape[0]))
    col = lse_forward(k, q, scale)[0] if with_col else q.new_empty(0, dtype=torch.float32)
    return row, col, pos


def _lse_fake(q, k, scale, with_col, pos_offset):
    rows = q.new_empty(q.shape[0], dtype=torch.float32)
    return rows, q.new_empty(k.shape[0] if with_col else 0, dtype=torch.float32), torch.empty_like(rows)


def _lse_setup(ctx, inputs, output):
    q, k, scale, with_col, pos_offset = inputs
    ctx.save_for_backward(q, k, scale, output[0], output[1])
    ctx.with_col, ctx.pos_offset = with_col, pos_offset


def _lse_backward(ctx, grad_row, grad_col, grad_pos):
    q, k, scale, row, col = ctx.saved_tensors
    need_q, need_k, need_scale = ctx.needs_input_grad[:3]
    zero = torch.zeros_like(row)
    row_stats = (row, zero if grad_row is None else grad_row, grad_pos)
    col_stats = (col, grad_col, None) if ctx.with_col and grad_col is not None else (None, None, None)
    masks = (False, 0, ctx.pos_offset, 0, q.shape[0])
    dq = dk = dscale = None
    if need_q or need_scale:
        dq = lse_bwd_op(q, k, scale, *row_stats, *col_stats, *masks)
        if need_scale:  # dL/dscale = (1/scale) sum_i q_i . dL/dq_i
            dscale = (q.float() * dq).sum() / scale
        dq = dq.to(q.dtype) if need_q else None
    if need_k:
        dk = lse_bwd_op(k, q, scale, *col_stats, *row_stats, *masks).to(k.dtype)
    return dq, dk, dscale, None, None


info_nce_lse = define("info_nce_lse", _lse_triton, fake=_lse_fake, backward=_lse_backward, setup_context=_lse_setup)


def _queue_lse_triton(q: torch.Tensor, k: Optional[torch.Tensor], queue: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [R], positive logits [R], lse over the queue alone [R]), all fp32, of the rows of q against the queue.

    With k (MoCo v2's form) row r's candidates are [q_r . k_r ; q_r . queue] * scale and lse includes the
    positive; without k, lse is over the queue alone (merged with the in-batch lse by the caller) and pos is 0.
    """
    queue_lse = lse_forward(q, queue, scale)[0]
    if k is None:
        return queue_lse.clone(), torch.zeros_like(queue_lse), queue_lse
    pos = (q.float() * k.float()).sum(-1) * scale.detach().float()
    return torch.logaddexp(pos, queue_lse), pos, queue_lse


def _queue_lse_fake(q, k, queue, scale):
    rows = q.new_empty(q.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows)


def _queue_lse_setup(ctx, inputs, output):
    q, k, queue, scale = inputs
    ctx.has_k = k is not None
    ctx.save_for_backward(q, k if k is not None else q.new_empty(0), queue, scale, output[0], output[2])


def _queue_lse_backward(ctx, grad_lse, grad_pos, grad_queue_lse):
    """dL/dq = scale [sum_j (g P_ij + h Pq_ij) queue_j + (g P_pos + p) k] with P the softmax over [pos; queue],
    Pq the softmax over the queue alone (h: the gradient of the queue-only lse); the k term is added in fp32
    before the one rounding. The queue gets no gradient."""
    q, k, queue, scale, lse, queue_lse = ctx.saved_tensors
    need_q, need_k, _, need_scale = ctx.needs_input_grad
    zero = torch.zeros_like(lse)
    g = zero if grad_lse is None else grad_lse.float()
    h = zero if grad_queue_lse is None else grad_queue_lse.float()
    # the queue columns' weight in the row softmax over [pos; queue] is exp(queue_lse - lse) of the queue-only one
    queue_weight = g * torch.exp(queue_lse - lse) + h
    dq = dk = dscale = None
    if need_q or need_k or need_scale:
        s = scale.detach().float()
        dq = lse_bwd_op(q, queue, scale, queue_lse, queue_weight, None, None, None, None, False, 0, 0, 0, 0)
        if ctx.has_k:
            p = zero if grad_pos is None else grad_pos.float()
            pos_weight = (g * torch.exp((q.float() * k.float()).sum(-1) * s - lse) + p)[:, None] * s
            dq = dq + pos_weight * k.float()
            dk = (pos_weight * q.float()).to(k.dtype) if need_k else None
        if need_scale:  # every logit is linear in scale: dL/dscale = (1/scale) sum_i q_i . dL/dq_i
            dscale = (q.float() * dq).sum() / scale
        dq = dq.to(q.dtype) if need_q else None
    return dq, dk, None, dscale


info_nce_queue_lse = define("info_nce_queue_lse", _queue_lse_triton, fake=_queue_lse_fake,
                            backward=_queue_lse_backward, setup_context=_queue_lse_setup)


def triton_supports(device, a: torch.Tensor, b: torch.Tensor, *_) -> Optional[str]:
    """Whether the Triton kernels serve rows a, b of width d (info_nce and nt_xent): None, or why not."""
    why = triton_reason(device, a, b)
    if why is None and a.shape[1] > MAX_TRITON_DIM:
        why = f"d={a.shape[1]} > {MAX_TRITON_DIM} (the Triton kernel's limit)"
    if why is None and device.type == "cuda":  # the interpreter has no shared memory to run out of
        why = gpu_width_reason(a.shape[1], a.dtype)
    return why


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """Unit rows computed in fp32, rounded once to the input dtype that the kernel reads."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def info_nce_triton(q, k, temperature, normalize: bool, symmetric: bool, group,
                    queue: Optional[torch.Tensor] = None, in_batch_negatives: bool = True) -> torch.Tensor:
    scale = inverse_temperature(temperature, q.device)
    if normalize:
        q, k = _normalized(q), _normalized(k)
    if queue is not None:
        queue = _normalized(queue.detach()) if normalize else queue.detach()
        return _info_nce_queue_triton(q, k, scale, group, queue, in_batch_negatives)
    if group is None:
        row, col, pos = info_nce_lse(q, k, scale, symmetric, 0)
        loss = (row - pos).mean()
        return 0.5 * (loss + (col - pos).mean()) if symmetric else loss
    offset = rank_in(group) * q.shape[0]
    row, _, pos = info_nce_lse(q, gather_with_grad(k, group), scale, False, offset)
    loss = (row - pos).mean()
    if symmetric:
        col, _, pos_k = info_nce_lse(k, gather_with_grad(q, group), scale, False, offset)
        loss = 0.5 * (loss + (col - pos_k).mean())
    return loss


def _info_nce_queue_triton(q, k, scale, group, queue, in_batch_negatives: bool) -> torch.Tensor:
    if not in_batch_negatives:   # [positive ; queue]: no other key, so nothing to gather across ranks
        lse, pos, _ = info_nce_queue_lse(q, k, queue, scale)
        return (lse - pos).mean()
    offset = rank_in(group) * q.shape[0] if group is not None else 0
    keys = gather_with_grad(k, group) if group is not None else k
    row, _, pos = info_nce_lse(q, keys, scale, False, offset)
    queue_lse = info_nce_queue_lse(q, None, queue, scale)[0]
    return (torch.logaddexp(row, queue_lse) - pos).mean()


# ----------------------------------------------------------------------------------------------
# CUDA (csrc/lse.cu): cuBLAS logits, hand-written softmax statistics. The matmuls are torch.mm (cuBLAS on
# tensor cores, fp32 accumulation and fp32 output), one block of at most _CUDA_CHUNK_ELEMENTS logits at a
# time; the kernels compute the row lse and the positive logit, the column lse per segment of rows (merged
# with logsumexp) and, in the backward, the gradient weights W in fp32, rounded once to the input dtype for
# dQ = scale W K and dK = scale W^T Q (two more cuBLAS matmuls). Unlike the Triton kernels the logits go
# through HBM (written once, read once or twice per pass), so this wins only where that traffic is cheap
# (small N); it has no limit on d. Same custom-op outputs as sslpt::info_nce_lse, same setup_context.
# ----------------------------------------------------------------------------------------------
_CUDA_CHUNK_ELEMENTS = 1 << 27   # 512 MiB of fp32 logits per block of rows
_CUDA_COL_SEGMENT = 64            # rows per partial column lse


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: fp16/bf16 inputs on tensor cores with fp32 accumulation, output not rounded."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a torch without mm's out_dtype overload
        return a.float() @ b.float()


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, min(rows, _CUDA_CHUNK_ELEMENTS // max(cols, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _lse_cuda(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, with_col: bool, pos_offset: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sslpt::info_nce_lse on the CUDA extension: (row lse, column lse or [0], positive logits), fp32."""
    ext, stream = _cuda.load(), _cuda.stream(q)
    q, k = q.contiguous(), k.contiguous()
    scale32 = scale.detach().float().contiguous()
    num_rows, num_cols = q.shape[0], k.shape[0]
    row = torch.empty(num_rows, device=q.device, dtype=torch.float32)
    pos = torch.empty(num_rows, device=q.device, dtype=torch.float32)
    col = None
    for start, end in _row_blocks(num_rows, num_cols):
        logits = _mm_fp32(q[start:end], k.t())
        ext.lse_rows(logits, scale32, row[start:end], pos[start:end], pos_offset + start, stream)
        if with_col:
            part = torch.empty((-(-(end - start) // _CUDA_COL_SEGMENT), num_cols), device=q.device,
                               dtype=torch.float32)
            ext.lse_cols(logits, scale32, _CUDA_COL_SEGMENT, part, stream)
            part = part.logsumexp(0)
            col = part if col is None else torch.logaddexp(col, part)
    return row, (col if col is not None else q.new_empty(0, dtype=torch.float32)), pos


def _lse_cuda_bwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row: torch.Tensor,
                  row_grad: Optional[torch.Tensor], pos_grad: Optional[torch.Tensor],
                  col: Optional[torch.Tensor], col_grad: Optional[torch.Tensor], pos_offset: int,
                  need_q: bool, need_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dq [R, d] or [0], dL/dk [C, d] or [0]) in fp32, the logits recomputed block by block."""
    ext, stream = _cuda.load(), _cuda.stream(q)
    q, k = q.contiguous(), k.contiguous()
    scale32 = scale.detach().float().contiguous()
    vector = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    row_grad, pos_grad, col, col_grad = vector(row_grad), vector(pos_grad), vector(col), vector(col_grad)
    dq = torch.empty(q.shape if need_q else (0,), device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape if need_k else (0,), device=q.device, dtype=torch.float32)
    for start, end in _row_blocks(q.shape[0], k.shape[0]):
        logits = _mm_fp32(q[start:end], k.t())
        w = torch.empty(logits.shape, device=q.device, dtype=q.dtype)
        ext.lse_grad(logits, scale32, row[start:end], None if row_grad is None else row_grad[start:end],
                     None if pos_grad is None else pos_grad[start:end], pos_offset + start, col, col_grad, w, stream)
        if need_q:
            dq[start:end] = _mm_fp32(w, k)
        if need_k:
            dk += _mm_fp32(w.t(), q[start:end])
    return dq.mul_(scale32), dk.mul_(scale32)


def _lse_cuda_bwd_fake(q, k, scale, row, row_grad, pos_grad, col, col_grad, pos_offset, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,), dtype=torch.float32),
            k.new_empty(k.shape if need_k else (0,), dtype=torch.float32))


info_nce_lse_cuda_bwd = define("info_nce_lse_cuda_bwd", _lse_cuda_bwd, fake=_lse_cuda_bwd_fake)


def _lse_cuda_backward(ctx, grad_row, grad_col, grad_pos):
    q, k, scale, row, col = ctx.saved_tensors
    need_q, need_k, need_scale = ctx.needs_input_grad[:3]
    if not (need_q or need_k or need_scale):
        return None, None, None, None, None
    use_col = ctx.with_col and grad_col is not None
    dq, dk = info_nce_lse_cuda_bwd(q, k, scale, row, grad_row, grad_pos, col if use_col else None,
                                   grad_col if use_col else None, ctx.pos_offset, need_q or need_scale, need_k)
    dscale = (q.float() * dq).sum() / scale if need_scale else None  # dL/dscale = (1/scale) sum_i q_i . dL/dq_i
    return (dq.to(q.dtype) if need_q else None), (dk.to(k.dtype) if need_k else None), dscale, None, None


info_nce_lse_cuda = define("info_nce_lse_cuda", _lse_cuda, fake=_lse_fake, backward=_lse_cuda_backward,
                           setup_context=_lse_setup)


def info_nce_cuda(q, k, temperature, normalize: bool, symmetric: bool, group,
                  queue: Optional[torch.Tensor] = None, in_batch_negatives: bool = True) -> torch.Tensor:
    scale = inverse_temperature(temperature, q.device)
    if normalize:  # as the Triton path: in fp32, rounded once to the input dtype
        q = F.normalize(q.float(), dim=-1).to(q.dtype)
        k = F.normalize(k.float(), dim=-1).to(k.dtype)
    if group is None:
        row, col, pos = info_nce_lse_cuda(q, k, scale, symmetric, 0)
        loss = (row - pos).mean()
        return 0.5 * (loss + (col - pos).mean()) if symmetric else loss
    offset = rank_in(group) * q.shape[0]
    row, _, pos = info_nce_lse_cuda(q, gather_with_grad(k, group), scale, False, offset)
    loss = (row - pos).mean()
    if symmetric:
        col, _, pos_k = info_nce_lse_cuda(k, gather_with_grad(q, group), scale, False, offset)
        loss = 0.5 * (loss + (col - pos_k).mean())
    return loss


_OP = define_op(
    "info_nce",
    reference=Impl(info_nce_ref),
    triton=Impl(info_nce_triton, triton_supports),
    cuda=Impl(info_nce_cuda, lambda device, q, k, *args: ("the CUDA kernel has no queue: use backend='triton'"
                                                           if len(args) > 4 and args[4] is not None
                                                           else cuda_reason(device, q, k))),
)


def check_pair(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two [N, d] tensors of one float dtype on one device, N >= 1."""
    check_tensor(names[0], a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(names[1], b, ndim=2, dtypes=FLOAT_DTYPES, device=a.device)
    check_shape(names[1], b, a.shape)
    if b.dtype != a.dtype:
        raise TypeError(f"{names[1]} must have the dtype of {names[0]} ({a.dtype}), got {b.dtype}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{names[0]} must have at least one row and one column, got shape {list(a.shape)}")


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float | torch.Tensor, *, normalize: bool = True,
             symmetric: bool = False, queue: Optional[torch.Tensor] = None, in_batch_negatives: bool = True,
             group: torch.distributed.ProcessGroup | None = None, backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE: row i of ``q`` against all keys, positive ``k[i]``; mean cross-entropy over rows.

    Args:
        q: [N, d] queries. k: [N, d] keys, same dtype and device.
        temperature: a float > 0, or a 0-dim floating tensor on q's device or the CPU (may require grad: a
            learnable temperature; checked without a host sync on accelerators and under torch.compile).
        normalize: L2-normalise q and k first (cosine similarity).
        symmetric: average the q->k and k->q directions (CLIP). MoCo v3's extra factor 2*tau is not applied.
        queue: [Q, d] extra negatives for every row (MoCo v2 / DenseCL's memory of earlier keys), same dtype and
            device; normalised like q and k when ``normalize``. Never receives a gradient (it is detached). The
            caller keeps and updates it (``engine.models.queue.FeatureQueue``); with a group it must be the same
            on every rank. Not with ``symmetric``.
        in_batch_negatives: with a queue, whether the other rows' keys (all ranks' with a group) are negatives
            too (True) or row i contrasts only its positive k[i] against the queue (False: MoCo v2, DenseCL).
            False needs a queue.
        group: a torch.distributed process group: negatives are the keys of all its ranks (all-gathered
            with gradient). Each rank returns the mean over its own rows; averaging gradients over ranks
            (DDP) gives the gradient of the global-batch loss. See the module docstring.
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        a 0-dim loss: fp32 (float64 for float64 inputs).

    Backends: reference (materialises the [N, N] logits, [N, W*N] with a group of W ranks, [N, N + Q] or
    [N, 1 + Q] with a queue; F.cross_entropy); triton (never materialises the logits: O(N d) memory, logits
    recomputed tile by tile in the backward; the queue is streamed as more columns); cuda (cuBLAS logits in
    blocks of at most 2**27 fp32 values, i.e. 512 MiB, at a time; no queue). ``auto`` picks Triton on CUDA
    tensors, the reference elsewhere; where Triton cannot serve the call, the CUDA backend if it is built, else
    the reference.
    Dtypes: float32, float16, bfloat16 on every backend (fp32 accumulation; the loss is fp32); float64 on
    the reference only.
    Limits: the Triton kernels need d <= 512 on a GPU (MAX_GPU_DIM: wider tiles spill registers) and d <= 2048
    under the interpreter (MAX_TRITON_DIM); above that ``auto`` uses the CUDA backend where it is built, else the
    reference. The CUDA backend has no limit on d. N >= 1; with a group, every rank must hold the same N.
    """
    check_pair(("q", "k"), q, k)
    check_temperature(temperature, q.device)
    if queue is not None:
        check_tensor("queue", queue, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
        check_shape("queue", queue, [None, q.shape[1]])
        if queue.dtype != q.dtype:
            raise TypeError(f"queue must have the dtype of q ({q.dtype}), got {queue.dtype}")
        if queue.shape[0] < 1:
            raise ValueError("queue must have at least one row (or pass queue=None)")
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with a queue: the queue holds keys, negatives of "
                             "the q -> k direction only")
    elif not in_batch_negatives:
        raise ValueError("in_batch_negatives=False needs a queue: without one a row would have no negative")
    if queue is None:  # the call of before (and what choose() sees for it)
        return _OP(backend, q.device, q, k, temperature, bool(normalize), bool(symmetric), group)
    return _OP(backend, q.device, q, k, temperature, bool(normalize), False, group, queue, bool(in_batch_negatives))
