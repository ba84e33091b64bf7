"""Shared benchmark harness: timing, peak memory, measured rooflines and result tables.

A benchmark family describes one case as a dict of *providers*. A provider is a factory
``make(mode) -> run`` that sets up the inputs for ``mode`` ("fwd", "bwd", "full", ...) and returns
a zero-argument callable doing one step of that mode (``run()`` is what gets timed). A factory
raises ``ProviderUnavailable(reason)`` where it cannot run here (e.g. torch.compile without a
compiler); ``bench`` then prints the reason and records a row with ``ms = nan``, so every
provider still shows up in the table.

Rates: ``gbps`` = bytes_moved[mode] / time, ``tflops`` = flops[mode] / time, and ``roofline`` =
(the time the device's *measured* copy bandwidth and matmul rate allow) / (the time taken), i.e.
the fraction of the roofline reached. Measured, not datasheet, peaks: the copy rate of a large
device-to-device copy and the rate of a large bf16 matmul (fp32 on CPU).
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch

Provider = Callable[[str], Callable[[], object]]


class ProviderUnavailable(RuntimeError):
    """Raised by a provider factory that cannot run on this machine; the message says why."""


@dataclass
class Row:
    family: str
    case: str
    provider: str
    mode: str
    ms: float
    gbps: float | None
    tflops: float | None
    roofline: float | None
    peak_mb: float | None


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _synchronize(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50, device=None) -> float:
    """Median time of one ``fn()`` in milliseconds.

    ``warmup`` and ``rep`` count calls. On CUDA, triton.testing.do_bench does the timing (it flushes
    L2 between calls); it takes millisecond budgets, so they are derived from a first estimate.
    On CPU: a perf_counter loop.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if _is_cuda(device):
        import triton.testing

        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        return float(triton.testing.do_bench(fn, warmup=max(1, int(warmup * estimate)),
                                             rep=max(1, int(rep * estimate)), return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, rep)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], device=None) -> float | None:
    """Extra memory one ``fn()`` needs at its peak, in MiB (CUDA); None on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


@functools.lru_cache(maxsize=None)
def _measure_roofline(device: str) -> dict:
    if _is_cuda(device):
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB, far beyond L2
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src), device=device)
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        mm_ms = time_ms(lambda: a @ b, device=device)
        tflops = 2 * n**3 / mm_ms / 1e9
        return {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "bf16_tflops": tflops,
                "matmul_tflops": tflops, "matmul_dtype": "bfloat16"}
    src = torch.ones(64 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), warmup=2, rep=5, device=device)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm_ms = time_ms(lambda: a @ b, warmup=2, rep=5, device=device)
    tflops = 2 * n**3 / mm_ms / 1e9
    return {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "fp32_tflops": tflops,
            "matmul_tflops": tflops, "matmul_dtype": "float32"}


def device_roofline(device) -> dict:
    """Measured peaks of ``device``, cached per process.

    CUDA: {"copy_gbps", "bf16_tflops", "matmul_tflops", "matmul_dtype": "bfloat16"};
    CPU:  {"copy_gbps", "fp32_tflops", "matmul_tflops", "matmul_dtype": "float32"}.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dict(_measure_roofline(str(device)))


def _rate(amount: float | None, ms: float, scale: float) -> float | None:
    if amount is None or not math.isfinite(ms) or ms <= 0:
        return None
    return amount / ms / scale


