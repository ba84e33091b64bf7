"""Shared benchmark harness: timing, peak memory, measured rooflines and result tables.

A benchmark family describes one case as a dict of *providers*. A provider is a factory
``make(mode) -> run`` that sets up the inputs for ``mode`` ("fwd", "bwd", "full", ...) and returns
a zero-argument callable doing one step of that mode (``run()`` is what gets timed). A factory
raises ``ProviderUnavailable(reason)`` where it cannot run here (e.g. torch.compile without a
compiler); ``bench`` then prints the reason and records a row with ``ms = nan`` and the reason in
``note``, so every provider still shows up in the table (``notes_markdown`` lists the reasons).

Rates: ``gbps`` = bytes_moved[mode] / time, ``tflops`` = flops[mode] / time, and ``roofline`` =
(the time the device's *measured* copy bandwidth and matmul rate allow) / (the time taken), i.e.
the fraction of the roofline reached. Measured, not datasheet, peaks: the copy rate of a large
device-to-device copy and the rate of a large bf16 matmul (fp32 on CPU), measured once per process
(``device_roofline``), or once per ``gpu_check`` run and handed to its children through the file named
by ``$BENCH_ROOFLINE_FILE``. Either way the figures come from the same run as the rows they grade.

Robustness for one-call GPU runs (benchmarks/gpu_check.py sets these in each child):
- ``$BENCH_ROWS_JSONL``: every row (and the roofline) is appended there as it is produced, so rows
  measured before a timeout or a crash survive;
- ``$BENCH_KEEP_GOING=1``: a provider that fails (an exception, out of memory) becomes a row with
  ``ms = nan`` and the error in ``note`` instead of ending the whole family.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
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
    note: str | None = None     # why a provider produced no timing ("unavailable: ...", "failed: ...")
    extra: dict | None = None   # family-specific figures (e.g. images/s and MFU of a training step)


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
        src = torch.randint(0, 256, (256 * 2**20,), dtype=torch.uint8, device=device)  # 256 MiB, far beyond L2
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src), device=device)
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)  # random data: zeros run faster
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        mm_ms = time_ms(lambda: a @ b, device=device)
        tflops = 2 * n**3 / mm_ms / 1e9
        roof = {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "bf16_tflops": tflops,
                "matmul_tflops": tflops, "matmul_dtype": "bfloat16", "copy_mib": src.numel() // 2**20}
        del src, dst, a, b
        torch.cuda.empty_cache()
    else:
        src = torch.ones(64 * 2**20, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src), warmup=2, rep=5, device=device)
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = time_ms(lambda: a @ b, warmup=2, rep=5, device=device)
        tflops = 2 * n**3 / mm_ms / 1e9
        roof = {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "fp32_tflops": tflops,
                "matmul_tflops": tflops, "matmul_dtype": "float32", "copy_mib": src.numel() // 2**20}
    roof.update(device=device, matmul_n=n, source="measured in this process")
    _emit({"roofline": roof})
    return roof


def _roofline_from_file(device: str) -> dict | None:
    """The roofline a parent run (gpu_check) measured once and shared, when it is for this device."""
    path = os.environ.get("BENCH_ROOFLINE_FILE")
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        roof = json.load(f)
    if roof.get("device") != device:
        return None
    return {**roof, "source": f"measured once by the parent run ({os.path.basename(path)})"}


def device_roofline(device) -> dict:
    """Measured peaks of ``device``, measured once per process (or once per gpu_check run, see above).

    CUDA: {"copy_gbps", "bf16_tflops", "matmul_tflops", "matmul_dtype": "bfloat16", ...};
    CPU:  {"copy_gbps", "fp32_tflops", "matmul_tflops", "matmul_dtype": "float32", ...}.
    Copy bandwidth counts bytes read plus bytes written of a large device-to-device copy; the matmul
    rate is that of an n x n x n product on random data (n = 8192 on CUDA).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dict(_roofline_from_file(str(device)) or _measure_roofline(str(device)))


def describe_roofline(roof: Mapping) -> str:
    """One line stating the measured peaks and how the roofline column is computed."""
    return (f"measured on this run: copy bandwidth {roof['copy_gbps']:.1f} GB/s (read + write), "
            f"{roof['matmul_dtype']} matmul {roof['matmul_tflops']:.2f} TFLOP/s; roofline = minimal time at "
            "those rates for the op's minimal bytes/FLOPs / measured time")


