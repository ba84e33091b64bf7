"""info_nce / nt_xent with a process group: 2 CPU ranks (gloo) x N/2 rows against 1 process x N rows.

The documented convention: each rank returns the mean over its own rows, keys are all-gathered with
gradient (the backward sums key gradients onto their owner), and DDP averages gradients over ranks. So:
  - the average of the ranks' losses equals the one-process loss (no missing negatives: lightly #1176);
  - after DDP-style averaging, the gradient of a shared encoder and of a learnable temperature equals the
    one-process gradient (key gradients reach every rank's encoder: lightly #1528);
  - input gradients on a rank are world_size times the one-process ones for its rows.
"""
import os

import pytest
import torch
import torch.distributed as dist

from sslpt.kernels.info_nce import info_nce
from sslpt.kernels.nt_xent import nt_xent
from testkit import as_ddp, spawn_ranks

WORLD = 2
N, D_IN, D = 12, 8, 16
CASES = ("info_nce", "info_nce_symmetric", "nt_xent")
BACKENDS = ("reference", "triton")


def _data():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    weight = torch.randn(D_IN, D, generator=g) / D_IN**0.5
    return x1, x2, weight


def _step(case: str, backend: str, x1, x2, weight, group):
    """One loss + backward through a shared linear encoder; returns loss and the grads."""
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    temperature = torch.tensor(0.2, requires_grad=True)
    a, b = x1 @ weight, x2 @ weight
    if case == "nt_xent":
        loss = nt_xent(a, b, temperature, group=group, backend=backend)
    else:
        loss = info_nce(a, b, temperature, symmetric=case == "info_nce_symmetric", group=group, backend=backend)
    loss.backward()
    return {"loss": loss.detach(), "weight": weight.grad, "temperature": temperature.grad,
            "x1": x1.grad, "x2": x2.grad}


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x1, x2, weight = _data()
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        results = {}
        for backend in BACKENDS:
            for case in CASES:
                r = _step(case, backend, x1[rows], x2[rows], weight, dist.group.WORLD)
                as_ddp(r, ("loss", "weight", "temperature"), ("x1", "x2"), WORLD)
                results[backend, case] = r
        if rank == 0:
            torch.save(results, out_path)
        # leave together: a rank tearing gloo down while its peer still holds the connection can abort the
        # peer ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path_factory.mktemp("dist") / "results.pt")
    spawn_ranks(_worker, out, nprocs=WORLD)
    return torch.load(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one_process(two_rank_results, case, backend):
    x1, x2, weight = _data()
    single = _step(case, "reference", x1, x2, weight, None)
    ranks = two_rank_results[backend, case]
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ranks["loss"], single["loss"], **tol)
    torch.testing.assert_close(ranks["weight"], single["weight"], **tol)
    torch.testing.assert_close(ranks["temperature"], single["temperature"], **tol)
    for key in ("x1", "x2"):
        torch.testing.assert_close(ranks[key] / WORLD, single[key], **tol)
