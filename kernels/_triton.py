"""Import Triton once, so that op files can define kernels unconditionally.

Where Triton is missing, ``triton.jit`` becomes a decorator whose kernels refuse to
launch with a clear message, and every module still imports.
``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when kernels were defined:
Triton reads it at decoration time, so setting it later has no effect.
"""
from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton kernel {self.fn.__name__} needs the triton package")

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(n - 1, 0).bit_length()

    class _LanguageStub:
        constexpr = int

    triton = _TritonStub()
    tl = _LanguageStub()

__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRET"]
