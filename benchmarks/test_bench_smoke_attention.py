"""Smoke test of bench_attention (tiny cases, one repetition): every provider yields a row per case and
mode, timed or with the reason it cannot run here (the CUDA-only ones on the CPU). Run by `make bench-cpu`."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_attention  # noqa: E402
from benchmarks.harness import notes_markdown  # noqa: E402

ALWAYS_TIMED = ("reference", "sdpa", "triton")


def test_every_provider_produces_rows(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(bench_attention.run, args=(device, True), kwargs=dict(warmup=0, rep=1),
                              rounds=1, iterations=1)
    for case in bench_attention.cases(tiny=True):
        for provider in bench_attention.PROVIDERS:
            mine = [r for r in rows if r.case == case.name and r.provider == provider]
            assert {r.mode for r in mine} == {"fwd", "full"}, (case.name, provider)
            for r in mine:
                if provider in ALWAYS_TIMED:
                    assert math.isfinite(r.ms) and r.gbps and r.roofline, r
                else:
                    assert math.isfinite(r.ms) or r.note, r
    if device == "cpu":
        assert "needs CUDA" in notes_markdown(rows)
