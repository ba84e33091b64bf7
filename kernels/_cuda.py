"""The CUDA extension: find it (``sslpt.kernels._C``, built by setup.py) or build it on first use (JIT).

Build recipe (the one that works with the CPU build of PyTorch as well as a CUDA build): ``nvcc`` compiles
each ``csrc/*.cu`` (plain CUDA C++, no torch header) to an object file; the binding ``csrc/bindings.cpp``
(only ``torch/extension.h``) is compiled as an ordinary C++ torch extension and linked with those objects
and ``libcudart``. torch's ``CUDAExtension`` cannot be used: the CPU wheel reports no CUDA home and lacks
part of the CUDA headers. setup.py imports this file by path (``build_objects``, ``link_args``), so it must
not import the ``kernels`` package.

Environment:
    SSL_CUDA_ARCHS="90a;80"   target architectures (default 90a: H100/H200)
    SSL_CUDA_BUILD_DIR=...    where the JIT build goes (default: ssl_kernels_C-<python>-<torch> under torch's
                              extension root, $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)
    SSL_FORCE_CUDA_BUILD=1    let ``extension(build=True)`` build without a visible GPU (CI, tests)
    SSL_SKIP_CUDA_BUILD=1     never build (an installed sslpt.kernels._C is still used)
    CUDA_HOME / CUDA_PATH     the toolkit (else ``nvcc`` on PATH, else /usr/local/cuda)

Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CSRC = os.path.join(REPO, "csrc")
JIT_NAME = "ssl_kernels_C"
# Host-side nvcc flags; no --use_fast_math: the kernels pick their fast intrinsics themselves (exp2f).
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None
_installed_missing = False  # sslpt.kernels._C was looked for and is not there: do not search again


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _is_toolkit(home: Optional[str]) -> bool:
    return bool(home) and all(os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"),
                                                                              ("include", "cuda_runtime.h")))


def cuda_home() -> Optional[str]:
    """The CUDA toolkit (bin/nvcc and include/cuda_runtime.h), or None.

    CUDA_HOME / CUDA_PATH, then the toolkit of the nvcc on PATH, then /usr/local/cuda (an nvcc on PATH may be
    a wrapper script outside the toolkit, so a candidate must hold the headers too).
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(nvcc)) if nvcc else None,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    return next((home for home in candidates if _is_toolkit(home)), None)


def cuda_archs() -> list[str]:
    """Target architectures from SSL_CUDA_ARCHS ("90a", "90a;80", "9.0a,8.0" all work)."""
    raw = os.environ.get("SSL_CUDA_ARCHS", "90a")
    return [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]


def gencode_flags(archs: list[str]) -> list[str]:
    # the -gencode form: `-arch=sm_90a` also runs a plain sm_90 pass on nvcc 13.0
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def sources() -> tuple[list[str], str]:
    """(the .cu files, the binding .cpp) under csrc/."""
    return sorted(glob.glob(os.path.join(CSRC, "*.cu"))), os.path.join(CSRC, "bindings.cpp")


def _digest(paths: list[str], extra: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update("\0".join(extra).encode())
    return h.hexdigest()[:16]


def build_objects(build_dir: str, *, archs: Optional[list[str]] = None, home: Optional[str] = None,
                  verbose: bool = False) -> list[str]:
    """Compile every csrc/*.cu with nvcc (in parallel) into ``build_dir``; returns the object files.

    Objects are named by a hash of their source, the shared headers and the flags, so unchanged sources are
    not recompiled and a changed one gets a new name (which also makes the link step of torch's JIT rerun).
    """
    home = home or cuda_home()
    if home is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME, or put nvcc on PATH)")
    nvcc = os.path.join(home, "bin", "nvcc")
    flags = NVCC_FLAGS + gencode_flags(archs or cuda_archs())
    headers = sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh")))
    os.makedirs(build_dir, exist_ok=True)

    def compile_one(src: str) -> str:
        stem = os.path.splitext(os.path.basename(src))[0]
        obj = os.path.join(build_dir, f"{stem}-{_digest([src, *headers], flags + [nvcc])}.o")
        if os.path.exists(obj):
            return obj
        tmp = f"{obj}.tmp{os.getpid()}"
        cmd = [nvcc, *flags, "-I", CSRC, "-c", src, "-o", tmp]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{done.stdout}{done.stderr}")
        os.replace(tmp, obj)  # atomic: a concurrent build never sees half an object
        return obj

    cu_files = sources()[0]
    workers = max(1, min(len(cu_files), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, cu_files))


