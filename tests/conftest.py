"""Shared test setup: interpreter mode for Triton on CPU, seeding, dtype tolerances."""
import os

import torch

# Triton reads TRITON_INTERPRET when kernels are defined, so set it before `kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The suite's tensors are tiny: one intra-op thread is much faster than OpenMP's
# fork/join on every op (and immune to a busy machine). Subprocesses inherit it too.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# (atol, rtol) for comparing a low-precision kernel with the fp32 reference
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_allocations(monkeypatch):
    """Every torch.empty / empty_like starts as NaN (integers as -1), so an output a kernel leaves unwritten shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if os.environ.get("SSLPT_PEERS") != "1":   # tests/peers run in .venv-peers (make test-peers)
        skip_peers = pytest.mark.skip(reason="runs in the peers environment: make test-peers")
        for item in items:
            if "peers" in item.keywords:
                item.add_marker(skip_peers)
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    max_dim = int(os.environ.get("SSLPT_GPU_MAX_DIM", "0") or 0)   # gpu_check's correctness call: small widths
    if max_dim:
        skip_wide = pytest.mark.skip(reason=f"width > SSLPT_GPU_MAX_DIM={max_dim} (cold autotuning takes minutes)")
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "gpu" in item.keywords and any(isinstance(params.get(name), int) and params[name] > max_dim
                                              for name in ("d", "dim", "head_dim")):
                item.add_marker(skip_wide)
