"""Smoke test of bench_contrastive (tiny shapes, one repetition): every provider yields a row in both modes,
timed or with the reason it could not run. A wiring test, not a timing test; run by `make bench-cpu`."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_contrastive  # noqa: E402
from benchmarks.harness import to_markdown  # noqa: E402

ALWAYS_TIMED = ("reference", "chunked", "triton")  # on the CPU (Triton under the interpreter) and on a GPU


def test_every_provider_produces_rows(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(bench_contrastive.run, args=(device, True), kwargs=dict(warmup=0, rep=1),
                              rounds=1, iterations=1)
    for family in bench_contrastive.FAMILIES:
        for provider in bench_contrastive.PROVIDERS:
            mine = [r for r in rows if r.family == family and r.provider == provider]
            assert {r.mode for r in mine} == {"fwd", "full"}, (family, provider)
            for r in mine:
                if provider in ALWAYS_TIMED:
                    assert math.isfinite(r.ms) and r.tflops and r.roofline, r
                else:
                    assert math.isfinite(r.ms) or r.note, r
    assert to_markdown(rows).count("\n") == len(rows) + 1
