"""CPU microbenchmarks of the loss-prediction family (pytest-benchmark; ``make bench-cpu``).

The first test runs ``bench_loss`` on its tiny CPU case (every provider must give a row); the
others time the references at HPM's per-image sizes, the CPU path of these ops.
"""
import pytest
import torch

from benchmarks import bench_loss
from sslpt.kernels import hard_patch_masking, random_masking
from sslpt.kernels.patch_loss import patch_loss_ref
from sslpt.kernels.relative_loss import relative_loss_ref


def test_bench_loss_tiny(benchmark):
    rows = benchmark.pedantic(bench_loss.run, args=("cpu",), kwargs={"tiny": True, "warmup": 0, "rep": 1},
                              rounds=1, iterations=1)
    assert {(r.case, r.provider) for r in rows} >= set(bench_loss.expected_rows(tiny=True))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "full"])
def test_patch_loss_reference(benchmark, backward):
    pred = torch.randn(8, 196, 768, requires_grad=backward)
    target = torch.randn(8, 196, 768)
    mask = random_masking(8, 196, 0.75).mask

    def step():
        loss, _ = patch_loss_ref(pred, target, mask, True, 1e-6)
        if backward:
            pred.grad = None
            loss.backward()
    benchmark(step)


@pytest.mark.parametrize("stable", [True, False], ids=["stable", "official"])
def test_relative_loss_reference(benchmark, stable):
    score = torch.randn(8, 147, requires_grad=True)
    true_loss = torch.rand(8, 147)

    def step():
        score.grad = None
        relative_loss_ref(score, true_loss, stable).backward()
    benchmark(step)


def test_random_masking(benchmark):
    benchmark(random_masking, 256, 196, 0.75)


def test_hard_patch_masking(benchmark):
    score = torch.randn(256, 196)
    benchmark(hard_patch_masking, score, 0.75, 73)