def bench(family: str, case: str, providers: Mapping[str, Provider], *,
          bytes_moved: Mapping[str, float] | None = None, flops: Mapping[str, float] | None = None,
          modes: Iterable[str] = ("fwd", "full"), device="cuda", warmup: int = 10, rep: int = 50,
          measure_memory: bool = True) -> list[Row]:
    """Time every provider in every mode; one Row each.

    Args:
        providers: name -> factory; ``factory(mode)`` returns the zero-argument step to time, or
            raises ProviderUnavailable (printed; the row gets ms = nan).
        bytes_moved, flops: per mode, the minimal HBM traffic and arithmetic of the op (not of a
            provider), so that GB/s, TFLOP/s and the roofline fraction compare providers fairly.
    """
    roof = device_roofline(device) if (bytes_moved or flops) else {}
    rows = []
    for mode in modes:
        nbytes = (bytes_moved or {}).get(mode)
        nflops = (flops or {}).get(mode)
        floor_ms = None
        if roof:
            floors = []
            if nbytes:
                floors.append(nbytes / (roof["copy_gbps"] * 1e6))
            if nflops:
                floors.append(nflops / (roof["matmul_tflops"] * 1e9))
            floor_ms = max(floors) if floors else None
        for name, factory in providers.items():
            try:
                step = factory(mode)
                step()  # first call: compiles, and surfaces unavailability before timing
            except ProviderUnavailable as why:
                print(f"[bench] {family}/{case}: skipping provider {name!r} ({mode}): {why}", file=sys.stderr)
                rows.append(Row(family, case, name, mode, float("nan"), None, None, None, None))
                continue
            ms = time_ms(step, warmup=warmup, rep=rep, device=device)
            mem = peak_mb(step, device=device) if measure_memory else None
            roofline = floor_ms / ms if floor_ms is not None and ms > 0 else None
            rows.append(Row(family, case, name, mode, ms, _rate(nbytes, ms, 1e6), _rate(nflops, ms, 1e9),
                            roofline, mem))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def to_markdown(rows: Iterable[Row]) -> str:
    """A markdown table; skipped providers show as 'skipped'."""
    lines = ["| family | case | provider | mode | ms | GB/s | TFLOP/s | roofline | peak MiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = "skipped" if not math.isfinite(r.ms) else f"{r.ms:.4f}"
        roofline = "-" if r.roofline is None else f"{100 * r.roofline:.1f}%"
        lines.append(f"| {r.family} | {r.case} | {r.provider} | {r.mode} | {ms} | {_fmt(r.gbps, '.1f')} | "
                     f"{_fmt(r.tflops, '.2f')} | {roofline} | {_fmt(r.peak_mb, '.1f')} |")
    return "\n".join(lines)


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(rows: Iterable[Row], meta: Mapping) -> str:
    """{"meta": meta, "rows": [...]}; NaN (skipped) becomes null."""
    records = [{k: _json_safe(v) for k, v in asdict(r).items()} for r in rows]
    return json.dumps({"meta": dict(meta), "rows": records}, indent=2, default=str)


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def environment() -> dict:
    """Device name, driver, torch/triton/CUDA versions, git commit and date, for the results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def guard_compile(factory: Callable[[str], Callable[[], object]]) -> Callable[[str], Callable[[], object]]:
    """torch.compile may be unable to run here (no C++ compiler, unsupported GPU): skip, saying why."""
    def guarded(mode: str) -> Callable[[], object]:
        try:
            step = factory(mode)
            step()
        except Exception as exc:  # noqa: BLE001 - any compile failure means "not available here"
            raise ProviderUnavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return step
    return guarded


def guard_triton(device, factory: Callable[[str], Callable[[], object]]) -> Callable[[str], Callable[[], object]]:
    """Skip the Triton provider, saying why, where Triton cannot run on ``device``."""
    from kernels._backend import triton_usable

    def guarded(mode: str) -> Callable[[], object]:
        ok, why = triton_usable(torch.device(device))
        if not ok:
            raise ProviderUnavailable(why)
        return factory(mode)
    return guarded


def cli_main(title: str, description: str, run: Callable, roofline_note: Callable[[dict], str], *,
             select: str = "families", flag: str | None = None, choices: Iterable[str] | None = None,
             argv: list[str] | None = None) -> None:
    """The command line every ``bench_<family>.py`` shares: run, print a Markdown table headed by the
    environment and the measured rooflines, optionally write JSON. ``run(device, tiny, **{select: names})``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default on CPU)")
    parser.add_argument("--json", help="also write the rows and environment to this file")
    choices = list(choices) if choices is not None else None
    parser.add_argument(f"--{flag or select}", dest=select, nargs="+", choices=choices, default=choices,
                        help=f"which {flag or select} to run (default: all)")
    args = parser.parse_args(argv)
    tiny = args.tiny or torch.device(args.device).type == "cpu"
    env = environment()
    roof = device_roofline(args.device)
    rows = run(args.device, tiny, **{select: getattr(args, select)})
    print(f"# {title} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_commit']}, {env['date']})")
    print(roofline_note(roof) + "\n")
    print(to_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(rows, {**env, "roofline": roof, "tiny": tiny}))
