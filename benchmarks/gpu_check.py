"""One call on a GPU machine: the GPU tests, then every benchmark family, then one Markdown + JSON report.

    python -m benchmarks.gpu_check [--out benchmarks/out] [--budget 530]      (or: make gpu-check)
    python -m benchmarks.gpu_check --cpu-smoke                              (the same machinery, tiny, on CPU)

Stages, each in its own subprocess with its own timeout (so one hang or crash loses only its own stage):
    roofline        the environment, and the device's copy bandwidth and bf16 matmul rate, measured once;
                    every later stage grades its rows against this file ($BENCH_ROOFLINE_FILE)
    cuda_extension  builds/loads sslpt.kernels._C (a JIT build where the package was not installed; its cache
                    then serves the later stages); skipped when csrc/ has no sources
    gpu_tests       pytest -m gpu tests/
    bench stages    train_step (ViT-B and ViT-L, our kernels and the reference), attention, contrastive,
                    gather, loss, and last train_step_compile (torch.compile of the reference step, the
                    slowest to start: it gets the time the others left)
Each stage gets a share of the time left (``--budget`` seconds in all, default fits a 10-minute call);
a benchmark writes each row as it is measured ($BENCH_ROWS_JSONL), so a stage that runs out of time
still reports the rows it finished, marked partial. Failing providers become rows with the error
($BENCH_KEEP_GOING=1) instead of ending their family.

Runs from a plain working-tree copy: the package need not be installed (children get PYTHONPATH = the
repository root) and needs only torch, triton, numpy and pytest (pytest-benchmark is not used here).
Outputs: <out>/gpu_check.md (paste it at the top of benchmarks/RESULTS.md), <out>/gpu_check.json,
<out>/gpu_check_logs.txt; copied to $OUT when that is set.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a file from a copy where the package is not installed
    sys.path.insert(0, REPO_ROOT)

DEFAULT_BUDGET_S = 530  # the device tool allows 600 s per call: leave room for start-up and copying back
LOG_TAIL_CHARS = 4000


@dataclass
class Stage:
    name: str
    args: list[str]              # after "python -m"
    weight: float                # share of the remaining budget
    kind: str = "bench"          # "roofline" | "extension" | "tests" | "bench"
    family: str | None = None    # benchmark family (for the report's section)
    min_s: float = 20.0
    # filled in when it runs
    status: str = "not run"
    rc: int | None = None
    seconds: float = 0.0
    timeout: float = 0.0
    log: str = ""
    extra: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # added to the stage's environment (benchmark selection, test widths)


# The two calls of a lent GPU session (each at most ~6 minutes, with the machine's start and the copy back):
# (a) correctness: the CUDA extension's build and the GPU tests at small widths; (b) speed: the rows that decide
# the targets first (our kernels and the baseline each target is set against), then the other rows of our
# kernels, then the references, then torch.compile / FlexAttention / xformers as time allows.
DEFAULT_CALL_BUDGET_S = 330
GPU_TEST_MAX_DIM = 256   # the correctness call's widest rows: d = 500 autotunes for minutes on a cold cache
OURS = "triton,cuda,triton_api"


def correctness_stages(tests: list[str]) -> list[Stage]:
    return [
        Stage("cuda_extension", [], 1.0, "extension", min_s=90),
        Stage("gpu_tests", ["pytest", "-m", "gpu", "-q", "-rfE", "--durations=5", "-p", "no:cacheprovider", *tests],
              2.0, "tests", min_s=60, env={"SSLPT_GPU_MAX_DIM": str(GPU_TEST_MAX_DIM)}),
    ]


def speed_stages() -> list[Stage]:
    dev = ["--device", "cuda"]
    gather, contrastive = ["benchmarks.bench_gather", *dev], ["benchmarks.bench_contrastive", *dev]
    loss, attention = ["benchmarks.bench_loss", *dev], ["benchmarks.bench_attention", *dev]
    dino = ["benchmarks.bench_dino_loss", *dev]
    return [
        Stage("roofline", ["benchmarks.harness", *dev], 0.3, "roofline", min_s=20),
        # the targets: embed 3x embed-all-then-gather, info_nce at N = 65,536, attention against SDPA, patch_loss
        Stage("target_embed", [*gather, "--families", "embed_visible_patches"], 1.0, family="gather", min_s=30,
              env={"BENCH_PROVIDERS": "triton,embed_all_then_gather"}),
        Stage("target_info_nce", [*contrastive, "--families", "info_nce"], 1.0, family="contrastive", min_s=30,
              env={"BENCH_PROVIDERS": "triton,chunked,cuda", "BENCH_CASES": "N65536"}),
        Stage("target_attention", attention, 1.0, family="attention", min_s=30,
              env={"BENCH_PROVIDERS": "triton,sdpa"}),
        Stage("target_loss", [*loss, "--families", "patch_loss"], 0.5, family="loss", min_s=20,
              env={"BENCH_PROVIDERS": "triton,cuda"}),
        # DINO's loss (2+10 crops, K = 65,536, d = 256, bf16; B = 1024, then 64): Triton against the reference
        Stage("target_dino_loss", dino, 1.0, family="dino_loss", min_s=60,   # ~16 cold Triton compiles first
              env={"BENCH_PROVIDERS": "triton,reference"}),
        # the other rows of our kernels, with their references
        Stage("gather", [*gather, "--families", "gather_tokens", "scatter_tokens"], 0.7, family="gather", min_s=20,
              env={"BENCH_PROVIDERS": OURS + ",reference"}),
        Stage("contrastive", [*contrastive, "--families", "info_nce_symmetric", "nt_xent"], 0.7,
              family="contrastive", min_s=20, env={"BENCH_PROVIDERS": "triton,cuda,chunked,reference"}),
        # DenseCL: info_nce against a 65,536-key queue and dense_match, against the materialised references
        Stage("densecl", [*contrastive, "--families", "info_nce_queue", "dense_match"], 0.5, family="contrastive",
              min_s=20, env={"BENCH_PROVIDERS": "triton,chunked,reference"}),
        Stage("loss", [*loss, "--families", "relative_loss", "masking"], 0.5, family="loss", min_s=20,
              env={"BENCH_PROVIDERS": OURS + ",reference,argsort_twice"}),
        Stage("train_step", ["benchmarks.bench_train_step", *dev, "--providers", "kernels", "reference"], 1.5,
              family="train_step", min_s=60),
        # then the rest as time allows: the other attention providers, references, torch.compile
        Stage("attention_others", attention, 0.7, family="attention", min_s=20,
              env={"BENCH_SKIP_PROVIDERS": "triton,sdpa"}),
        Stage("references", [*gather, "--families", "embed_visible_patches"], 0.3, family="gather", min_s=15,
              env={"BENCH_PROVIDERS": "triton_api,reference"}),
        Stage("compile", [*loss, "--families", "patch_loss"], 0.5, family="loss", min_s=20,
              env={"BENCH_PROVIDERS": "compile,reference"}),
        Stage("train_step_compile",
              ["benchmarks.bench_train_step", *dev, "--providers", "kernels_compiled", "compile"], 1.0,
              family="train_step", min_s=60),
    ]


def call_stages(call: str, tests: list[str]) -> list[Stage]:
    """The stages of ``call``: "correctness", "speed", or "all" (both, as one call of a 10-minute budget)."""
    if call == "correctness":
        return correctness_stages(tests)
    if call == "speed":
        return speed_stages()
    return [*speed_stages()[:1], *correctness_stages(tests), *speed_stages()[1:]]


def cpu_smoke_stages(tests: list[str]) -> list[Stage]:
    """The same machinery at tiny sizes on the CPU (Triton under the interpreter), for CI."""
    dev = ["--device", "cpu"]
    return [
        Stage("roofline", ["benchmarks.harness", *dev], 0.5, "roofline", min_s=30),
        Stage("gpu_tests", ["pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *tests], 1.0, "tests",
              min_s=30),
        Stage("train_step_tiny", ["benchmarks.bench_train_step", *dev, "--tiny", "--objectives", "mae"], 2.0,
              family="train_step", min_s=40),
        Stage("contrastive", ["benchmarks.bench_contrastive", *dev, "--tiny", "--families", "info_nce"], 1.0,
              family="contrastive", min_s=30),
    ]


# ------------------------------------------------------------------------------------------------ running

def child_env(out_dir: str, cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["BENCH_KEEP_GOING"] = "1"
    env["BENCH_ROOFLINE_FILE"] = os.path.join(out_dir, "roofline.json")
    if cpu:
        env["TRITON_INTERPRET"] = "1"  # Triton on CPU tensors runs only under the interpreter
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)  # on the GPU the interpreter would run the kernels on the host
    return env


def run_child(cmd: list[str], env: dict, timeout: float, log_path: str) -> tuple[int | None, bool, float]:
    """Run ``cmd`` in its own process group with output to ``log_path``; kill the whole group on timeout
    (torch.compile's worker processes included). Returns (return code, timed out, seconds)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    return rc, timed_out, time.perf_counter() - started


EXTENSION_PROBE = """
import json, kernels
from sslpt.kernels._backend import cuda_extension
ext = cuda_extension()
ops = sorted(n for n in dir(ext) if not n.startswith('_')) if ext is not None else []
print('EXTENSION ' + json.dumps({'loaded': ext is not None, 'module': getattr(ext, '__file__', None), 'ops': ops}))
"""


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run_stage(stage: Stage, out_dir: str, env: dict, timeout: float) -> None:
    stage.timeout = timeout
    env = {**env, **stage.env}
    log_path = os.path.join(out_dir, f"{stage.name}.log")
    py = [sys.executable]
    if stage.kind == "extension":
        cmd = py + ["-c", EXTENSION_PROBE]
    elif stage.kind == "tests":
        if importlib.util.find_spec("pytest") is None:
            stage.status, stage.extra = "unavailable", {"reason": "pytest is not installed"}
            return
        cmd = py + ["-m", *stage.args, f"--junitxml={os.path.join(out_dir, 'gpu_tests.xml')}"]
    elif stage.kind == "roofline":
        cmd = py + ["-m", *stage.args, "--json", os.path.join(out_dir, "roofline.json")]
    else:
        rows_path = os.path.join(out_dir, f"{stage.name}.rows.jsonl")
        if os.path.exists(rows_path):
            os.remove(rows_path)
        env = {**env, "BENCH_ROWS_JSONL": rows_path}
        cmd = py + ["-m", *stage.args, "--json", os.path.join(out_dir, f"{stage.name}.json")]
    shown = "-c <load sslpt.kernels._C>" if stage.kind == "extension" else " ".join(cmd[1:])[:160]
    print(f"[gpu_check] {stage.name}: python {shown} (timeout {timeout:.0f} s)", flush=True)
    rc, timed_out, seconds = run_child(cmd, env, timeout, log_path)
    stage.rc, stage.seconds, stage.log = rc, seconds, _read(log_path)
    stage.status = "timed out" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
    if stage.kind == "tests":
        stage.extra = parse_tests(os.path.join(out_dir, "gpu_tests.xml"), stage.log)
        if rc in (0, 5) and not timed_out:  # 5: nothing collected (no gpu-marked tests)
            stage.status = "ok"
    elif stage.kind == "extension":
        found = re.search(r"^EXTENSION (\{.*\})$", stage.log, re.M)
        last = [line for line in stage.log.splitlines() if line.strip()][-1:] or [stage.status]
        stage.extra = json.loads(found.group(1)) if found else {"reason": f"not loaded: {last[0][:200]}"}
    print(f"[gpu_check] {stage.name}: {stage.status} in {seconds:.0f} s", flush=True)


def parse_tests(xml_path: str, log: str) -> dict:
    """Counts and failing test ids from pytest's JUnit XML (or from the log when pytest did not finish)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    if os.path.exists(xml_path):
        try:
            root = ET.parse(xml_path).getroot()
            for case in root.iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                if case.find("failure") is not None:
                    counts["failed"] += 1
                    failures.append(name)
                elif case.find("error") is not None:
                    counts["errors"] += 1
                    failures.append(name)
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
            return {**counts, "failures": failures, "source": "junit"}
        except ET.ParseError:
            pass
    summary = re.findall(r"(\d+) (passed|failed|errors?|skipped)", log)
    for number, what in summary:
        counts["errors" if what.startswith("error") else what] = int(number)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
    return {**counts, "failures": failures, "source": "log (pytest did not finish)" if not summary else "log"}


def allot(stages: list[Stage], index: int, remaining: float) -> float:
    """Stage ``index``'s timeout: its weight's share of the time left, at least its minimum, at most all."""
    weights = [s.weight for s in stages[index:] if s.status == "not run"]
    share = remaining * stages[index].weight / max(sum(weights), 1e-9)
    return max(1.0, min(remaining, max(stages[index].min_s, share)))


def clear_extension_locks() -> list[str]:
    """Delete the lock files of torch's JIT extension builds (left by a build that was killed)."""
    try:
        from torch.utils.cpp_extension import get_default_build_root
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    except ImportError:
        return []
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            os.remove(lock)
            removed.append(lock)
        except OSError:
            pass
    return removed


def has_cuda_sources() -> bool:
    return any(glob.glob(os.path.join(REPO_ROOT, "csrc", pattern)) for pattern in ("*.cu", "*.cpp"))


# ------------------------------------------------------------------------------------------------ report

def load_rows(stage: Stage, out_dir: str) -> tuple[list[dict], bool]:
    """(rows, complete): the family's JSON when it finished, else the rows it streamed before it stopped."""
    path = os.path.join(out_dir, f"{stage.name}.json")
    if stage.status == "ok" and os.path.exists(path):
        with open(path) as f:
            return json.load(f)["rows"], True
    rows = []
    for line in _read(os.path.join(out_dir, f"{stage.name}.rows.jsonl")).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed writer may be cut short
        if "row" in record:
            rows.append(record["row"])
    return rows, False


def fallback_environment(device: str) -> dict:
    """What the parent can tell without touching the GPU (used when the roofline stage failed)."""
    from benchmarks.harness import _driver, git_commit, source_digest

    info = {"device": device, "python": platform.python_version(), "git_commit": git_commit(),
            "source_digest": source_digest(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda)
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device != "cpu":
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
        info.update(device=name.splitlines()[0] if name else "unknown GPU", driver=_driver())
    return info


def _rows_table(family: str, rows: list[dict]) -> str:
    from benchmarks.harness import Row, notes_markdown, to_markdown

    objects = [Row(**{k: (float("nan") if k == "ms" and v is None else v) for k, v in r.items()}) for r in rows]
    if family == "train_step":
        from benchmarks.bench_train_step import add_hpm_over_mae, markdown

        add_hpm_over_mae(objects)
        table = markdown(objects)
    else:
        table = to_markdown(objects)
    notes = notes_markdown(objects)
    return table + (f"\n\nNo timing:\n{notes}" if notes else "")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if math.isfinite(seconds) else "-"


def report(stages: list[Stage], out_dir: str, env: dict, roof: dict | None, budget: float, total_s: float,
           cpu: bool) -> tuple[str, dict]:
    date = env.get("date", "")[:10]
    head = (f"## {date}: {env.get('device')} ({'CPU smoke run, not a GPU figure' if cpu else 'gpu_check'})\n\n"
            f"- device: {env.get('device')}"
            + (f", {env.get('gpu_memory_gib')} GiB, {env.get('sm_count')} SMs" if env.get("sm_count") else "")
            + f"; driver {env.get('driver')}\n"
            f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
            f"triton {env.get('triton')}, Python {env.get('python')}\n"
            f"- commit {env.get('git_commit')} (source digest {env.get('source_digest')}), {env.get('date')}\n"
            f"- `python -m benchmarks.gpu_check{' --cpu-smoke' if cpu else ''}`: {total_s:.0f} s of a {budget:.0f} s "
            f"budget; pytest-benchmark {'present' if importlib.util.find_spec('pytest_benchmark') else 'absent'} "
            "(not needed)\n")
    if roof:
        from benchmarks.harness import describe_roofline

        head += f"- roofline, {describe_roofline(roof)}\n"
    else:
        head += "- roofline: not measured (the roofline stage failed; each family measured its own)\n"
    lines = [head, "| stage | status | time | timeout | result |", "|---|---|---:|---:|---|"]
    sections, all_rows = [], []
    for s in stages:
        result = ""
        if s.kind == "tests" and s.extra:
            e = s.extra
            result = (e.get("reason") or f"{e['passed']} passed, {e['failed']} failed, {e['errors']} errors, "
                      f"{e['skipped']} skipped")
            if e.get("failures"):
                sections.append("### GPU test failures\n\n" + "\n".join(f"- `{name}`" for name in e["failures"]))
        elif s.kind == "extension":
            e = s.extra
            if e.get("loaded"):
                result = "sslpt.kernels._C loaded: " + ", ".join(e.get("ops", [])[:12])
            else:
                result = e.get("reason", "sslpt.kernels._C not loaded: the ops run on Triton")
        elif s.kind == "bench" and (s.rc is not None or s.status == "timed out"):
            rows, complete = load_rows(s, out_dir)
            timed = sum(1 for r in rows if r.get("ms") is not None)
            result = f"{len(rows)} rows ({timed} timed)" + ("" if complete else ", partial")
            if rows:
                title = f"### {s.name}" + ("" if complete else f" (partial: {s.status} after {s.seconds:.0f} s)")
                sections.append(f"{title}\n\n{_rows_table(s.family, rows)}")
            all_rows += [{**r, "stage": s.name} for r in rows]
        elif s.kind == "roofline" and roof:
            result = f"{roof['copy_gbps']:.0f} GB/s, {roof['matmul_tflops']:.1f} TFLOP/s {roof['matmul_dtype']}"
        lines.append(f"| {s.name} | {s.status} | {_fmt_s(s.seconds)} | {_fmt_s(s.timeout)} | {result} |")
    text = "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n"
    data = {"meta": {**env, "roofline": roof, "budget_s": budget, "total_s": total_s, "cpu_smoke": cpu},
            "stages": [{"name": s.name, "status": s.status, "rc": s.rc, "seconds": round(s.seconds, 1),
                        "timeout": round(s.timeout, 1), "command": s.args, **({"result": s.extra} if s.extra else {})}
                       for s in stages],
            "rows": all_rows}
    return text, data


def write_outputs(out_dir: str, text: str, data: dict, stages: list[Stage]) -> list[str]:
    logs = "\n\n".join(f"===== {s.name}: {s.status} ({s.seconds:.0f} s)\n{s.log[-LOG_TAIL_CHARS:]}"
                       for s in stages if s.log)
    files = {"gpu_check.md": text, "gpu_check.json": json.dumps(data, indent=2, default=str),
             "gpu_check_logs.txt": logs}
    written = []
    targets = [out_dir] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
    for folder in targets:
        os.makedirs(folder, exist_ok=True)
        for name, content in files.items():
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(content)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ main

def select(stages: list[Stage], only: list[str] | None, skip: list[str], cuda_sources: bool) -> None:
    """Mark the stages not to run (--only / --skip, and the extension without csrc/ sources)."""
    wanted = set(only or []) | ({"roofline"} if only else set())  # the header needs the roofline
    for stage in stages:
        if (wanted and stage.name not in wanted) or stage.name in skip:
            stage.status, stage.weight = "skipped (asked)", 0.0
        elif stage.kind == "extension" and not cuda_sources:
            stage.status, stage.weight, stage.extra = "skipped", 0.0, {"reason": "csrc/ has no CUDA sources"}


def run_plan(stages: list[Stage], budget: float, run_one, clock=time.perf_counter) -> float:
    """Run the stages in order, each with its share of the time left (``allot``); returns the seconds used."""
    started = clock()
    for i, stage in enumerate(stages):
        if stage.status != "not run":
            continue
        remaining = budget - (clock() - started)
        if remaining < 5:
            stage.status = "skipped (budget spent)"
            continue
        run_one(stage, allot(stages, i, remaining))
    return clock() - started


class FakeClock:
    """The dry run's clock: time passes only when a stage 'runs', by its whole timeout."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dry_run(stages: list[Stage], budget: float, call: str, cpu: bool) -> int:
    """Print the plan: every stage with the timeout it would get if each one before it ran to its own timeout
    (the longest the call can take), and its command; exit 1 if that could exceed the budget."""
    clock = FakeClock()

    def pretend(stage: Stage, timeout: float) -> None:
        stage.timeout, stage.status, stage.seconds = timeout, "dry run", timeout
        clock.now += timeout

    total = run_plan(stages, budget, pretend, clock)
    print(f"gpu_check --call {call}{' --cpu-smoke' if cpu else ''}: {len(stages)} stages, budget {budget:.0f} s, "
          f"at most {total:.0f} s (fake clock, every stage to its timeout)\n")
    print("| # | stage | starts at | timeout | status | command | environment |\n|---:|---|---:|---:|---|---|---|")
    at = 0.0
    for i, s in enumerate(stages, 1):
        command = "load sslpt.kernels._C" if s.kind == "extension" else "python -m " + " ".join(s.args)
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        ran = s.status == "dry run"
        print(f"| {i} | {s.name} | {f'{at:.0f} s' if ran else '-'} | {_fmt_s(s.timeout) if ran else '-'} | "
              f"{s.status} | `{command}` | {env} |")
        at += s.seconds if ran else 0.0
    return 0 if total <= budget + 1e-6 else 1



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "out"),
                        help="folder for the report, JSON and logs (default benchmarks/out/)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for everything (default {DEFAULT_BUDGET_S}; 240 with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the same machinery (CI)")
    parser.add_argument("--call", choices=("correctness", "speed", "all"), default="all",
                        help=f"correctness: the CUDA extension and the GPU tests (d <= {GPU_TEST_MAX_DIM}); speed: the "
                             f"benchmarks, target rows first; each fits one device call in {DEFAULT_CALL_BUDGET_S} s. "
                             f"all: both in one call ({DEFAULT_BUDGET_S} s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run nothing: list the stages, their commands and their time budgets, each stage taking "
                             "its whole timeout (the worst case) on a fake clock")
    parser.add_argument("--only", nargs="+", help="run only these stages (and roofline; names as in the report)")
    parser.add_argument("--skip", nargs="+", default=[], help="skip these stages")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test paths of the gpu_tests stage (default tests/; --cpu-smoke: tests/test_nt_xent.py)")
    args = parser.parse_args(argv)
    cpu = args.cpu_smoke
    budget = args.budget or (240.0 if cpu else DEFAULT_BUDGET_S if args.call == "all" else DEFAULT_CALL_BUDGET_S)
    tests = args.tests or (["tests/test_nt_xent.py"] if cpu else ["tests"])
    stages = cpu_smoke_stages(tests) if cpu else call_stages(args.call, tests)
    names = [s.name for s in stages]
    for wanted in (args.only or []) + args.skip:
        if wanted not in names:
            parser.error(f"unknown stage {wanted!r} (stages: {', '.join(names)})")
    if args.dry_run:
        select(stages, args.only, args.skip, has_cuda_sources())
        return dry_run(stages, budget, args.call, cpu)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.rows.jsonl")) + [os.path.join(out_dir, "roofline.json"),
                                                                      os.path.join(out_dir, "gpu_tests.xml")]:
        if os.path.exists(stale):
            os.remove(stale)
    env = child_env(out_dir, cpu)
    select(stages, args.only, args.skip, has_cuda_sources())

    def run_one(stage: Stage, timeout: float) -> None:
        run_stage(stage, out_dir, env, timeout)
        if stage.kind == "extension" and stage.status != "ok":
            # a build killed half-way leaves torch's JIT lock behind, on which every later load would wait:
            # remove it, and ask later stages not to build (the ops then run on Triton)
            stage.extra["locks_removed"] = clear_extension_locks()
            env["SSL_SKIP_CUDA_BUILD"] = "1"

    total = run_plan(stages, budget, run_one)
    roof_file = os.path.join(out_dir, "roofline.json")
    roof, device_env = None, None
    if os.path.exists(roof_file):
        with open(roof_file) as f:
            measured = json.load(f)
        device_env = measured.pop("environment", None)
        roof = measured
    environment = device_env or fallback_environment("cpu" if cpu else "cuda")
    text, data = report(stages, out_dir, environment, roof, budget, total, cpu)
    written = write_outputs(out_dir, text, data, stages)
    print("\n" + text)
    print("[gpu_check] wrote " + ", ".join(written))
    failed = [s.name for s in stages if s.status not in ("ok", "skipped", "skipped (asked)")]
    if failed:
        print(f"[gpu_check] stages not ok: {', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
