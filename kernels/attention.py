"""One attention entry point for the encoder, over several backends.

``attention(q, k, v, backend=...)`` has the semantics of ``sparse_attention`` (DESIGN.md): dense
``[B, H, N, Dh]``, packed ``[T, H, Dh]`` with ``cu_seqlens`` (no token sees another sample), or a per-sample
``order[B, N]`` (query i sees key j iff order[j] <= order[i], ``<`` with ``strict``; a query that sees no key
gets 0 and passes no gradient). Backends:

    ours       kernels.sparse_attention's Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)
    sdpa       F.scaled_dot_product_attention: an order mask becomes a dense boolean [B, 1, N, N] mask; packed
               samples are padded to [B, H, max_seqlen, Dh] with a key-padding mask (no host sync), and the
               output is gathered back (the padded query rows are computed and thrown away)
    flex       torch.nn.attention.flex_attention with a BlockMask built on every call from ``order`` or from
               the sample ids of ``cu_seqlens`` (packed samples run as one sequence); torch.compile'd on CUDA,
               eager (unfused) on CPU, where torch has no FlexAttention backward
    xformers   xformers.ops.memory_efficient_attention (CUDA only; imported on first use): BlockDiagonalMask
               for packed samples (a host sync for the lengths), an additive -inf bias for an order mask
    reference  the fp32 explicit-softmax sparse_attention_ref (tests, debugging)
    auto       CPU: sdpa (what the ViT always ran there). CUDA: the fastest of ours / sdpa / xformers measured
               once per (mode, strict, dtype, heads, head dim, length bucket, token bucket, grad) on random
               inputs of the first call's shape, then cached; while torch.compile traces or a CUDA graph
               captures, an unmeasured case takes the table choice (ours where it applies, else sdpa).
               flex is not a candidate: it compiles per shape and rebuilds its block mask every step.

A backend the caller names is never replaced by another: where it cannot serve the call it raises
``BackendUnavailable`` saying why. ``kernels.set_backend`` does not affect this choice.
"""
from __future__ import annotations

import functools
import importlib.util
import statistics
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._backend import triton_usable
from .sparse_attention import (MAX_TRITON_HEAD_DIM, _order_visibility, check_attention_inputs,
                               sparse_attention_ref, sparse_attention_triton)

ATTENTION_BACKENDS = ("auto", "ours", "sdpa", "flex", "xformers", "reference")
AUTO_CANDIDATES = ("ours", "sdpa", "xformers")  # in order of preference on equal times


class BackendUnavailable(RuntimeError):
    """The named attention backend cannot serve this call here (missing package, device, mode)."""


# ----------------------------------------------------------------------------------------------------------
# Mask helpers shared by the backends that take explicit masks
# ----------------------------------------------------------------------------------------------------------