def link_args(home: str) -> list[str]:
    """Linker arguments for libcudart, with an rpath so that the module imports without LD_LIBRARY_PATH."""
    patterns = [("lib64",), ("lib",), ("targets", "*", "lib")]
    found = [p for parts in patterns for p in glob.glob(os.path.join(home, *parts, "libcudart.so*"))]
    lib = os.path.dirname(found[0]) if found else os.path.join(home, "lib64")
    return [f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"]


def default_build_dir() -> str:
    if os.environ.get("SSL_CUDA_BUILD_DIR"):
        return os.environ["SSL_CUDA_BUILD_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    # one directory per Python and torch version: the binding is compiled against torch's headers and ABI
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}".replace("+", "_")
    return os.path.join(get_default_build_root(), f"{JIT_NAME}-{tag}")


_STALE_LOCK_S = 900  # a build of the binding takes well under this; an older lock is a killed build's


def _remove_stale_lock(directory: str) -> None:
    """torch's JIT waits forever on the lock file of a build that was killed: drop it once clearly stale."""
    lock = os.path.join(directory, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
            os.remove(lock)
    except OSError:
        pass


def jit_build(build_dir: Optional[str] = None, *, verbose: bool = False) -> ModuleType:
    """Build the extension now (JIT) into ``build_dir`` and import it. Raises RuntimeError on failure."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolchain: nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    cu_files, binding = sources()
    if not cu_files or not os.path.exists(binding):
        raise RuntimeError(f"the CUDA sources are not there ({CSRC}): only a source checkout can build them")
    build_dir = build_dir or default_build_dir()
    objects = build_objects(os.path.join(build_dir, "objects"), home=home, verbose=verbose)
    binding_dir = os.path.join(build_dir, "binding")
    os.makedirs(binding_dir, exist_ok=True)
    _remove_stale_lock(binding_dir)
    return cpp_extension.load(
        name=JIT_NAME, sources=[binding], extra_include_paths=[CSRC], extra_cflags=["-O2"],
        extra_ldflags=[*objects, *link_args(home)], build_directory=binding_dir, with_cuda=False, verbose=verbose)


def _import_installed() -> Optional[ModuleType]:
    global _installed_missing
    if _installed_missing:
        return None
    try:
        return importlib.import_module("sslpt.kernels._C")
    except ImportError:
        _installed_missing = True
        return None


def _jit_allowed() -> tuple[bool, str]:
    if _flag("SSL_SKIP_CUDA_BUILD"):
        return False, "SSL_SKIP_CUDA_BUILD is set"
    if cuda_home() is None:
        return False, "no CUDA toolchain (nvcc not found; set CUDA_HOME)"
    if _flag("SSL_FORCE_CUDA_BUILD"):
        return True, ""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (set SSL_FORCE_CUDA_BUILD=1 to build anyway)"
    return True, ""


def extension(build: bool = False) -> Optional[ModuleType]:
    """The extension module, or None. ``build=True`` builds it (once per process) when it is not installed,
    nvcc exists and a GPU is visible (or SSL_FORCE_CUDA_BUILD=1); ``build=False`` never compiles anything."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            _module = _import_installed()
        if _module is None and build and _failure is None:
            allowed, why = _jit_allowed()
            if not allowed:
                _failure = why
            else:
                try:
                    _module = jit_build()
                except Exception as exc:  # noqa: BLE001 - reported by unavailable_reason / load
                    _failure = f"the JIT build failed: {type(exc).__name__}: {exc}"
    return _module


def unavailable_reason() -> str:
    """Why ``extension()`` is None (empty when it is available)."""
    if _module is not None:
        return ""
    return _failure or "sslpt.kernels._C is not installed and no JIT build was attempted"


def load() -> ModuleType:
    """The extension, built on first use if needed; RuntimeError saying why when it cannot be had."""
    module = extension(build=True)
    if module is None:
        raise RuntimeError(f"the CUDA extension is unavailable: {unavailable_reason()}")
    return module


def usable(device) -> tuple[bool, str]:
    """Whether the extension can serve tensors on ``device`` (building it if needed); the reason if not."""
    import torch

    if torch.device(device).type != "cuda":
        return False, "the CUDA extension runs on CUDA tensors only"
    if extension(build=True) is None:
        return False, unavailable_reason()
    return True, ""


def stream(t) -> int:
    """The current CUDA stream of ``t``'s device, as the integer the binding takes (0 for a non-CUDA tensor,
    which the binding then rejects with a clear message)."""
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def unit_last(t):
    """``t`` with unit stride along its last dimension (a copy only where it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
