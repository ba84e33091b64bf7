"""One attention entry point for the encoder, over several backends.

``attention(q, k, v, backend=...)`` has the semantics of ``sparse_attention`` (docs/ops.md): dense
``[B, H, N, Dh]``, packed ``[T, H, Dh]`` with ``cu_seqlens`` (no token sees another sample), or a per-sample
``order[B, N]`` (query i sees key j iff order[j] <= order[i], ``<`` with ``strict``; a query that sees no key
gets 0 and passes no gradient). Backends:

    triton     kernels.sparse_attention's Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1; head dim <= 128)
    sdpa       F.scaled_dot_product_attention: an order mask becomes a dense boolean [B, 1, N, N] mask; packed
               samples are padded to [B, H, max_seqlen, Dh] with a key-padding mask (no host sync), and the
               output is gathered back (the padded query rows are computed and thrown away)
    flex       torch.nn.attention.flex_attention with a BlockMask built on every call from ``order`` or from
               the sample ids of ``cu_seqlens`` (packed samples run as one sequence); torch.compile'd on CUDA,
               eager (unfused) on CPU, where torch has no FlexAttention backward
    xformers   xformers.ops.memory_efficient_attention (CUDA only; imported on first use): BlockDiagonalMask
               for packed samples (a host sync for the lengths), an additive -inf bias for an order mask
    reference  the fp32 explicit-softmax sparse_attention_ref (tests, debugging)
    auto       CPU: sdpa (what the ViT always ran there). CUDA: the fastest of triton / sdpa / xformers (those
               that can serve the call) measured once per (mode, strict, dtype, heads, head dim, length bucket,
               token bucket, grad) on random inputs of the first call's shape, then cached; while torch.compile
               traces or a CUDA graph captures, an unmeasured case takes the table choice (triton where it can
               serve the call, else sdpa). flex is not a candidate: it compiles per shape and rebuilds its block
               mask every step.

The dispatch rule is every op's (kernels/_backend.py): each backend states what it supports; a backend the caller
names is never replaced by another: where it cannot serve the call it raises ``BackendUnavailable`` with the
reason. ``backend=None`` takes the process-wide default (``kernels.set_backend``) where it is an attention
backend, else auto.
"""
from __future__ import annotations

import functools
import importlib.util
import statistics
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._backend import BACKENDS, BackendUnavailable, Impl, define_op
from .sparse_attention import (_order_visibility, check_attention_inputs, sparse_attention_ref,
                               sparse_attention_triton, triton_supports)

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "flex", "xformers", "reference")
AUTO_CANDIDATES = ("triton", "sdpa", "xformers")  # in order of preference on equal times


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

def _triton(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
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


def _flex_supports(device, *args, **kwargs) -> Optional[str]:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"needs torch.nn.attention.flex_attention, missing in torch {torch.__version__}"
    return None


def _flex(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    from torch.nn.attention import flex_attention as flex

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
    except NotImplementedError as exc:  # e.g. no backward on CPU: known only once it runs
        raise BackendUnavailable(f"attention: backend='flex' cannot serve this call on {device.type}: {exc}; "
                                 f"use backend='sdpa' or 'auto'") from exc
    return out[0].transpose(0, 1) if cu_seqlens is not None else out


def _xformers_supports(device, *args, **kwargs) -> Optional[str]:
    if importlib.util.find_spec("xformers") is None:
        return "needs the xformers package, which is not installed (pip install xformers)"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install (ABI, CUDA runtime) is "unavailable" too
        return f"xformers is installed but does not import: {type(exc).__name__}: {exc}"
    if device.type != "cuda":
        return f"xformers needs CUDA tensors, got {device.type!r}"
    return None


def _xformers(q, k, v, *, cu_seqlens, max_seqlen, order, strict, scale):
    import xformers.ops as xops

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


def _table_choice(serves: Callable[[str], Optional[str]]) -> str:
    """The unmeasured default: our Triton kernels wherever they can serve the call (the benchmark targets), else
    SDPA."""
    return "triton" if serves("triton") is None else "sdpa"


def _time_backend(name: str, q, k, v, kwargs: dict, needs_grad: bool, reps: int = 5) -> float:
    """Median ms of one step of backend ``name`` (forward, and backward when ``needs_grad``) on fresh inputs."""
    qx, kx, vx = (torch.randn_like(t).requires_grad_(needs_grad) for t in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        out = _OP.impls[name].fn(qx, kx, vx, **kwargs)
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


def _auto_pick(device: torch.device, serves: Callable[[str], Optional[str]], args: tuple, kwargs: dict) -> str:
    """attention's auto (see the module docstring), among the backends that can serve the call."""
    if device.type != "cuda":
        return "sdpa"
    q, k, v = args
    return _measured_choice(q, k, v, kwargs, measurable=not (torch.compiler.is_compiling()
                                                            or torch.cuda.is_current_stream_capturing()),
                            serves=serves)


def _measured_choice(q, k, v, kwargs: dict, measurable: bool,
                     serves: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """The cached choice for this case; else measure it (or, where timing is impossible, the table's).
    ``serves(name)``: why backend ``name`` cannot serve the call, or None (default: its ``supports`` on q's
    device)."""
    if serves is None:
        serves = lambda name: _OP.impls[name].supports(q.device, q, k, v, **kwargs)  # noqa: E731
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _auto_key(q, kwargs["cu_seqlens"], kwargs["max_seqlen"], kwargs["order"], kwargs["strict"], needs_grad)
    choice = _auto_cache.get(key)
    if choice is not None:
        return choice
    if not measurable:
        return _table_choice(serves)
    candidates = [n for n in AUTO_CANDIDATES if serves(n) is None]
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


_OP = define_op("attention", auto=_auto_pick, triton=Impl(_triton, triton_supports), sdpa=Impl(_sdpa),
                flex=Impl(_flex, _flex_supports), xformers=Impl(_xformers, _xformers_supports),
                reference=Impl(_reference))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None,
              cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
              order: Optional[torch.Tensor] = None, strict: bool = False,
              scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention of each sample's tokens with each other, on the chosen backend.

    Args:
        q, k, v: [B, H, N, Dh] (dense), or [T, H, Dh] packed samples with ``cu_seqlens``; same dtype and shape.
        backend: "auto" | "triton" | "sdpa" | "flex" | "xformers" | "reference" (see the module docstring);
            None: the process-wide default (``kernels.set_backend``) where it is one of these, else "auto".
        cu_seqlens, max_seqlen, order, strict, scale: as in ``kernels.sparse_attention``.
    Returns:
        Attention output with the shape and dtype of ``q``.
    Raises:
        ValueError for an unknown backend name or a non-finite ``scale``, BackendUnavailable where the named
        backend cannot serve the call here (not installed, wrong device, no backward).

    Backends: see the module docstring; the Triton kernels are ``sparse_attention``'s, the reference is its
    explicit fp32 softmax, sdpa / flex / xformers are PyTorch's and xformers' fused attention.
    Dtypes: float32, float16, bfloat16; float64 on the reference (sdpa passes it on to PyTorch as well).
    Limits: Triton head dims up to 128; xformers on CUDA only; flex has no backward on CPU.
    """
    if backend is not None and backend not in BACKENDS:
        check_attention_backend(backend)
    max_seqlen = check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, order, scale)
    kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, order=order, strict=bool(strict),
                  scale=None if scale is None else float(scale))
    return _OP(backend, q.device, q, k, v, **kwargs)


__all__ = ["attention", "ATTENTION_BACKENDS", "BackendUnavailable", "auto_choices", "check_attention_backend"]
