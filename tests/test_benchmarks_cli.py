"""The benchmark harness and the one-call GPU check, run the way CI can: on the CPU, tiny, once.

Checks the wiring, never a timing: every provider yields a row (timed, or with the reason it could not run),
failures and timeouts lose only their own rows, and ``gpu_check --cpu-smoke`` writes its table and JSON.
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.harness import (ProviderUnavailable, Row, bench, device_roofline, notes_markdown, to_json,
                                to_markdown)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_ROOF = {"copy_gbps": 10.0, "matmul_tflops": 0.1, "fp32_tflops": 0.1, "matmul_dtype": "float32", "device": "cpu"}


@pytest.fixture
def roofline_file(tmp_path, monkeypatch):
    path = tmp_path / "roofline.json"
    path.write_text(json.dumps(FAKE_ROOF))
    monkeypatch.setenv("BENCH_ROOFLINE_FILE", str(path))
    return path


def _providers():
    x = torch.randn(64, 64)

    def broken(mode):
        def step():
            raise RuntimeError("kernel exploded")
        return step

    def unavailable(mode):
        raise ProviderUnavailable("needs a GPU")

    return {"ok": lambda mode: (lambda: x * 2), "unavailable": unavailable, "broken": broken}


def test_roofline_shared_by_file(roofline_file):
    roof = device_roofline("cpu")
    assert roof["copy_gbps"] == 10.0 and "parent run" in roof["source"]


def test_bench_rows_reasons_and_streaming(roofline_file, tmp_path, monkeypatch):
    stream = tmp_path / "rows.jsonl"
    monkeypatch.setenv("BENCH_ROWS_JSONL", str(stream))
    monkeypatch.setenv("BENCH_KEEP_GOING", "1")
    nbytes = 2 * 64 * 64 * 4
    rows = bench("toy", "64x64", _providers(), bytes_moved={"fwd": nbytes}, modes=("fwd",), device="cpu",
                 warmup=0, rep=1)
    by_name = {r.provider: r for r in rows}
    assert math.isfinite(by_name["ok"].ms) and by_name["ok"].gbps and by_name["ok"].roofline
    assert by_name["unavailable"].note == "unavailable: needs a GPU"
    assert by_name["broken"].note == "failed: RuntimeError: kernel exploded"
    streamed = [json.loads(line)["row"] for line in stream.read_text().splitlines()]
    assert [r["provider"] for r in streamed] == ["ok", "unavailable", "broken"]
    assert streamed[2]["ms"] is None  # NaN is written as null
    assert "kernel exploded" in notes_markdown(rows) and "needs a GPU" in notes_markdown(rows)
    assert to_markdown(rows).count("skipped") == 2
    assert json.loads(to_json(rows, {}))["rows"][1]["note"] == "unavailable: needs a GPU"


def test_bench_raises_unless_keep_going(roofline_file, monkeypatch):
    monkeypatch.delenv("BENCH_KEEP_GOING", raising=False)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        bench("toy", "64x64", _providers(), bytes_moved={"fwd": 1.0}, modes=("fwd",), device="cpu", warmup=0, rep=1)


def test_row_stays_backward_compatible():
    row = Row("f", "c", "p", "fwd", 1.0, 2.0, None, 0.5, None)  # the nine positional fields of before
    assert row.note is None and row.extra is None


def test_every_contrastive_provider_gives_a_row_or_a_reason(roofline_file):
    from benchmarks import bench_contrastive

    rows = bench_contrastive.run("cpu", True, warmup=0, rep=1, families=("info_nce",))
    for provider in bench_contrastive.PROVIDERS:
        mine = [r for r in rows if r.provider == provider]
        assert {r.mode for r in mine} == {"fwd", "full"}, provider
        for r in mine:
            assert (math.isfinite(r.ms) and r.tflops) or r.note.startswith(("unavailable:", "out of memory:")), r


def test_parse_tests_from_junit_and_from_log(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.a" name="ok"/>'
                   '<testcase classname="tests.a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.a" name="gpu"><skipped message="no gpu"/></testcase>'
                   '</testsuite></testsuites>')
    result = gpu_check.parse_tests(str(xml), "")
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert result["failures"] == ["tests.a::bad"]
    log = "FAILED tests/test_x.py::test_y - assert 0\n3 passed, 1 failed in 2.0s\n"
    result = gpu_check.parse_tests(str(tmp_path / "missing.xml"), log)
    assert (result["passed"], result["failed"], result["failures"]) == (3, 1, ["tests/test_x.py::test_y"])


def test_timeout_kills_the_stage_and_keeps_its_rows(tmp_path):
    started = time.perf_counter()
    rc, timed_out, _ = gpu_check.run_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                           1.0, str(tmp_path / "log"))
    assert timed_out and rc != 0 and time.perf_counter() - started < 20
    stage = gpu_check.Stage("toy", [], 1.0, family="toy", status="timed out")
    (tmp_path / "toy.rows.jsonl").write_text(json.dumps({"roofline": FAKE_ROOF}) + "\n"
                                             + json.dumps({"row": {"provider": "a", "ms": 1.0}}) + "\n"
                                             + '{"row": {"provider": "b", "ms"')  # cut short by the kill
    rows, complete = gpu_check.load_rows(stage, str(tmp_path))
    assert rows == [{"provider": "a", "ms": 1.0}] and not complete


def test_budget_shares():
    stages = [gpu_check.Stage(name, [], weight) for name, weight in (("a", 1.0), ("b", 3.0))]
    assert gpu_check.allot(stages, 0, 100.0) == pytest.approx(25.0)
    stages[0].status = "ok"
    assert gpu_check.allot(stages, 1, 60.0) == pytest.approx(60.0)
    assert gpu_check.allot(stages, 1, 3.0) == pytest.approx(3.0)  # never beyond what is left


def test_gpu_check_cpu_smoke_writes_table_and_json(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, OUT=str(tmp_path / "device_out"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out),
                           "--only", "gpu_tests", "train_step_tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for folder in (out, tmp_path / "device_out"):
        assert {"gpu_check.md", "gpu_check.json", "gpu_check_logs.txt"} <= set(os.listdir(folder))
    data = json.loads((out / "gpu_check.json").read_text())
    assert {"torch", "triton", "git_commit", "date", "device"} <= set(data["meta"])
    assert data["meta"]["roofline"]["copy_gbps"] > 0
    status = {s["name"]: s["status"] for s in data["stages"]}
    assert status["roofline"] == status["gpu_tests"] == status["train_step_tiny"] == "ok"
    assert status["contrastive"] == "skipped (asked)"
    from benchmarks.bench_train_step import PROVIDERS

    rows = [r for r in data["rows"] if r["stage"] == "train_step_tiny"]
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    for r in rows:
        assert (r["ms"] and r["extra"]["images_per_s"] > 0) or r["note"].startswith("unavailable:"), r
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("## ") and "torch " + data["meta"]["torch"] in text
    assert "| train_step_tiny | ok |" in text and "### train_step_tiny" in text


# ---- the GPU check as two device calls -----------------------------------------------------------------------

CALL_LIMIT_S = 360  # a lent GPU call: 6 minutes, the machine's start and the copy back included


@pytest.mark.parametrize("call", ["correctness", "speed"])
def test_each_call_fits_six_minutes_on_a_fake_clock(call, capsys):
    """Every stage running to its own timeout (the worst case) still ends within the call's budget."""
    assert gpu_check.main(["--call", call, "--dry-run"]) == 0
    text = capsys.readouterr().out
    total = float(text.split("at most ")[1].split(" s")[0])
    assert total <= gpu_check.DEFAULT_CALL_BUDGET_S < CALL_LIMIT_S
    stages = gpu_check.call_stages(call, ["tests"])
    for stage in stages:  # every stage listed with its budget
        assert f"| {stage.name} | " in text
    if call == "correctness":
        assert [s.name for s in stages] == ["cuda_extension", "gpu_tests"]
        assert stages[1].env["SSLPT_GPU_MAX_DIM"] == "256"
    else:  # the rows that decide the targets come right after the roofline, our kernels before the baselines
        names = [s.name for s in stages]
        assert names[0] == "roofline" and all(n.startswith("target_") for n in names[1:5])
        assert names.index("train_step_compile") == len(names) - 1
        for stage in stages[1:5]:
            assert stage.env["BENCH_PROVIDERS"].split(",")[0] == "triton"


def test_dry_run_with_a_short_budget_skips_the_last_stages(capsys):
    assert gpu_check.main(["--call", "speed", "--dry-run", "--budget", "120"]) == 0
    text = capsys.readouterr().out
    assert "| target_embed | 20 s |" in text and "skipped (budget spent)" in text


def test_provider_and_case_selection(roofline_file, monkeypatch):
    monkeypatch.setenv("BENCH_PROVIDERS", "unavailable,ok")
    rows = bench("toy", "N64", _providers(), device="cpu", warmup=0, rep=1, modes=("fwd",), measure_memory=False)
    assert [r.provider for r in rows] == ["unavailable", "ok"]          # listed ones only, in the listed order
    monkeypatch.setenv("BENCH_CASES", "N65536")
    assert bench("toy", "N64", _providers(), device="cpu", warmup=0, rep=1, modes=("fwd",)) == []