def _order_mask(order: torch.Tensor, strict: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([B, 1, N, N] visibility in which every row sees something, [B, 1, N, 1] rows that really see nothing).

    Only ``strict`` can leave a row empty; such a row is let see itself (finite softmax, no NaN in the
    backward) and its output is zeroed afterwards, so it passes no gradient either."""
    visible = _order_visibility(order, strict)
    if not strict:
        return visible, None
    empty = ~visible.any(dim=-1, keepdim=True)
    eye = torch.eye(order.shape[1], dtype=torch.bool, device=order.device)
    return visible | (empty & eye), empty


def _zero_empty_rows(out: torch.Tensor, empty: Optional[torch.Tensor]) -> torch.Tensor:
    return out if empty is None else out.masked_fill(empty, 0.0)


def _packed_layout(cu_seqlens: torch.Tensor, total: int, max_seqlen: int):
    """Indices between packed [T, ...] and padded [B, max_seqlen, ...] layouts, without a host sync.

    Returns (gather [B, max_seqlen] packed row of each padded slot, clamped; keep [B, max_seqlen] slot holds a
    token; sample [T] and position [T] of each packed token)."""
    cu = cu_seqlens.long()
    pos = torch.arange(max_seqlen, device=cu.device)
    keep = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
    gather = (cu[:-1, None] + pos[None, :]).clamp_(max=max(total - 1, 0))
    token = torch.arange(total, device=cu.device)
    sample = torch.bucketize(token, cu[1:], right=True)
    return gather, keep, sample, token - cu[sample]


def _xformers_order_bias(order: torch.Tensor, strict: bool, heads: int, dtype: torch.dtype):
    """Additive [B, H, N, N] bias (0 visible, -inf hidden) whose rows start 8-aligned, as xformers requires;
    and the rows that see nothing (see ``_order_mask``)."""
    visible, empty = _order_mask(order, strict)
    batch, n = order.shape
    storage = torch.zeros(batch, 1, n, -(-n // 8) * 8, device=order.device, dtype=dtype)
    bias = storage[..., :n].masked_fill_(~visible, float("-inf"))
    return bias.expand(batch, heads, n, n), empty


# ----------------------------------------------------------------------------------------------------------
# Backends: each takes validated inputs (max_seqlen resolved for packed ones)
# ----------------------------------------------------------------------------------------------------------

def _ours(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    ok, why = triton_usable(q.device)
    if not ok:
        raise BackendUnavailable(f"attention(backend='ours') cannot run here: {why}")
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise BackendUnavailable(f"attention(backend='ours'): q has head dim {q.shape[-1]}; the Triton kernels "
                                 f"support up to {MAX_TRITON_HEAD_DIM} (use backend='sdpa')")
    return sparse_attention_triton(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, order=order,
                                   strict=strict, scale=scale)


def _sdpa(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    if cu_seqlens is None:
        mask, empty = _order_mask(order, strict) if order is not None else (None, None)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return _zero_empty_rows(out, empty)
    total = q.shape[0]
    if total == 0:
        return q * 0.0  # keeps the graph, no elements
    gather, keep, sample, position = _packed_layout(cu_seqlens, total, max_seqlen)
    slot_empty = ~keep[..., None, None]
    q_pad, k_pad, v_pad = (t[gather].masked_fill(slot_empty, 0.0).transpose(1, 2) for t in (q, k, v))
    # a sample of length 0 has only padded rows: let them see slot 0 so that no row is empty (no NaN)
    key_mask = (keep | (torch.arange(max_seqlen, device=q.device) == 0))[:, None, None, :]
    out = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=key_mask, scale=scale)
    return out[sample, :, position]  # [T, H, Dh]


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError as exc:
        raise BackendUnavailable(f"attention(backend='flex') needs torch.nn.attention.flex_attention, missing "
                                 f"in torch {torch.__version__}: {exc}") from exc
    return module


def _flex(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    flex = _flex_module()
    device = q.device
    if cu_seqlens is not None:  # one long sequence, a token sees the tokens of its own sample
        total = q.shape[0]
        sample = torch.bucketize(torch.arange(total, device=device), cu_seqlens.long()[1:], right=True)
        block_mask = flex.create_block_mask(lambda b, h, qi, ki: sample[qi] == sample[ki], 1, None, total, total,
                                            device=device)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, Dh]
    elif order is not None:
        def visible(b, h, qi, ki):
            return order[b, ki] < order[b, qi] if strict else order[b, ki] <= order[b, qi]
        block_mask = flex.create_block_mask(visible, q.shape[0], None, q.shape[2], q.shape[2], device=device)
    else:
        block_mask = None
    try:
        if device.type == "cuda":
            out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
        else:  # eager is what runs on CPU without a compiler; the warning about it is expected here
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex.flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    except NotImplementedError as exc:  # e.g. no backward on CPU
        raise BackendUnavailable(f"attention(backend='flex') on {device.type}: {exc}") from exc
    return out[0].transpose(0, 1) if cu_seqlens is not None else out


def _xformers_ops():
    if importlib.util.find_spec("xformers") is None:
        raise BackendUnavailable("attention(backend='xformers') needs the xformers package, which is not "
                                 "installed (pip install xformers; or use backend='ours' or 'sdpa')")
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 - a broken install (ABI, CUDA runtime) is "unavailable" too
        raise BackendUnavailable(f"attention(backend='xformers'): xformers is installed but does not import: "
                                 f"{type(exc).__name__}: {exc}") from exc
    return xops


def _xformers(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    xops = _xformers_ops()
    if q.device.type != "cuda":
        raise BackendUnavailable(f"attention(backend='xformers') needs CUDA tensors, got {q.device.type!r}")
    if cu_seqlens is not None:
        lengths = [n for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if n > 0]
        if not lengths:
            return q * 0.0
        bias = xops.fmha.BlockDiagonalMask.from_seqlens(lengths)
        out = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)
        return out[0]
    bias, empty = (None, None)
    if order is not None:
        bias, empty = _xformers_order_bias(order, strict, q.shape[1], q.dtype)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, Dh]
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale).transpose(1, 2)
    return _zero_empty_rows(out, empty)


def _reference(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    return sparse_attention_ref(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, order=order, strict=strict,
                                scale=scale)


_IMPLS = {"ours": _ours, "sdpa": _sdpa, "flex": _flex, "xformers": _xformers, "reference": _reference}


# ----------------------------------------------------------------------------------------------------------
# auto: measured once per case on CUDA, cached
# ----------------------------------------------------------------------------------------------------------

_auto_cache: dict[tuple, str] = {}


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _auto_key(q, cu_seqlens, max_seqlen, order, strict, needs_grad) -> tuple:
    mode = "packed" if cu_seqlens is not None else ("order" if order is not None else "dense")
    if q.dim() == 3:
        heads, length, tokens = q.shape[1], max_seqlen, q.shape[0]
    else:
        heads, length, tokens = q.shape[1], q.shape[2], q.shape[0] * q.shape[2]
    return (mode, bool(strict) and mode == "order", q.dtype, heads, q.shape[-1], _bucket(length), _bucket(tokens),
            bool(needs_grad), str(q.device))


def _table_choice(q) -> str:
    """The unmeasured default: our kernels wherever they apply (the benchmark targets), else SDPA."""
    return "ours" if triton_usable(q.device)[0] and q.shape[-1] <= MAX_TRITON_HEAD_DIM else "sdpa"


def _time_backend(name: str, q, k, v, kwargs: dict, needs_grad: bool, reps: int = 5) -> float:
    """Median ms of one step of backend ``name`` (forward, and backward when ``needs_grad``) on fresh inputs."""
    qx, kx, vx = (torch.randn_like(t).requires_grad_(needs_grad) for t in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        out = _IMPLS[name](qx, kx, vx, **kwargs)
        if needs_grad:
            out.backward(grad)

    with torch.enable_grad() if needs_grad else torch.no_grad():
        step()  # compile / warm up
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _pick_fastest(candidates, time_one: Callable[[str], float]) -> Optional[str]:
    """The candidate with the smallest time (first in order on ties); failing candidates are skipped."""
    best, best_ms = None, float("inf")
    for name in candidates:
        try:
            ms = time_one(name)
        except Exception:  # noqa: BLE001 - a backend that cannot serve this case is simply not a candidate
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    return best


def _auto_backend(q, k, v, kwargs: dict) -> str:
    if q.device.type != "cuda":
        return "sdpa"
    return _measured_choice(q, k, v, kwargs, measurable=not (torch.compiler.is_compiling()
                                                            or torch.cuda.is_current_stream_capturing()))


def _measured_choice(q, k, v, kwargs: dict, measurable: bool) -> str:
    """The cached choice for this case; else measure it (or, where timing is impossible, the table's)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _auto_key(q, kwargs["cu_seqlens"], kwargs["max_seqlen"], kwargs["order"], kwargs["strict"], needs_grad)
    choice = _auto_cache.get(key)
    if choice is not None:
        return choice
    if not measurable:
        return _table_choice(q)
    candidates = [n for n in AUTO_CANDIDATES
                  if n != "xformers" or importlib.util.find_spec("xformers") is not None]
    choice = _pick_fastest(candidates, lambda name: _time_backend(name, q, k, v, kwargs, needs_grad))
    _auto_cache[key] = choice or "sdpa"
    return _auto_cache[key]


def auto_choices() -> dict[tuple, str]:
    """What ``backend='auto'`` picked so far on CUDA: {(mode, strict, dtype, H, Dh, length bucket, token bucket,
    grad, device): backend}."""
    return dict(_auto_cache)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------

def check_attention_backend(name: str, what: str = "backend") -> str:
    """``name`` if it is an attention backend, else a ValueError naming ``what``."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{what} must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
              cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
              order: Optional[torch.Tensor] = None, strict: bool = False,
              scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention of each sample's tokens with each other, on the chosen backend.

    Args:
        q, k, v: [B, H, N, Dh] (dense), or [T, H, Dh] packed samples with ``cu_seqlens``; same dtype and shape.
        backend: "auto" | "ours" | "sdpa" | "flex" | "xformers" | "reference" (see the module docstring).
        cu_seqlens, max_seqlen, order, strict, scale: as in ``kernels.sparse_attention``.
    Returns:
        Attention output with the shape and dtype of ``q``.
    Raises:
        ValueError for an unknown backend name, BackendUnavailable where the named backend cannot serve the
        call here (not installed, wrong device, no backward).
    """
    check_attention_backend(backend)
    max_seqlen = check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, order, scale)
    kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, order=order, strict=bool(strict),
                  scale=None if scale is None else float(scale))
    if backend == "auto":
        backend = _auto_backend(q, k, v, kwargs)
    return _IMPLS[backend](q, k, v, **kwargs)


__all__ = ["attention", "ATTENTION_BACKENDS", "BackendUnavailable", "auto_choices", "check_attention_backend"]