def _emit(record: Mapping) -> None:
    """Append ``record`` to $BENCH_ROWS_JSONL (if set), so partial results survive a timeout."""
    path = os.environ.get("BENCH_ROWS_JSONL")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}, default=str) + "\n")


def emit_row(row: "Row") -> "Row":
    """Record one finished row in $BENCH_ROWS_JSONL (if set) and return it."""
    _emit({"row": {k: _json_safe(v) for k, v in asdict(row).items()}})
    return row


def keep_going() -> bool:
    """Whether failing providers become rows (``$BENCH_KEEP_GOING=1``) instead of raising."""
    return os.environ.get("BENCH_KEEP_GOING", "0").lower() in ("1", "true", "yes")


def short_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


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
            raises ProviderUnavailable (printed; the row gets ms = nan and the reason in ``note``).
        bytes_moved, flops: per mode, the minimal HBM traffic and arithmetic of the op (not of a
            provider), so that GB/s, TFLOP/s and the roofline fraction compare providers fairly.
    Out of memory, or any error under ``$BENCH_KEEP_GOING=1``, also gives a nan row with the reason.
    ``$BENCH_CASES`` and ``$BENCH_PROVIDERS`` narrow and order what runs (see ``selected``): gpu_check's speed
    call times the rows that decide the targets first.
    """
    if not selected(case, "BENCH_CASES"):
        return []
    providers = {name: providers[name] for name in sorted(providers, key=_provider_rank) if selected(name)}
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
        if not nbytes and not nflops:
            print(f"[bench] {family}/{case} ({mode}): no bytes or FLOPs given, so no rate or roofline column",
                  file=sys.stderr)
        for name, factory in providers.items():
            try:
                step = factory(mode)
                step()  # first call: compiles, and surfaces unavailability before timing
                ms = time_ms(step, warmup=warmup, rep=rep, device=device)
                mem = peak_mb(step, device=device) if measure_memory else None
            except ProviderUnavailable as why:
                rows.append(_failed_row(family, case, name, mode, f"unavailable: {why}", device))
                continue
            except torch.OutOfMemoryError as exc:
                rows.append(_failed_row(family, case, name, mode, f"out of memory: {short_error(exc)}", device))
                continue
            except Exception as exc:  # noqa: BLE001 - reported as a row only when asked to keep going
                if not keep_going():
                    raise
                rows.append(_failed_row(family, case, name, mode, f"failed: {short_error(exc)}", device))
                continue
            roofline = floor_ms / ms if floor_ms is not None and ms > 0 else None
            rows.append(emit_row(Row(family, case, name, mode, ms, _rate(nbytes, ms, 1e6), _rate(nflops, ms, 1e9),
                                     roofline, mem)))
    return rows


def _listed(variable: str) -> list[str]:
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def selected(name: str, variable: str = "BENCH_PROVIDERS") -> bool:
    """Whether ``name`` runs: ``$BENCH_PROVIDERS`` (comma-separated) lists the providers to run, and
    ``$BENCH_SKIP_PROVIDERS`` those not to; ``$BENCH_CASES`` lists substrings of which a case must hold one.
    Unset: everything runs."""
    wanted = _listed(variable)
    if variable == "BENCH_CASES":
        return not wanted or any(part in name for part in wanted)
    return (not wanted or name in wanted) and name not in _listed("BENCH_SKIP_PROVIDERS")


def _provider_rank(name: str) -> int:
    """Providers run in the order of ``$BENCH_PROVIDERS`` (the others, when it is unset, keep theirs)."""
    wanted = _listed("BENCH_PROVIDERS")
    return wanted.index(name) if name in wanted else len(wanted)


def _failed_row(family: str, case: str, provider: str, mode: str, note: str, device) -> Row:
    print(f"[bench] {family}/{case}: no timing for provider {provider!r} ({mode}): {note}", file=sys.stderr)
    if _is_cuda(device):
        torch.cuda.empty_cache()
    return emit_row(Row(family, case, provider, mode, float("nan"), None, None, None, None, note=note))


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


def notes_markdown(rows: Iterable[Row]) -> str:
    """Why some providers have no timing: one bullet per (family, provider, reason), '' if none."""
    seen: dict[tuple, list[str]] = {}
    for r in rows:
        if r.note:
            seen.setdefault((r.family, r.provider, r.note), []).append(f"{r.case} {r.mode}")
    return "\n".join(f"- {family} / {provider}: {note} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
                     for (family, provider, note), where in seen.items())


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


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_DIRS = ("kernels", "engine", "benchmarks", "csrc", "configs")


def source_digest(root: str = REPO_ROOT) -> str:
    """sha256 (12 hex digits) over the paths and contents of the source files, to tie results to the code
    where git is not available (a working-tree copy on a lent machine has no .git)."""
    digest = hashlib.sha256()
    for folder in _SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "out"))
            for name in sorted(filenames):
                if name.endswith((".py", ".cu", ".cuh", ".cpp", ".h", ".toml")):
                    path = os.path.join(dirpath, name)
                    digest.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as f:
                        digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


def git_commit() -> str:
    """Short commit hash, '-dirty' when tracked files differ; else $BENCH_GIT_COMMIT; else 'unknown'."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if commit is None:
        return os.environ.get("BENCH_GIT_COMMIT") or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + ("-dirty" if dirty else "")


