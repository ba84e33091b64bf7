"""Smoke test of the end-to-end training-step benchmark (tiny model, one repetition): every provider gives
a timed row for MAE and HPM, with images/s, FLOPs and the HPM/MAE ratio filled in. A wiring test, not a
timing test; run by `make bench-cpu` (pytest-benchmark's fixture, so `--benchmark-only` keeps it)."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_train_step  # noqa: E402
from benchmarks.harness import environment, to_json  # noqa: E402


def test_every_provider_produces_rows(benchmark):
    rows = benchmark.pedantic(bench_train_step.run, args=("cpu", True), rounds=1, iterations=1)
    assert {(r.extra["objective"], r.provider) for r in rows} == {
        (o, p) for o in bench_train_step.OBJECTIVES for p in bench_train_step.PROVIDERS}
    for r in rows:
        if r.provider in bench_train_step.COMPILED and not math.isfinite(r.ms):  # only these may be unavailable
            assert r.note.startswith("unavailable:"), r
            continue
        assert math.isfinite(r.ms) and r.ms > 0, r
        assert r.extra["batch"] == bench_train_step.TINY_BATCH
        assert r.extra["images_per_s"] > 0 and r.extra["flops_per_image"] > 0 and r.tflops > 0 and r.roofline > 0
    hpm = [r for r in rows if r.extra["objective"] == "hpm" and math.isfinite(r.ms)]
    assert hpm and all(r.extra["hpm_over_mae"] > 0 for r in hpm)
    assert all(r.extra[f"{part}_ms"] > 0 and r.extra[f"{part}_over_step"] > 0
               for r in hpm for part in bench_train_step.HPM_PARTS)
    droppos = [r for r in rows if r.extra["objective"] == "droppos" and math.isfinite(r.ms)]
    assert droppos and all(0 < r.extra["attn_guide_over_step"] < 1 for r in droppos)
    table = bench_train_step.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "HPM/MAE" in table and "teacher / masking / EMA" in table
    assert '"images_per_s"' in to_json(rows, environment())
