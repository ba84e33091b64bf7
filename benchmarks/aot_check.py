"""Compile every Triton launch the ops make, for an H100/H200 (sm_90a), on a machine without a GPU.

    python -m benchmarks.aot_check [--cases embed patch_loss ...] [--json F] [--arch 90]     (make aot-check)

Each case runs an op's Triton implementation, forward and backward, on CPU tensors at the benchmark shapes
(batch cut down where it only sizes the grid) with a stand-in Triton driver whose target is
``GPUTarget("cuda", <arch>, 32)``: every kernel launch (every config of an autotuned one) is compiled with
``warmup=True`` instead of running, and nothing touches a GPU. Per compiled kernel it reports registers,
spill bytes and stack (from ptxas -v), shared memory (the kernel's metadata) and how tl.dot was lowered
(``wgmma``, ``mma.sync`` or FMA), and fails (exit 1) where a launch

  * needs more shared memory than a block may have (227 KB on sm_90: it would raise OutOfResources at launch),
  * spills registers to local memory, or
  * lowers tl.dot to mma.sync without wgmma (the Ampere path: a fraction of Hopper's tensor-core rate).

Triton's own cache (~/.triton/cache, or $TRITON_CACHE_DIR) keeps the compiled kernels between runs; the ptxas
statistics of a cached kernel, which Triton does not keep, are kept next to it in ``sslpt_aot_stats.json``
(keyed by the kernel's hash), so a second run compiles nothing.
Run it with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable objects.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a file from a copy where the package is not installed
    sys.path.insert(0, REPO_ROOT)

SHARED_LIMIT = {90: 232448, 100: 232448, 80: 166912}  # bytes of shared memory one block may use (227 KB on sm_90)


@dataclasses.dataclass
class Launch:
    case: str
    kernel: str
    meta: dict                   # the constexprs that are ints/bools/strings, num_warps and num_stages
    shared: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    dot: str = "-"               # "wgmma" | "mma.sync" | "fma/none"
    dtype: str = ""              # the first tensor argument's dtype
    seconds: float = 0.0
    cached: bool = False
    problems: list = dataclasses.field(default_factory=list)


class _StandInDriver:
    """The few calls of Triton's active driver that compiling (not launching) makes."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def _stats_path() -> str:
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(root, "sslpt_aot_stats.json")


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict | None:
    """registers, spill stores/loads and stack bytes from a ``ptxas -v`` log (None if not in it)."""
    frame, regs = _PTXAS.search(log), _REGS.search(log)
    if not (frame and regs):
        return None
    return {"registers": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def _ptxas_binary() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - an older Triton: any ptxas on PATH
        return shutil.which("ptxas")


def run_ptxas(ptx: str, arch: int) -> dict | None:
    """ptxas -v on ``ptx`` (for a kernel that came out of Triton's cache, whose log is gone)."""
    binary = _ptxas_binary()
    if not binary:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([binary, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    return parse_ptxas(out.stdout + out.stderr)


def dot_lowering(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma/none"


def _info_nce_mma_sync(launch: Launch) -> str | None:
    """info_nce offers configs of fewer than 64 rows (mma.sync on sm_90) only where no 64-row one fits."""
    import torch

    info_nce = importlib.import_module("sslpt.kernels.info_nce")
    kind = "fwd" if "fwd" in launch.kernel else "bwd"
    elsize = torch.empty((), dtype=getattr(torch, launch.dtype.replace("torch.", "") or "bfloat16")).element_size()
    configs = info_nce._gpu_configs(kind, launch.meta["BLOCK_D"], elsize)
    if all(c.kwargs["BLOCK_M"] < info_nce.WGMMA_MIN_ROWS for c in configs):
        return (f"no {info_nce.WGMMA_MIN_ROWS}-row tile of {launch.meta['BLOCK_D']}-wide {launch.dtype} rows fits "
                "(shared memory, or the [BLOCK_M, d] fp32 accumulator of the backward)")
    return None


def _prototype_mma_sync(launch: Launch) -> str | None:
    """prototype_cross_entropy offers tiles of fewer than 64 rows only where no 64-row one is listed or fits."""
    import torch

    module = importlib.import_module("sslpt.kernels.prototype_cross_entropy")
    kind = "teacher" if "teacher" in launch.kernel else "grad"
    elsize = torch.empty((), dtype=getattr(torch, launch.dtype.replace("torch.", "") or "bfloat16")).element_size()
    configs = module._gpu_configs(kind, launch.meta["BLOCK_D"], elsize)
    if all(c.kwargs[module._ROWS[kind]] < 64 for c in configs):
        return (f"no 64-row {kind} tile of {launch.meta['BLOCK_D']}-wide {launch.dtype} rows fits "
                "(shared memory, registers)")
    return None


# kernels that may use mma.sync on sm_90 where their module says no wgmma-sized tile can work: name -> reason or None
MMA_SYNC_ACCEPTED: dict[str, Callable[[Launch], str | None]] = {
    "_info_nce_fwd_kernel": _info_nce_mma_sync, "_info_nce_bwd_kernel": _info_nce_mma_sync,
    "_teacher_pass_kernel": _prototype_mma_sync, "_prototype_grad_kernel": _prototype_mma_sync,
}


def judge(launch: Launch, arch: int) -> list[str]:
    """The reasons this compiled launch would not run, or would run far below the hardware's rate."""
    problems = []
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[90])
    if launch.shared > limit:
        problems.append(f"shared memory {launch.shared / 1024:.0f} KB > {limit / 1024:.0f} KB")
    if launch.spill_stores:
        problems.append(f"spills {launch.spill_stores} bytes")
    if arch >= 90 and launch.dot == "mma.sync":
        accepted = MMA_SYNC_ACCEPTED.get(launch.kernel, lambda _: None)(launch)
        if accepted:
            launch.dot = f"mma.sync (accepted: {accepted})"
        else:
            problems.append("tl.dot lowered to mma.sync, not wgmma")
    return problems


def _meta(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str)) and k.isupper() or
            k in ("num_warps", "num_stages")}


@contextlib.contextmanager
def recording(arch: int = 90, verbose: bool = False) -> Iterator[tuple[list[Launch], dict]]:
    """Within the block, Triton launches compile for sm_<arch>a and are recorded instead of running."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - Triton < 3.4
        knobs = None
    launches: list[Launch] = []
    stats_file = _stats_path()
    try:
        with open(stats_file) as f:
            stats_cache = json.load(f)
    except (OSError, ValueError):
        stats_cache = {}
    case = {"name": ""}
    seen: set = set()
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = getattr(kernel.metadata, "hash", None) or str(id(kernel))
        if key in seen:  # the same compiled kernel launched again: one row is enough
            return kernel
        seen.add(key)
        launch = Launch(case["name"], self.__name__, _meta(kwargs), seconds=time.perf_counter() - started,
                        dtype=str(next((a.dtype for a in args if hasattr(a, "dtype")), "")))
        launch.shared = int(getattr(kernel.metadata, "shared", 0) or 0)
        ptx = kernel.asm.get("ptx", "")
        launch.dot = dot_lowering(ptx)
        stats = parse_ptxas(log.getvalue())
        launch.cached = stats is None
        if stats is None:
            stats = stats_cache.get(key) or run_ptxas(ptx, arch)
        if stats:
            stats_cache[key] = stats
            for name, value in stats.items():
                setattr(launch, name, value)
        launch.problems = judge(launch, arch)
        launches.append(launch)
        if verbose:
            print(f"[aot_check]   {launch.kernel} {launch.meta}: {launch.seconds:.1f} s", flush=True)
        return kernel

    def every_config(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid")
        try:
            configs = self.prune_configs(kwargs)
        except Exception:  # noqa: BLE001 - another Triton's signature: compile them all
            configs = self.configs
        for config in configs:
            self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())

    previous = getattr(driver, "_active", None)  # not driver.active: without a GPU there is no driver to create
    driver.set_active(_StandInDriver(arch))
    JITFunction.run, Autotuner.run = compile_only, every_config
    dump = knobs.nvidia.dump_ptxas_log if knobs is not None else None
    if knobs is not None:
        knobs.nvidia.dump_ptxas_log = True
    try:
        yield launches, case
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        if previous is None:
            driver._active = None
        else:
            driver.set_active(previous)
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = dump
        try:
            os.makedirs(os.path.dirname(stats_file), exist_ok=True)
            with open(stats_file, "w") as f:
                json.dump(stats_cache, f)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ cases
# Each runs one op's Triton implementation forward and backward on CPU tensors; shapes of the benchmarks
# (bench_gather, bench_loss, bench_contrastive, bench_attention) with the batch cut down.

def _leaf(*shape, dtype, requires_grad=True):
    import torch

    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def case_embed():
    import torch

    from sslpt.kernels.embed_visible_patches import embed_visible_patches_triton
    for dim in (768, 1024):                     # bench_gather: 224 px, p = 16, K = 49 of 196, bf16
        imgs = torch.randn(4, 3, 224, 224, dtype=torch.bfloat16)
        ids = torch.rand(4, 196).argsort(1)[:, :49]
        weight, bias = _leaf(dim, 3, 16, 16, dtype=torch.bfloat16), _leaf(dim, dtype=torch.bfloat16)
        for pos_grad in (False, True):          # MAE's frozen table (no dpos), and a learnable one
            pos = _leaf(1, 196, dim, dtype=torch.float32, requires_grad=pos_grad)
            embed_visible_patches_triton(imgs, ids, weight, bias, pos, 16).sum().backward()


def case_tokens():
    import torch

    from sslpt.kernels.gather_tokens import gather_tokens_triton
    from sslpt.kernels.scatter_tokens import scatter_tokens_triton
    for dim in (768, 1024):
        ids = torch.rand(4, 196).argsort(1)[:, :49]
        gather_tokens_triton(_leaf(4, 196, dim, dtype=torch.bfloat16), ids).sum().backward()
        scatter_tokens_triton(_leaf(4, 49, dim, dtype=torch.bfloat16), ids, 196,
                              _leaf(dim, dtype=torch.bfloat16)).sum().backward()


def case_patch_loss():
    import torch

    from sslpt.kernels.patch_loss import patch_loss_triton
    from sslpt.kernels.relative_loss import relative_loss_triton
    mask = torch.rand(8, 196) < 0.75            # bench_loss: L 196, P 768, bf16 predictions, fp32 targets
    pred = _leaf(8, 196, 768, dtype=torch.bfloat16)
    patch_loss_triton(pred, torch.randn(8, 196, 768), mask, True, 1e-6)[0].backward()
    patch_loss_triton(pred, torch.randn(8, 3, 224, 224), mask, True, 1e-6, 16)[0].backward()
    relative_loss_triton(_leaf(8, 196, dtype=torch.bfloat16), torch.rand(8, 196), True).backward()


def _contrastive(fn, n: int, dim: int, dtype, **kwargs):
    q, k = _leaf(n, dim, dtype=dtype), _leaf(n, dim, dtype=dtype)
    fn(q, k, 0.07, **kwargs).backward()


def case_info_nce():
    import torch

    from sslpt.kernels.info_nce import info_nce_triton
    # bench_contrastive: d 256 bf16 (N 4096..65536: N only sizes the grid and the autotuning key)
    for symmetric in (False, True):
        _contrastive(info_nce_triton, 4096, 256, torch.bfloat16, normalize=True, symmetric=symmetric, group=None)


def case_info_nce_wide():
    import torch

    from sslpt.kernels.info_nce import info_nce_triton
    # the widest rows the GPU kernels serve (MAX_GPU_DIM), not powers of two: fp32 (TF32 dots, the fast path), bf16
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        for dtype, dim in ((torch.float32, 250), (torch.float32, 500), (torch.bfloat16, 500)):
            _contrastive(info_nce_triton, 1024, dim, dtype, normalize=True, symmetric=False, group=None)
    finally:
        torch.set_float32_matmul_precision(precision)


def case_nt_xent():
    import torch

    from sslpt.kernels.nt_xent import nt_xent_triton
    _contrastive(nt_xent_triton, 4096, 256, torch.bfloat16, group=None)


def case_dino_loss():
    import torch

    from sslpt.kernels.prototype_cross_entropy import prototype_cross_entropy_triton
    # bench_dino_loss: 2+10 crops, d 256 bf16 (B and K only size the grids)
    student, teacher = _leaf(12 * 64, 256, dtype=torch.bfloat16), _leaf(2 * 64, 256, dtype=torch.bfloat16)
    weights = _leaf(4096, 256, dtype=torch.bfloat16), _leaf(4096, 256, dtype=torch.bfloat16)
    prototype_cross_entropy_triton(student, teacher, *weights, torch.zeros(4096), 0.1, 0.04, 2, "cross").backward()


def case_attention():
    import torch

    from sslpt.kernels.sparse_attention import sparse_attention_triton
    bf16 = torch.bfloat16
    # bench_attention's cases, 2 samples: (heads, tokens, head dim, kind, strict)
    for heads, tokens, head_dim, kind, strict in ((12, 50, 64, "dense", False), (12, 197, 64, "dense", False),
                                                  (16, 197, 32, "dense", False), (12, 60, 64, "packed", False),
                                                  (12, 197, 64, "order", False), (12, 197, 64, "order", True)):
        if kind == "packed":
            lengths = torch.tensor([37, 60])
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
            q, k, v = (_leaf(int(lengths.sum()), heads, head_dim, dtype=bf16) for _ in range(3))
            out = sparse_attention_triton(q, k, v, cu_seqlens=cu, max_seqlen=int(lengths.max()))
        else:
            q, k, v = (_leaf(2, heads, tokens, head_dim, dtype=bf16) for _ in range(3))
            order = torch.rand(2, tokens).argsort(1) if kind == "order" else None
            out = sparse_attention_triton(q, k, v, order=order, strict=strict)
        out.float().sum().backward()


def case_densecl():
    import torch

    from sslpt.kernels.dense_match import _match_triton
    from sslpt.kernels.info_nce import info_nce_triton
    # DenseCL: matching on ResNet-50's layer4 (7 x 7 x 2048) and ViT-B/16's patch tokens (196 x 768), bf16 and
    # fp32 (TF32); the global and dense losses against a queue of 65,536 keys of 128 values (Q only sizes grids)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for locations, channels in ((49, 2048), (196, 768)):
                f1, f2 = (torch.randn(4, locations, channels, dtype=dtype) for _ in range(2))
                _match_triton(f1, f2)
    finally:
        torch.set_float32_matmul_precision(precision)
    q, k = _leaf(256, 128, dtype=torch.bfloat16), _leaf(256, 128, dtype=torch.bfloat16)
    queue = torch.randn(4096, 128, dtype=torch.bfloat16)
    info_nce_triton(q, k, 0.2, True, False, None, queue=queue, in_batch_negatives=False).backward()


CASES: dict[str, Callable[[], None]] = {
    "embed": case_embed, "tokens": case_tokens, "patch_loss": case_patch_loss, "info_nce": case_info_nce,
    "info_nce_wide": case_info_nce_wide, "nt_xent": case_nt_xent, "attention": case_attention,
    "dino_loss": case_dino_loss, "densecl": case_densecl,
}


def oversized_case():
    """A deliberately oversized launch (the self-test of this check): info_nce's forward kernel with 128 x 128
    tiles of 1024-wide fp32 rows and 3 stages, far beyond 227 KB of shared memory."""
    import torch

    info_nce = importlib.import_module("sslpt.kernels.info_nce")
    a = torch.randn(256, 1000)
    lse = torch.empty(256)
    scale = torch.ones(())
    info_nce._info_nce_fwd_kernel[(2,)](
        a, a, scale, lse, lse, 256, 256, 1000, a.stride(0), a.stride(0), 0, 0, 0, 1,
        HAS_SELF=False, HAS_POS=True, UPCAST=False, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_D=1024,
        num_warps=8, num_stages=3)


# ------------------------------------------------------------------------------------------------ report

def table(launches: list[Launch]) -> str:
    lines = ["| case | kernel | config | regs | spills (B) | shared (KB) | dot | s | problems |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for x in launches:
        config = " ".join(f"{k}={v}" for k, v in x.meta.items() if k.startswith(("BLOCK", "num_", "ROWS")))
        spills = "-" if x.spill_stores is None else f"{x.spill_stores}/{x.spill_loads}"
        lines.append(f"| {x.case} | {x.kernel} | {config} | {x.registers if x.registers is not None else '-'} | "
                     f"{spills} | {x.shared / 1024:.1f} | {x.dot} | {x.seconds:.1f}{' (cached)' if x.cached else ''} | "
                     f"{'; '.join(x.problems) or 'ok'} |")
    return "\n".join(lines)


def launched_kernels() -> set[str]:
    """Every Triton kernel of the ops that a launch can name: the ``@triton.jit`` functions of ``sslpt.kernels``
    whose names end in ``_kernel`` (the others are device functions they call)."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    import sslpt.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"sslpt.kernels.{info.name}")
        names |= {name for name, value in vars(module).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, sm_90a)")
    parser.add_argument("--json", help="also write every launch's statistics here")
    parser.add_argument("--verbose", action="store_true", help="print each launch as it is compiled")
    parser.add_argument("--oversized", action="store_true",
                        help="add a deliberately oversized launch (it must make the check fail)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    errors = {}
    cases = {name: CASES[name] for name in args.cases}
    if args.oversized:
        cases["oversized"] = oversized_case
    with recording(args.arch, args.verbose) as (launches, current):
        for name, case in cases.items():
            current["name"] = name
            case_started = time.perf_counter()
            try:
                case()
            except Exception as exc:  # noqa: BLE001 - a case that cannot compile fails the check, with why
                errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
            done = [x for x in launches if x.case == name]
            print(f"[aot_check] {name}: {len(done)} launches in {time.perf_counter() - case_started:.0f} s"
                  + (f", ERROR {errors[name]}" if name in errors else ""), flush=True)
    total = time.perf_counter() - started
    bad = [x for x in launches if x.problems]
    print(f"\n## Triton launches compiled for sm_{args.arch}a ({len(launches)} launches, {total:.0f} s, "
          f"{sum(x.cached for x in launches)} from the cache)\n")
    print(table(launches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "seconds": total, "errors": errors,
                       "launches": [dataclasses.asdict(x) for x in launches]}, f, indent=2)
    for x in bad:
        print(f"[aot_check] FAIL {x.case} / {x.kernel} {x.meta}: {'; '.join(x.problems)}")
    for name, why in errors.items():
        print(f"[aot_check] FAIL case {name}: {why}")
    if set(args.cases) == set(CASES):  # the whole check: a kernel that no case compiles is unchecked
        for kernel in sorted(launched_kernels() - {x.kernel for x in launches}):
            errors[f"coverage:{kernel}"] = "no case launches it"
            print(f"[aot_check] FAIL {kernel}: no case launches it (add one to CASES)")
    print(f"[aot_check] {'FAILED' if bad or errors else 'passed'}: {len(bad)} launches with problems, "
          f"{len(errors)} cases that did not compile")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
