"""gather_tokens: Triton (under the interpreter on CPU) against the reference, forward and backward."""
import importlib
import math
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES

from sslpt.kernels import gather_tokens
from sslpt.kernels._backend import triton_usable
from sslpt.kernels.gather_tokens import gather_tokens_ref

gather_module = importlib.import_module("sslpt.kernels.gather_tokens")
scatter_module = importlib.import_module("sslpt.kernels.scatter_tokens")

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu"))[0] and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nan_alloc(shape, *, dtype, device):
    """Stands in for torch.empty in the launchers: any element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(gather_module, "_alloc", nan_alloc)
    monkeypatch.setattr(scatter_module, "_alloc", nan_alloc)


def random_ids(batch, num_patches, num_keep, dtype=torch.int64):
    return torch.rand(batch, num_patches, device=DEVICE).argsort(dim=1)[:, :num_keep].to(dtype)


def reference_with_grad(x, ids, grad):
    """Output and dx of the reference in fp32."""
    x32 = x.detach().float().requires_grad_()
    out = gather_tokens_ref(x32, ids)
    out.backward(grad.float())
    return out, x32.grad


# (B, L, K, D): batch 1, K = 1, K = L, odd L (197, 67), widths 8 / 192 / 1000 (not powers of two)
SHAPES = [(1, 197, 49, 192), (2, 67, 1, 1000), (3, 16, 16, 8), (2, 50, 13, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference(shape, dtype, index_dtype):
    batch, num_patches, num_keep, dim = shape
    x = torch.randn(batch, num_patches, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    ids = random_ids(batch, num_patches, num_keep, index_dtype)
    out = gather_tokens(x, ids, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected, expected_dx = reference_with_grad(x, ids, grad)
    assert out.dtype == dtype and out.shape == (batch, num_keep, dim)
    # a copy: exact in every dtype, and every masked row of dx is exactly zero
    assert torch.equal(out.float(), expected)
    assert torch.equal(x.grad.float(), expected_dx)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_strided_input_read_in_place(layout):
    batch, num_patches, dim = 2, 37, 96
    if layout == "transposed":  # stride 1 along L, not D
        base = torch.randn(batch, dim, num_patches, device=DEVICE).requires_grad_()
        x = base.transpose(1, 2)
    elif layout == "sliced":  # every other token, a column window
        base = torch.randn(batch, 2 * num_patches, dim + 8, device=DEVICE).requires_grad_()
        x = base[:, ::2, 4:4 + dim]
    else:  # zero batch stride
        base = torch.randn(1, num_patches, dim, device=DEVICE).requires_grad_()
        x = base.expand(batch, -1, -1)
    assert not x.is_contiguous()
    ids = random_ids(batch, num_patches, 11)
    grad = torch.randn(batch, 11, dim, device=DEVICE)
    out = gather_tokens(x, ids, backend="triton")
    (dbase,) = torch.autograd.grad(out, base, grad)
    expected = gather_tokens_ref(x, ids)
    (expected_dbase,) = torch.autograd.grad(expected, base, grad)
    assert torch.equal(out, expected)
    torch.testing.assert_close(dbase, expected_dbase, atol=TOLERANCES[torch.float32][0], rtol=0)


def test_no_visible_token_and_empty_batch():
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    ids = torch.empty(2, 0, dtype=torch.int64, device=DEVICE)
    out = gather_tokens(x, ids, backend="triton")
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_backward_is_deterministic():
    x = torch.randn(4, 197, 64, device=DEVICE, requires_grad=True)
    ids = random_ids(4, 197, 49)
    grad = torch.randn(4, 49, 64, device=DEVICE)
    first = torch.autograd.grad(gather_tokens(x, ids, backend="triton"), x, grad)[0]
    second = torch.autograd.grad(gather_tokens(x, ids, backend="triton"), x, grad)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("bad, error, match", [
    (lambda x, ids: (x.long(), ids), TypeError, "x must have dtype"),
    (lambda x, ids: (x, ids.float()), TypeError, "ids_keep must have dtype"),
    (lambda x, ids: (x[0], ids), ValueError, "x must have 3 dimensions"),
    (lambda x, ids: (x, ids[0]), ValueError, "ids_keep must have 2 dimensions"),
    (lambda x, ids: (x, ids[:1]), ValueError, "batch size"),
    (lambda x, ids: (x, ids + 16), IndexError, r"ids_keep must hold indices in \[0, 16\)"),
    (lambda x, ids: (x, ids - 16), IndexError, "ids_keep must hold indices"),
    (lambda x, ids: (x.numpy(), ids), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(bad, error, match):
    x = torch.randn(2, 16, 8)
    ids = random_ids(2, 16, 4).cpu()
    with pytest.raises(error, match=match):
        gather_tokens(*bad(x, ids), backend="triton")


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    ids = random_ids(2, 9, 4)
    torch.library.opcheck(torch.ops.sslpt.gather_tokens_triton.default, (x, ids))
    dout = torch.randn(2, 4, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.sslpt.gather_tokens_triton_bwd.default, (dout, ids, 9))


def test_benchmark_harness_runs_every_provider(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_gather import PROVIDERS, run

    # aot_eager: the compile provider's wiring without inductor's C++ build (the benchmark itself uses inductor)
    rows = run(DEVICE, tiny=True, warmup=0, rep=1, compile_backend="aot_eager")
    for family, providers in PROVIDERS.items():
        for provider in providers:
            mine = [r for r in rows if r.family == family and r.provider == provider]
            assert {r.mode for r in mine} == {"fwd", "full"}
            assert all(math.isfinite(r.ms) and r.gbps is not None for r in mine), mine
