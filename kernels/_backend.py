"""Backend selection shared by every public op.

Each op offers a subset of {"reference", "triton", "cuda"}. ``backend="auto"`` picks
the CUDA extension where it is built and covers the op, else Triton on CUDA tensors,
else the pure-PyTorch reference. A backend the caller *names* is never swapped for
another: if it cannot serve the call, a clear error says why.

The process-wide default comes from ``set_backend`` or the ``KERNELS_BACKEND``
environment variable.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Mapping

import torch

from ._triton import HAS_TRITON, INTERPRET

BACKENDS = ("auto", "reference", "triton", "cuda")


def _check_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("KERNELS_BACKEND", "auto"), "KERNELS_BACKEND")


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "reference", "triton" or "cuda")."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    return _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily change the process-wide default backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# Ops whose CUDA-extension kernel ``auto`` picks over Triton on CUDA tensors: only where GPU measurements
# (benchmarks/, RESULTS.md) show it faster. Conservative until then; an op missing here counts as False.
CUDA_PREFERRED: dict[str, bool] = {
    "gather_tokens": False, "scatter_tokens": False, "patch_loss": False, "relative_loss": False,
    "hard_patch_masking": False, "info_nce": False,
}


def cuda_extension(build: bool = True):
    """The CUDA extension (``kernels._C``, or its JIT build), or None where it is not available.

    ``build=True`` compiles it on first use where a GPU and nvcc exist (see kernels/_cuda.py); ``build=False``
    never compiles (what ``auto`` uses: it never waits for a build).
    """
    from . import _cuda

    return _cuda.extension(build=build)


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton can run on ``device``; the reason when it cannot."""
    if not HAS_TRITON:
        return False, "the triton package is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and INTERPRET:
        return True, ""
    if device.type == "cpu":
        return False, ("Triton runs on CPU tensors only under the interpreter: set "
                       "TRITON_INTERPRET=1 before importing kernels")
    return False, f"Triton does not support device {device.type!r}"


def dispatch(op: str, backend: str | None, device: torch.device,
             impls: Mapping[str, Callable]) -> Callable:
    """Return the implementation of ``op`` that serves ``backend`` on ``device``."""
    name = _check_name(backend if backend is not None else _default)
    if name == "auto":
        if ("cuda" in impls and device.type == "cuda" and CUDA_PREFERRED.get(op, False)
                and cuda_extension(build=False) is not None):
            return impls["cuda"]
        if "triton" in impls and device.type == "cuda" and triton_usable(device)[0]:
            return impls["triton"]
        return impls["reference"]
    if name not in impls:
        raise NotImplementedError(f"{op}: no {name!r} backend (available: {sorted(impls)})")
    if name == "triton":
        ok, why = triton_usable(device)
        if not ok:
            raise RuntimeError(f"{op}: backend='triton' cannot run here: {why}")
    elif name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got {device.type!r}")
        if cuda_extension(build=True) is None:
            from ._cuda import unavailable_reason

            raise RuntimeError(f"{op}: backend='cuda' needs the CUDA extension kernels._C, which is not "
                               f"available: {unavailable_reason()} (see setup.py / kernels/_cuda.py)")
    return impls[name]
