"""Smoke test of the harness and bench_gather (tiny shapes, one repetition): every provider of every
family yields a row in both modes. A wiring test, not a timing test; run by `make bench-cpu`.

It uses pytest-benchmark's fixture so that `--benchmark-only` does not skip it.
"""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_gather import PROVIDERS, run  # noqa: E402
from benchmarks.harness import environment, to_json, to_markdown  # noqa: E402

ALWAYS_TIMED = ("reference", "triton", "triton_api", "embed_all_then_gather")


def test_every_provider_produces_rows(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(run, args=(device, True), kwargs=dict(warmup=0, rep=1), rounds=1, iterations=1)
    for family, providers in PROVIDERS.items():
        for provider in providers:
            mine = [r for r in rows if r.family == family and r.provider == provider]
            assert {r.mode for r in mine} == {"fwd", "full"}, (family, provider)
            if provider in ALWAYS_TIMED:
                assert all(math.isfinite(r.ms) and r.gbps and r.roofline for r in mine), mine
            else:  # compile, cuda: may be unavailable here, and then say why
                assert all(math.isfinite(r.ms) or r.note for r in mine), mine
    table = to_markdown(rows)
    assert table.count("\n") == len(rows) + 1
    assert '"rows"' in to_json(rows, environment())
