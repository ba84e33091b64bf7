"""HPM's easy-to-hard mask (``generate_mask`` of the official code), vectorised.

The official code loops over samples in numpy: it masks the ``num_hard`` patches with
the highest predicted loss, and fills the rest of the masked set with patches drawn
uniformly from the others. Giving the hard patches noise 2 (above any U[0,1) draw)
and keeping the lowest-noise patches yields the same distribution with no host sync.
"""
from __future__ import annotations

import torch

from . import _cuda
from ._backend import Impl, cuda_reason, define_op
from ._custom_op import define
from ._validate import FLOAT_DTYPES, check_tensor, compute_dtype
from .masking import Masking, check_masking_args, masking_from_noise


def top_patches_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] positions of the k highest scores of each row (compared in fp32, float64 scores in float64).

    Tie rule, shared by every backend so that they select the same set: a higher score first, then the lower
    position (a stable descending sort); NaN ranks above +inf and -0.0 equals +0.0 (torch.sort's order).
    torch.topk leaves ties at the boundary to its implementation (CPU and CUDA may differ), so it is not used.
    """
    return torch.sort(scores.to(compute_dtype(scores.dtype)), dim=1, descending=True, stable=True).indices[:, :k]


# CUDA (csrc/topk.cu): radix select per row (no sort), the same tie rule; positions in ascending order.
def _cuda_fwd(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(scores.shape[0], k, device=scores.device, dtype=torch.int64)
    _cuda.load().row_topk(scores, k, out, _cuda.stream(scores))
    return out


_top_patches_cuda_op = define("top_patches_cuda", _cuda_fwd,
                              fake=lambda scores, k: scores.new_empty((scores.shape[0], k), dtype=torch.int64))


def top_patches_cuda(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _top_patches_cuda_op(scores, k)


_OP = define_op(
    "hard_patch_masking",
    reference=Impl(top_patches_ref),
    cuda=Impl(top_patches_cuda, lambda device, scores, k: cuda_reason(device, scores)),
)


TIE_BREAKS = ("random", "position")


def hard_patch_masking(pred_score: torch.Tensor, mask_ratio: float, num_hard: int,
                       generator: torch.Generator | None = None, *, tie_break: str = "random",
                       backend: str | None = None) -> Masking:
    """Mask the ``num_hard`` highest-scored patches of each row, plus random others.

    Args:
        pred_score: [B, L] predicted per-patch difficulty (higher = harder).
        mask_ratio: fraction of patches removed, as in ``random_masking``.
        num_hard: how many of the masked patches are the top-scored ones; 0 gives a
            plain random mask. At most the number of masked patches.
        generator: random generator on ``pred_score``'s device.
        tie_break: which of several equally-scored patches are taken when not all of them fit: "random"
            (default: uniformly at random, drawn from ``generator``; the same choice on every backend for a
            given generator) or "position" (the lower position first: deterministic, but it favours the
            top-left of the image wherever scores tie, e.g. low-precision scores).
        backend: who selects the top-scored patches ("auto" | "reference": a stable sort; "cuda": radix
            select); both apply the tie rule of ``top_patches_ref``. No Triton kernel: a process-wide default
            this op lacks counts as "auto".
    Returns:
        a ``Masking`` (ids_keep [B, K], ids_restore [B, L], mask [B, L]); no gradient flows.

    Backends: reference (torch.sort of each row, O(L log L)); cuda (per-row radix select, no sort).
    Dtypes: pred_score float32, float16, bfloat16 (compared in fp32); float64 on the reference only
    (compared in float64).
    Limits: 0 <= num_hard <= the number of masked patches; mask_ratio in [0, 1).
    """
    check_tensor("pred_score", pred_score, ndim=2, dtypes=FLOAT_DTYPES)
    batch, num_patches = pred_score.shape
    keep = check_masking_args(num_patches, mask_ratio)
    num_masked = num_patches - keep
    if int(num_hard) != num_hard or not 0 <= num_hard <= num_masked:
        raise ValueError(f"num_hard must be an integer in [0, {num_masked}] (the number of masked "
                         f"patches), got {num_hard}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    noise = torch.rand(batch, num_patches, generator=generator, device=pred_score.device)
    if num_hard > 0:
        scores = pred_score.detach()
        if tie_break == "random":
            # relabel the positions at random: the selection's fixed rule (lower position first) then picks
            # uniformly among equal scores, and every backend sees the same relabelling
            perm = torch.rand(batch, num_patches, generator=generator, device=scores.device).argsort(dim=1)
            hard = perm.gather(1, _OP(backend, scores.device, scores.gather(1, perm), int(num_hard)))
        else:
            hard = _OP(backend, scores.device, scores, int(num_hard))
        noise.scatter_(1, hard, 2.0)
    return masking_from_noise(noise, keep)
