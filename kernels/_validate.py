"""Input checks for the public ops: errors name the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

# What the public functions accept. float64 is served by the references (gradcheck, float64 comparisons);
# KERNEL_DTYPES are the dtypes the Triton / CUDA kernels compute in.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)

_full_index_checks = False


def set_index_checks(full: bool) -> None:
    """Check index ranges on CUDA tensors with a host sync (clear Python errors).

    Off by default: on CUDA the range check is a device-side assert instead, which
    costs no synchronization. CPU tensors are always checked in full.
    """
    global _full_index_checks
    _full_index_checks = bool(full)


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """``expected`` holds sizes, None for 'any'."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a reference computes in: fp32 for fp16/bf16/fp32 inputs, float64 if any input is float64
    (low precision is upcast, float64 never downcast)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _host_checks(t: torch.Tensor) -> bool:
    """Whether a check may read values on the host: CPU tensors (or set_index_checks(True)), outside tracing.

    A host-synced check cannot be traced by torch.compile: there, checks fall back to a device assert."""
    return (t.device.type == "cpu" or _full_index_checks) and not torch.compiler.is_compiling()


def check_indices(name: str, idx: torch.Tensor, upper: int, *, distinct: bool = False) -> None:
    """All entries of ``idx`` must lie in [0, upper); with ``distinct``, no value twice within a row.

    The distinctness check sorts each row (O(K log K) per row, no host sync on CUDA: a device assert)."""
    if idx.numel() == 0:
        return
    if _host_checks(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{name} must hold indices in [0, {upper}), got values in [{lo}, {hi}]")
    else:
        ok = (idx.min() >= 0) & (idx.max() < upper)
        torch._assert_async(ok, f"{name} holds indices outside [0, {upper})")
    if distinct and idx.shape[-1] > 1:
        ordered = idx.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
        if _host_checks(idx):
            if bool(repeated):
                row = int((ordered[..., 1:] == ordered[..., :-1]).any(dim=-1).nonzero()[0, 0])
                raise ValueError(f"{name} must hold distinct indices within each row; row {row} repeats one")
        else:
            torch._assert_async(~repeated, f"{name} must hold distinct indices within each row")


def check_ratio(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value
