"""Smoke test of bench_dino_loss (tiny shapes, one repetition): every provider yields a timed row in both modes.
A wiring test, not a timing test; run by `make bench-cpu` (the saved-memory measurement is tested in
tests/test_prototype_cross_entropy.py)."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_dino_loss  # noqa: E402
from benchmarks.harness import to_markdown  # noqa: E402


def test_every_provider_produces_rows(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(bench_dino_loss.run, args=(device, True), kwargs=dict(warmup=0, rep=1),
                              rounds=1, iterations=1)
    for provider in bench_dino_loss.PROVIDERS:
        mine = [r for r in rows if r.provider == provider]
        assert {r.mode for r in mine} == {"fwd", "full"}, provider
        assert all(math.isfinite(r.ms) and r.tflops for r in mine), mine
    assert to_markdown(rows).count("\n") == len(rows) + 1