def _driver() -> str | None:
    version = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version.splitlines()[0]
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip() or None
    except OSError:
        return None


def environment() -> dict:
    """Device name, driver, torch/triton/CUDA versions, git commit and date, for the results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "source_digest": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    return env


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
    from sslpt.kernels._backend import triton_usable

    def guarded(mode: str) -> Callable[[], object]:
        ok, why = triton_usable(torch.device(device))
        if not ok:
            raise ProviderUnavailable(why)
        return factory(mode)
    return guarded


def loss_steps(forward: Callable[[], torch.Tensor], leaves: list) -> Callable[[str], Callable[[], object]]:
    """Provider factory for an op returning a scalar loss: "fwd" runs ``forward``; "full" also back-propagates
    the loss into ``leaves`` (their .grad cleared each step, as an optimizer would)."""
    def factory(mode: str) -> Callable[[], object]:
        if mode == "fwd":
            return forward

        def full():
            for leaf in leaves:
                leaf.grad = None
            forward().backward()
        return full
    return factory


def add_cuda(device, providers: dict, factory: Callable[[str], Callable[[], object]]) -> dict:
    """Add the "cuda" provider (the csrc/ kernel) where ``device`` is a GPU, skipped, saying why, when the
    extension cannot be had there. Never on the CPU, where it could not run and every listed provider must time."""
    if torch.device(device).type == "cuda":
        from sslpt.kernels import _cuda

        def guarded(mode: str) -> Callable[[], object]:
            ok, why = _cuda.usable(device)
            if not ok:
                raise ProviderUnavailable(why)
            return factory(mode)
        providers["cuda"] = guarded
    return providers


def cli_main(title: str, description: str, run: Callable, roofline_note: Callable[[dict], str] | None = None, *,
             select: str = "families", flag: str | None = None, choices: Iterable[str] | None = None,
             argv: list[str] | None = None, markdown: Callable[[list[Row]], str] = to_markdown) -> None:
    """The command line every ``bench_<family>.py`` shares: run, print a Markdown table headed by the
    environment and the measured rooflines (and the reasons of rows without a timing), optionally write
    JSON. ``run(device, tiny, **{select: names})``."""
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
    report(title, lambda: run(args.device, tiny, **{select: getattr(args, select)}), args.device, tiny, args.json,
           roofline_note or describe_roofline, markdown)


def report(title: str, run: Callable[[], list[Row]], device: str, tiny: bool, json_path: str | None,
           roofline_note: Callable[[dict], str] = describe_roofline,
           markdown: Callable[[list[Row]], str] = to_markdown) -> None:
    """Measure the rooflines, ``run()`` the rows, print them under the environment (with the reasons of rows
    without a timing) and optionally write JSON: the output of every benchmark command line."""
    env = environment()
    roof = device_roofline(device)
    rows = run()
    print(f"# {title} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_commit']}, {env['date']})")
    print(roofline_note(roof) + "\n")
    print(markdown(rows))
    notes = notes_markdown(rows)
    if notes:
        print("\nNo timing:\n" + notes)
    if json_path:
        with open(json_path, "w") as f:
            f.write(to_json(rows, {**env, "roofline": roof, "tiny": tiny}))


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.harness [--device D] [--json F]``: the environment and the device's measured
    roofline (gpu_check measures it once this way and shares the file with every family it runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="Measure the device's copy bandwidth and matmul rate.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the roofline (with the environment under 'environment') here")
    args = parser.parse_args(argv)
    roof = device_roofline(args.device)
    env = environment()
    print(json.dumps({**roof, "environment": env}, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**roof, "environment": env}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
