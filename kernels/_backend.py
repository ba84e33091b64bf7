"""Backend selection shared by every public op, attention included: one rule.

Every op has implementations (backends) named from ``BACKENDS``: "reference" (pure PyTorch, every op),
"triton", "cuda" (the extension ``sslpt.kernels._C``), and for ``attention`` also "sdpa", "flex" and
"xformers". Each implementation states what it supports as a function ``supports(device, *args)`` that returns
None where it can serve the call and else a short reason ("d=4096 > 2048 (the Triton kernel's limit)",
"float64 inputs: ...", "Triton runs on CPU tensors only under the interpreter ...").

``backend="auto"`` picks the first implementation, in the op's order of preference, that can serve the call:
the CUDA extension where ``CUDA_PREFERRED`` says so and it is already built, else Triton on CUDA tensors, else
the already-built CUDA extension (where Triton cannot serve the call, e.g. rows too wide for its tiles), else
the reference (on CPU tensors auto is therefore always the reference; Triton runs on CPU tensors only when
named, under TRITON_INTERPRET=1). ``attention`` keeps its own auto (SDPA on CPU; on CUDA the fastest of
triton / sdpa / xformers, measured once per case) among the candidates that can serve the call.

A backend the caller *names* is never swapped for another: where it cannot serve the call,
``BackendUnavailable`` (a RuntimeError) carries that implementation's reason, e.g.
``info_nce: backend='triton' cannot serve this call: d=4096 > 2048 (the Triton kernel's limit); use
backend='reference' or 'auto'``. A name the op does not implement (``nt_xent(backend="cuda")``) raises the same
way; a name that is no backend at all is a ValueError.

The process-wide default (``set_backend`` / ``use_backend``, or the ``KERNELS_BACKEND`` environment variable,
read at import) applies to every call that passes ``backend=None`` (the default of every public op, attention
included). Where the op implements the default backend it is used strictly, as if named (a default of "triton"
raises where Triton cannot serve); where the op has no such implementation (default "cuda" and attention or
nt_xent, default "sdpa" and every op but attention) that op uses "auto".

``choose(op, backend, device, *impl_args)`` (or ``OPS[op].choose``) tells which implementation a call would run
and why the ones before it were skipped, without running it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import torch

from ._triton import HAS_TRITON, INTERPRET

# every backend name: what set_backend accepts; an op implements a subset (attention: ATTENTION_BACKENDS)
BACKENDS = ("auto", "reference", "triton", "cuda", "sdpa", "flex", "xformers")


def _check_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("KERNELS_BACKEND", "auto"), "KERNELS_BACKEND")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (one of ``BACKENDS``); an op that lacks it uses "auto"."""
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
    """The CUDA extension (``sslpt.kernels._C``, or its JIT build), or None where it is not available.

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


class BackendUnavailable(RuntimeError):
    """A backend the caller named cannot serve this call (its ``supports`` reason is in the message)."""


class Impl:
    """One implementation of an op: ``fn(*args, **kwargs)`` and ``supports(device, *args, **kwargs)``, which
    returns None where ``fn`` can serve the call and a short reason where it cannot. ``supports`` sees the
    arguments ``fn`` would get, plus the device they live on (passed separately so that a test can ask what
    would happen on another device)."""

    __slots__ = ("fn", "supports")

    def __init__(self, fn: Callable, supports: Optional[Callable[..., Optional[str]]] = None):
        self.fn = fn
        self.supports = supports if supports is not None else _always

    def __repr__(self) -> str:
        return f"Impl({getattr(self.fn, '__name__', self.fn)!r})"


def _always(device, *args, **kwargs) -> None:
    return None


class Choice(NamedTuple):
    """What dispatch picked: the backend name, its function, and why each backend tried before it was not used."""

    name: str
    fn: Callable
    skipped: dict


class Op:
    """The implementations of one public op and the dispatch rule.

    ``auto`` (None for the generic rule) picks among the implementations that can serve a call in its own way:
    ``auto(device, serves, args, kwargs) -> name``, with ``serves(name)`` the reason that implementation
    cannot serve the call, or None (attention uses this for its measured choice).
    """

    def __init__(self, name: str, impls: Mapping[str, Impl], auto: Optional[Callable] = None):
        unknown = set(impls) - set(BACKENDS) - {"auto"}
        if unknown or "reference" not in impls:
            raise ValueError(f"{name}: implementations must include 'reference' and be named from {BACKENDS}")
        self.name, self.impls, self.auto = name, dict(impls), auto

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {list(self.impls)})"

    def resolve(self, backend: Optional[str]) -> str:
        """The backend name a call uses: ``backend``, else the process default where this op has it, else auto."""
        if backend is None:
            default = _default
            return default if default == "auto" or default in self.impls else "auto"
        return _check_name(backend)

    def _auto_skip(self, name: str, device: torch.device) -> Optional[str]:
        """Why the generic ``auto`` does not consider ``name`` on ``device`` (a policy, not a limit)."""
        if name == "cuda":
            if device.type != "cuda":
                return "auto runs the CUDA extension on CUDA tensors only"
            if cuda_extension(build=False) is None:
                return "the CUDA extension is not built (auto never builds it)"
        elif name == "triton" and device.type != "cuda":
            return "auto runs Triton on CUDA tensors only"
        return None

    def choose(self, backend: Optional[str], device: torch.device, *args, **kwargs) -> Choice:
        """The implementation that serves this call; BackendUnavailable where a named one cannot."""
        name = self.resolve(backend)
        if name != "auto":
            impl = self.impls.get(name)
            if impl is None:
                raise BackendUnavailable(self._message(name, f"{self.name} has no {name!r} implementation "
                                                             f"(it has {', '.join(map(repr, self.impls))})",
                                                       device, args, kwargs))
            why = impl.supports(device, *args, **kwargs)
            if why is not None:
                raise BackendUnavailable(self._message(name, why, device, args, kwargs))
            return Choice(name, impl.fn, {})
        skipped: dict[str, str] = {}

        def serves(candidate: str) -> Optional[str]:
            impl = self.impls.get(candidate)
            why = f"{self.name} has no {candidate!r} implementation" if impl is None else \
                impl.supports(device, *args, **kwargs)
            if why is not None:
                skipped[candidate] = why
            return why

        if self.auto is not None:
            picked = self.auto(device, serves, args, kwargs)
            return Choice(picked, self.impls[picked].fn, skipped)
        order = AUTO_ORDER if CUDA_PREFERRED.get(self.name, False) else AUTO_ORDER_TRITON_FIRST
        for candidate in order:
            if candidate not in self.impls:
                continue
            why = self._auto_skip(candidate, device)
            if why is not None:
                skipped[candidate] = why
            elif serves(candidate) is None:
                return Choice(candidate, self.impls[candidate].fn, skipped)
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise BackendUnavailable(f"{self.name}: no backend can serve this call ({reasons})")

    def __call__(self, backend: Optional[str], device: torch.device, *args, **kwargs):
        """Dispatch and run: ``choose(...).fn(*args, **kwargs)``."""
        return self.choose(backend, device, *args, **kwargs).fn(*args, **kwargs)

    def _message(self, name: str, why: str, device, args, kwargs) -> str:
        others = []
        for other, impl in self.impls.items():
            if other == name or (other == "cuda" and cuda_extension(build=False) is None):
                continue  # never build the extension just to suggest it
            try:
                if impl.supports(device, *args, **kwargs) is None:
                    others.append(repr(other))
            except Exception:  # noqa: BLE001 - a suggestion must never hide the real error
                continue
        others.append("'auto'")
        hint = " or ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
        return f"{self.name}: backend={name!r} cannot serve this call: {why}; use backend={hint}"


OPS: dict[str, Op] = {}
AUTO_ORDER = ("cuda", "triton", "reference")  # the generic auto's order of preference
# where CUDA_PREFERRED is False: the extension (when built) still serves what Triton cannot, e.g. wide rows
AUTO_ORDER_TRITON_FIRST = ("triton", "cuda", "reference")


def define_op(name: str, auto: Optional[Callable] = None, **impls: Impl) -> Op:
    """Register the implementations of op ``name`` (``auto``: a picker replacing the generic AUTO_ORDER rule)."""
    op = Op(name, impls, auto)
    OPS[name] = op
    return op


def choose(op: str, backend: Optional[str], device: torch.device, *args, **kwargs) -> Choice:
    """What op ``op`` would run for these (implementation) arguments: ``OPS[op].choose(...)``."""
    return OPS[op].choose(backend, torch.device(device), *args, **kwargs)


# ---- reasons shared by the implementations' ``supports`` ------------------------------------------------------

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def dtype_reason(kernel: str, *tensors) -> Optional[str]:
    """Why ``kernel`` (e.g. "the Triton kernel") cannot take these tensors' dtypes; None tensors are skipped."""
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in LOW_PRECISION:
            name = str(t.dtype).replace("torch.", "")
            return (f"{name} inputs: {kernel} computes in float32/float16/bfloat16 only "
                    f"(backend='reference' computes in {name})")
    return None


def triton_reason(device: torch.device, *tensors) -> Optional[str]:
    """Why the Triton kernels cannot serve tensors on ``device`` (Triton missing, device, dtype), or None."""
    ok, why = triton_usable(device)
    if not ok:
        return why
    return dtype_reason("the Triton kernel", *tensors)


def cuda_reason(device: torch.device, *tensors) -> Optional[str]:
    """Why the CUDA extension cannot serve tensors on ``device`` (device, dtype, not built), or None.
    Builds the extension on first use where it can (only a named backend='cuda' gets here unbuilt)."""
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors, got {device.type!r}"
    why = dtype_reason("the CUDA kernel", *tensors)
    if why is not None:
        return why
    if cuda_extension(build=True) is None:
        from ._cuda import unavailable_reason

        return (f"the CUDA extension sslpt.kernels._C is not available: {unavailable_reason()} "
                f"(see setup.py / kernels/_cuda.py)")
    return None
