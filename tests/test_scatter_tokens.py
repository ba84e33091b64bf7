"""scatter_tokens: Triton (under the interpreter on CPU) against the reference, forward and backward."""
import importlib

import pytest
import torch
from conftest import TOLERANCES

from sslpt.kernels import scatter_tokens
from sslpt.kernels._backend import triton_usable
from sslpt.kernels.scatter_tokens import scatter_tokens_ref

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
    monkeypatch.setattr(scatter_module, "_alloc", nan_alloc)


def random_ids(batch, num_patches, num_keep, dtype=torch.int64):
    return torch.rand(batch, num_patches, device=DEVICE).argsort(dim=1)[:, :num_keep].to(dtype)


def reference_with_grads(x_vis, ids, num_patches, fill, grad):
    """Output, dx_vis and dfill of the reference, all in fp32."""
    x32 = x_vis.detach().float().requires_grad_()
    fill32 = fill.detach().float().requires_grad_()
    out = scatter_tokens_ref(x32, ids, num_patches, fill32)
    out.backward(grad.float())
    return out, x32.grad, fill32.grad


# (B, L, K, D): batch 1, K = 1, K = L (nothing masked), odd L (197, 67), widths 8 / 192 / 1000
SHAPES = [(1, 197, 49, 192), (2, 67, 1, 1000), (3, 16, 16, 8), (2, 50, 13, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference(shape, dtype, index_dtype):
    batch, num_patches, num_keep, dim = shape
    x_vis = torch.randn(batch, num_keep, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    fill = torch.randn(1, 1, dim, device=DEVICE, dtype=dtype, requires_grad=True)  # a mask-token parameter
    ids = random_ids(batch, num_patches, num_keep, index_dtype)
    out = scatter_tokens(x_vis, ids, num_patches, fill, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected, expected_dx, expected_dfill = reference_with_grads(x_vis, ids, num_patches, fill, grad)
    assert out.dtype == dtype and out.shape == (batch, num_patches, dim)
    assert torch.equal(out.float(), expected)  # copies: exact
    assert torch.equal(x_vis.grad.float(), expected_dx)
    # dfill is a sum over up to B*L rows: fp32 accumulation, then one rounding to the fill's dtype
    atol, rtol = TOLERANCES[dtype]
    assert fill.grad.shape == fill.shape and fill.grad.dtype == dtype
    scale = 1 + expected_dfill.abs().max().item()
    torch.testing.assert_close(fill.grad.float(), expected_dfill, atol=atol * scale, rtol=rtol)


def test_fill_in_another_dtype_and_strided_inputs():
    batch, num_patches, num_keep, dim = 2, 37, 11, 96
    base = torch.randn(batch, dim, num_keep, device=DEVICE, dtype=torch.float16).requires_grad_()
    x_vis = base.transpose(1, 2)  # stride 1 along K
    fill = torch.randn(dim, device=DEVICE, dtype=torch.float32, requires_grad=True)
    ids = torch.rand(batch, num_patches, device=DEVICE).argsort(1)[:, :2 * num_keep:2]  # non-contiguous ids
    assert not x_vis.is_contiguous() and not ids.is_contiguous()
    out = scatter_tokens(x_vis, ids, num_patches, fill, backend="triton")
    grad = torch.randn(batch, num_patches, dim, device=DEVICE, dtype=torch.float16).transpose(0, 1).contiguous()
    grad = grad.transpose(0, 1)  # a non-contiguous incoming gradient too
    dbase, dfill = torch.autograd.grad(out, (base, fill), grad)
    expected = scatter_tokens_ref(x_vis, ids, num_patches, fill)
    expected_dbase, expected_dfill = torch.autograd.grad(expected, (base, fill), grad)
    assert out.dtype == torch.float16 and dfill.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(dbase, expected_dbase)
    torch.testing.assert_close(dfill, expected_dfill, atol=5e-2, rtol=2e-3)  # reference sums in fp16


def test_backward_is_deterministic():
    x_vis = torch.randn(4, 49, 64, device=DEVICE, requires_grad=True)
    fill = torch.randn(64, device=DEVICE, requires_grad=True)
    ids = random_ids(4, 197, 49)
    grad = torch.randn(4, 197, 64, device=DEVICE)
    first = torch.autograd.grad(scatter_tokens(x_vis, ids, 197, fill, backend="triton"), (x_vis, fill), grad)
    second = torch.autograd.grad(scatter_tokens(x_vis, ids, 197, fill, backend="triton"), (x_vis, fill), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_many_row_tiles_per_program():
    """Enough rows that a backward program sums several tiles (and a partial last group)."""
    batch, num_patches, num_keep, dim = 5, 197, 40, 8  # 985 rows, BLOCK_T = 8: 124 tiles, 16 groups of 8
    x_vis = torch.randn(batch, num_keep, dim, device=DEVICE, requires_grad=True)
    fill = torch.randn(dim, device=DEVICE, requires_grad=True)
    ids = random_ids(batch, num_patches, num_keep)
    out = scatter_tokens(x_vis, ids, num_patches, fill, backend="triton")
    grad = torch.randn_like(out)
    dx, dfill = torch.autograd.grad(out, (x_vis, fill), grad)
    _, expected_dx, expected_dfill = reference_with_grads(x_vis, ids, num_patches, fill, grad)
    assert torch.equal(dx, expected_dx)
    torch.testing.assert_close(dfill, expected_dfill, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (lambda x, ids, fill: (x.long(), ids, 16, fill), TypeError, "x_vis must have dtype"),
    (lambda x, ids, fill: (x, ids.float(), 16, fill), TypeError, "ids_keep must have dtype"),
    (lambda x, ids, fill: (x, ids, 16, fill.long()), TypeError, "fill must have dtype"),
    (lambda x, ids, fill: (x[0], ids, 16, fill), ValueError, "x_vis must have 3 dimensions"),
    (lambda x, ids, fill: (x, ids[:, :2], 16, fill), ValueError, r"ids_keep must have shape \[2, 4\]"),
    (lambda x, ids, fill: (x, ids, 16, fill[:5]), ValueError, "fill must have 8 elements"),
    (lambda x, ids, fill: (x, ids, 3, fill), ValueError, "num_patches must be an integer >= K=4"),
    (lambda x, ids, fill: (x, ids, 15.5, fill), ValueError, "num_patches must be an integer"),
    (lambda x, ids, fill: (x, ids + 16, 16, fill), IndexError, r"ids_keep must hold indices in \[0, 16\)"),
    (lambda x, ids, fill: (x, ids - 16, 16, fill), IndexError, "ids_keep must hold indices"),
])
def test_bad_inputs_raise_clear_errors(bad, error, match):
    x = torch.randn(2, 4, 8)
    ids = random_ids(2, 16, 4).cpu()
    fill = torch.zeros(8)
    with pytest.raises(error, match=match):
        scatter_tokens(*bad(x, ids, fill), backend="triton")


def test_custom_ops_pass_opcheck():
    x_vis = torch.randn(2, 4, 24, device=DEVICE, requires_grad=True)
    fill = torch.randn(24, device=DEVICE, requires_grad=True)
    ids = random_ids(2, 9, 4)
    torch.library.opcheck(torch.ops.sslpt.scatter_tokens_triton.default, (x_vis, ids, 9, fill))
    dout = torch.randn(2, 9, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.sslpt.scatter_tokens_triton_bwd.default, (dout, ids))
