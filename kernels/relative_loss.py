"""HPM's relative loss-prediction objective (``forward_learning_loss``, relative=True).

For each image and each ordered pair (j, k) of its masked patches, with predicted
scores p and true (detached) losses t:
    z = p_k - p_j,  y+ = [t_k > t_j],  y- = [t_k < t_j]   (ties and j == k excluded)
    stable:   l_jk = y+ * softplus(-z) + y- * softplus(z)          (BCE with logits)
    official: l_jk = -y+ * log(sigmoid(z) + 1e-6) - y- * log(1 - sigmoid(z) + 1e-6)
    loss = sum(l) / max(sum(y+ + y-), 1)      over the whole batch
The (j, k) and (k, j) terms are equal in exact arithmetic.
Gradient of the stable form: dl/dp_k = sigmoid(z) - y+ summed over j with y+ + y- = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import Impl, cuda_reason, define_op, triton_reason
from ._custom_op import define
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, check_shape, check_tensor, compute_dtype

_OFFICIAL_EPS = 1e-6


def relative_loss_ref(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool) -> torch.Tensor:
    p = pred_score.to(compute_dtype(pred_score.dtype))  # fp32, or float64 for float64 scores
    t = true_loss.detach().to(compute_dtype(true_loss.dtype))
    pos = t.unsqueeze(1) > t.unsqueeze(2)     # t_k > t_j
    neg = t.unsqueeze(1) < t.unsqueeze(2)
    # select, never multiply by 0: an excluded pair (a tie, j == k) contributes exactly 0, and no gradient,
    # even where its z is nan (inf - inf for an infinite score), as in the kernels
    z = torch.where(pos | neg, p.unsqueeze(1) - p.unsqueeze(2), 0.0)   # z[b, j, k] = p_k - p_j
    if stable:
        terms = torch.where(pos, F.softplus(-z), torch.where(neg, F.softplus(z), 0.0))
    else:
        s = torch.sigmoid(z)
        terms = torch.where(pos, -torch.log(s + _OFFICIAL_EPS),
                            torch.where(neg, -torch.log(1 - s + _OFFICIAL_EPS), 0.0))
    count = (pos | neg).sum().to(p.dtype)
    return terms.sum() / count.clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Triton kernels.
#
# Program (b, jb) owns rows j of image b: it sums l_jk over all k and accumulates
#     G_j = d/dp_j sum_{ordered pairs} l = sum_k ( -dl_jk/dz_jk + dl_kj/dz_kj ),   z_kj = -z_jk
# so that d loss / d p_j = grad_loss * G_j / count. G (fp32, [B, M]) is written in the forward:
# the backward is then O(B*M) elementwise work instead of a second pass over the pairs.
#   stable:   dl_jk/dz = sigmoid(z) - y+, and dl_kj/dz_kj = -(dl_jk/dz), so G_j = -2 sum_k (sigmoid(z) - y+).
#   official: with s = sigmoid(z) and s' = sigmoid(-z) (evaluated separately, as the reference does
#             for the (k, j) entry, so saturated pairs match it too):
#             dl_jk/dz    = -y+ s (1 - s) / (s + e) + y- s (1 - s) / (1 - s + e)
#             dl_kj/dz_kj = -y- s'(1 - s')/(s' + e) + y+ s'(1 - s')/(1 - s' + e)
# Only pair tiles live in registers (never B x M x M in memory). Each row block visits every k,
# twice the pair work of summing one triangle, but one program alone owns each G_j: summing a
# triangle would spread G over programs (atomics, non-deterministic) and leave one program per
# image, too few to fill a GPU at B=256; the pair math is a few microseconds either way.
# Loss and pair count are written as per-program partials and summed in a fixed order.
# ---------------------------------------------------------------------------------------------

_BLOCK_J = 32


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _relative_loss_fwd_kernel(p_ptr, t_ptr, grad_ptr, part_loss_ptr, part_count_ptr, size_m,
                              stride_pb, stride_pm, stride_tb, stride_tm,
                              STABLE: tl.constexpr, STORE_GRAD: tl.constexpr, EPS: tl.constexpr,
                              BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < size_m
    p_j = tl.load(p_ptr + b * stride_pb + j * stride_pm, mask=j_ok, other=0.0).to(tl.float32)[:, None]
    t_j = tl.load(t_ptr + b * stride_tb + j * stride_tm, mask=j_ok, other=0.0).to(tl.float32)[:, None]
    loss_acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    count_acc = tl.zeros([BLOCK_J], dtype=tl.int32)
    grad_acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for k0 in range(0, size_m, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < size_m
        p_k = tl.load(p_ptr + b * stride_pb + k * stride_pm, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        t_k = tl.load(t_ptr + b * stride_tb + k * stride_tm, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        ok = j_ok[:, None] & k_ok[None, :]
        pos = (t_k > t_j) & ok
        neg = (t_k < t_j) & ok
        valid = pos | neg
        z = p_k - p_j
        s = 1.0 / (1.0 + tl.exp(-z))
        if STABLE:
            term = _softplus(tl.where(pos, -z, z))
            grad = -2.0 * (s - pos.to(tl.float32))
        else:
            s_rev = 1.0 / (1.0 + tl.exp(z))
            term = tl.where(pos, -tl.log(s + EPS), -tl.log(1.0 - s + EPS))
            ds = s * (1.0 - s)
            ds_rev = s_rev * (1.0 - s_rev)
            dl_jk = tl.where(pos, -ds / (s + EPS), ds / (1.0 - s + EPS))
            dl_kj = tl.where(neg, -ds_rev / (s_rev + EPS), ds_rev / (1.0 - s_rev + EPS))
            grad = dl_kj - dl_jk
        loss_acc += tl.sum(tl.where(valid, term, 0.0), axis=1)
        count_acc += tl.sum(valid.to(tl.int32), axis=1)
        if STORE_GRAD:
            grad_acc += tl.sum(tl.where(valid, grad, 0.0), axis=1)
    part = b * tl.num_programs(1) + jb
    tl.store(part_loss_ptr + part, tl.sum(loss_acc, axis=0))
    tl.store(part_count_ptr + part, tl.sum(count_acc, axis=0))
    if STORE_GRAD:
        tl.store(grad_ptr + b * size_m + j, grad_acc, mask=j_ok)


@triton.jit
def _relative_loss_finish_kernel(part_loss_ptr, part_count_ptr, loss_ptr, count_ptr, num_parts, BLOCK: tl.constexpr):
    # one program: a fixed summation order makes the loss bitwise reproducible
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, num_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        loss += tl.load(part_loss_ptr + offs, mask=offs < num_parts, other=0.0)
        count += tl.load(part_count_ptr + offs, mask=offs < num_parts, other=0).to(tl.int64)
    total = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    tl.store(loss_ptr, tl.sum(loss, axis=0) / total)
    tl.store(count_ptr, total)


def relative_loss_fwd(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool, store_grad: bool):
    """Launch the forward: (loss, G [B, M] fp32 or an empty tensor, count = max(#pairs, 1) as fp32)."""
    batch, size_m = pred_score.shape
    block_k = max(16, min(128, triton.next_power_of_2(max(size_m, 1))))
    grid = (batch, max(triton.cdiv(size_m, _BLOCK_J), 1))
    device = pred_score.device
    grad = torch.empty((batch, size_m) if store_grad else (0,), device=device, dtype=torch.float32)
    part_loss = torch.empty(grid[0] * grid[1], device=device, dtype=torch.float32)
    part_count = torch.empty(grid[0] * grid[1], device=device, dtype=torch.int32)
    loss = torch.empty((), device=device, dtype=torch.float32)
    count = torch.empty((), device=device, dtype=torch.float32)
    if batch > 0:
        _relative_loss_fwd_kernel[grid](
            pred_score, true_loss, grad, part_loss, part_count, size_m, *pred_score.stride(), *true_loss.stride(),
            STABLE=stable, STORE_GRAD=store_grad, EPS=_OFFICIAL_EPS, BLOCK_J=_BLOCK_J, BLOCK_K=block_k,
            num_warps=8 if block_k >= 128 else 4)  # 4 warps on a 32 x 128 tile spill on sm_90 (make aot-check)
    _relative_loss_finish_kernel[(1,)](part_loss, part_count, loss, count, part_loss.numel(), BLOCK=1024,
                                       num_warps=4)
    return loss, grad, count


# ---------------------------------------------------------------------------------------------
# Autograd binding, as a custom op so that torch.compile treats it as an opaque node.
# ---------------------------------------------------------------------------------------------

def _fake(pred_score, true_loss, stable, store_grad):
    scalar = pred_score.new_empty((), dtype=torch.float32)
    grad = pred_score.new_empty(pred_score.shape if store_grad else (0,), dtype=torch.float32)
    return scalar, grad, torch.empty_like(scalar)


def _setup_context(ctx, inputs, output):
    pred_score, _, _, store_grad = inputs
    _, grad, count = output
    if not store_grad:
        raise RuntimeError("relative_loss: the forward ran without storing its gradient "
                           "(pred_score did not require grad)")
    ctx.save_for_backward(grad, count)
    ctx.score_dtype = pred_score.dtype
    ctx.mark_non_differentiable(grad, count)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_g, _grad_count):
    if grad_loss is None:
        return None, None, None, None
    grad, count = ctx.saved_tensors
    return (grad * (grad_loss / count)).to(ctx.score_dtype), None, None, None


def _triton_fwd(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool,
                store_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return relative_loss_fwd(pred_score, true_loss, stable, store_grad)


_relative_loss_op = define("relative_loss_triton", _triton_fwd, fake=_fake, backward=_backward,
                           setup_context=_setup_context)


def relative_loss_triton(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool) -> torch.Tensor:
    store_grad = torch.is_grad_enabled() and pred_score.requires_grad
    return _relative_loss_op(pred_score, true_loss, stable, store_grad)[0]


# ---------------------------------------------------------------------------------------------
# CUDA (csrc/relative_loss.cu): the same forward (loss, G, count), one block per (image, 32 rows j);
# the backward is the Triton binding's (an O(B M) torch op), so setup_context and backward are shared.
# ---------------------------------------------------------------------------------------------

def _cuda_fwd(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool,
              store_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = pred_score.device
    grad = torch.empty(pred_score.shape if store_grad else (0,), device=device, dtype=torch.float32)
    loss = torch.empty((), device=device, dtype=torch.float32)
    count = torch.empty((), device=device, dtype=torch.float32)
    _cuda.load().relative_loss_fwd(pred_score, true_loss, grad if store_grad else None, loss, count, stable,
                                   _cuda.stream(pred_score))
    return loss, grad, count


_relative_loss_cuda_op = define("relative_loss_cuda", _cuda_fwd, fake=_fake, backward=_backward,
                                setup_context=_setup_context)


def relative_loss_cuda(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool) -> torch.Tensor:
    store_grad = torch.is_grad_enabled() and pred_score.requires_grad
    return _relative_loss_cuda_op(pred_score, true_loss, stable, store_grad)[0]


_OP = define_op(
    "relative_loss",
    reference=Impl(relative_loss_ref),
    triton=Impl(relative_loss_triton, lambda device, score, true, stable: triton_reason(device, score, true)),
    cuda=Impl(relative_loss_cuda, lambda device, score, true, stable: cuda_reason(device, score, true)),
)


def relative_loss(pred_score: torch.Tensor, true_loss: torch.Tensor, *, stable: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    """Pairwise ranking (RankNet) loss between predicted and true per-patch losses.

    Args:
        pred_score: [B, M] predicted scores of each image's M masked patches.
        true_loss: [B, M] their reconstruction losses; treated as a constant.
        stable: softplus (BCE-with-logits) form; False reproduces the official code's
            ``log(sigmoid + 1e-6)``, which saturates for badly mis-ordered pairs.
        backend: "auto" | "reference" | "triton" | "cuda" (None: the process default, ``set_backend``).
    Returns:
        fp32 scalar (float64 for float64 scores); 0 when no pair has distinct true losses.

    Non-finite scores follow IEEE arithmetic on each counted pair, the same on every backend: a pair that
    an infinite score mis-orders costs +inf (stable) or -log(1e-6) (official); two equal infinite scores
    in one image, or a nan score, give nan. Ties and j == k are excluded exactly (they contribute 0 and no
    gradient even where their z is nan).

    Backends: reference (materialises [B, M, M] pair tensors); triton and cuda (pair tiles in registers only,
    O(B M) memory; the forward also writes the [B, M] fp32 gradient, so the backward is elementwise).
    Dtypes: float32, float16, bfloat16 (compared and summed in fp32); float64 on the reference only.
    Limits: none beyond memory; the kernels visit all M x M ordered pairs (twice the pair work of one
    triangle, in exchange for a deterministic, atomic-free gradient).
    """
    check_tensor("pred_score", pred_score, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("true_loss", true_loss, dtypes=FLOAT_DTYPES, device=pred_score.device)
    check_shape("true_loss", true_loss, pred_score.shape)
    return _OP(backend, pred_score.device, pred_score, true_loss.detach(), bool(stable))
