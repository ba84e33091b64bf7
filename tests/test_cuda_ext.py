"""The CUDA extension (csrc/, sslpt.kernels._C): build, registration, argument errors; on a GPU, every kernel
against the reference (same tolerances as the Triton tests), forward and backward, fp32/fp16/bf16, awkward
shapes, strided inputs and poisoned outputs.

CPU part (CI): the extension is JIT-built once per session (kernels/_cuda.py; cached under torch's extension
root; skipped, saying why, where nvcc or ninja is missing), imports, exposes every launcher, and gives a clear
error for CPU tensors.
GPU part (marked ``gpu``): runs in the one-call GPU check. Memory and race checking there:
    compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_ext.py -m gpu -x -q
    compute-sanitizer --tool racecheck python -m pytest tests/test_cuda_ext.py -m gpu -x -q -k "topk or relative"
"""
import importlib
import math
import shutil
import time

import pytest
import torch
from conftest import TOLERANCES

from sslpt import kernels
from sslpt.kernels import _backend, _cuda
from sslpt.kernels.gather_tokens import gather_tokens_ref
from sslpt.kernels.hard_patch_masking import top_patches_ref
from sslpt.kernels.info_nce import info_nce_ref
from sslpt.kernels.patch_loss import patch_loss_ref
from sslpt.kernels.relative_loss import relative_loss_ref
from sslpt.kernels.scatter_tokens import scatter_tokens_ref

gather_module = importlib.import_module("sslpt.kernels.gather_tokens")
scatter_module = importlib.import_module("sslpt.kernels.scatter_tokens")
info_nce_module = importlib.import_module("sslpt.kernels.info_nce")

OPS = ("gather_tokens", "scatter_tokens", "patch_loss", "relative_loss", "hard_patch_masking", "info_nce")
CUSTOM_OPS = ("gather_tokens_cuda", "gather_tokens_cuda_bwd", "scatter_tokens_cuda", "scatter_tokens_cuda_bwd",
              "patch_loss_cuda", "patch_loss_cuda_bwd", "relative_loss_cuda", "top_patches_cuda",
              "info_nce_lse_cuda", "info_nce_lse_cuda_bwd")
LAUNCHERS = ("gather_rows", "scatter_rows", "scatter_rows_bwd", "patch_loss_fwd", "patch_loss_bwd",
             "relative_loss_fwd", "row_topk", "lse_rows", "lse_cols", "lse_grad")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_GPU = torch.cuda.is_available()


def _op_modules():
    return {op: importlib.import_module(f"sslpt.kernels.{op}") for op in OPS}


@pytest.fixture(scope="session")
def extension():
    """The extension: sslpt.kernels._C if installed, else built here once (the build time is printed)."""
    installed = _cuda.extension(build=False)
    if installed is not None:
        return installed
    if _cuda._flag("SSL_SKIP_CUDA_BUILD"):
        pytest.skip("SSL_SKIP_CUDA_BUILD is set: the extension is not built")
    if _cuda.cuda_home() is None:
        pytest.skip("no CUDA toolchain: nvcc not found (set CUDA_HOME), so the extension cannot be built here")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed: torch.utils.cpp_extension needs it to build the binding")
    start = time.perf_counter()
    # with a GPU, through load(): the module is then also the one backend="cuda" uses
    module = _cuda.load() if HAS_GPU else _cuda.jit_build()
    print(f"\n[test_cuda_ext] CUDA extension built/loaded in {time.perf_counter() - start:.1f} s")
    return module


@pytest.fixture
def use_extension(extension, monkeypatch):
    """Route the custom ops to the built extension (without a GPU, extension(build=True) would not build)."""
    monkeypatch.setattr(_cuda, "_module", extension)
    return extension


# ---- CPU: build, registration, errors --------------------------------------------------------------------

def test_extension_imports_with_every_launcher(extension):
    missing = [name for name in LAUNCHERS if not hasattr(extension, name)]
    assert not missing, f"launchers missing from the extension: {missing}"
    assert extension.PATCH_LOSS_ROWS > 0 and extension.RELATIVE_ROWS == 32


def test_every_op_has_a_registered_cuda_custom_op():
    for name in CUSTOM_OPS:
        assert hasattr(torch.ops.sslpt, name), f"sslpt::{name} is not registered"
    for op, module in _op_modules().items():
        assert "cuda" in _backend.OPS[op].impls, f"{op} has no 'cuda' implementation"
        assert op in _backend.CUDA_PREFERRED


def _cpu_calls(ext):
    x, ids = torch.randn(2, 5, 8), torch.zeros(2, 3, dtype=torch.int64)
    inv, f32 = torch.zeros(2, 5, dtype=torch.int32), torch.zeros(())
    s = torch.randn(4, 4)
    return {
        "gather_rows": lambda: ext.gather_rows(x, ids, torch.empty(2, 3, 8), 0),
        "scatter_rows": lambda: ext.scatter_rows(x[:, :3], inv, None, torch.empty(2, 5, 8), 0),
        "scatter_rows_bwd": lambda: ext.scatter_rows_bwd(x, inv, torch.empty(2, 3, 8), torch.empty(1, 8), 128, 0),
        "patch_loss_fwd": lambda: ext.patch_loss_fwd(x, x, inv.bool(), torch.empty(2, 5), None, f32, f32.clone(),
                                                     True, 1e-6, 0),
        "patch_loss_bwd": lambda: ext.patch_loss_bwd(x, inv.bool(), f32, f32, None, torch.empty_like(x), 0),
        "relative_loss_fwd": lambda: ext.relative_loss_fwd(s, s, None, f32, f32.clone(), True, 0),
        "row_topk": lambda: ext.row_topk(s, 2, torch.empty(4, 2, dtype=torch.int64), 0),
        "lse_rows": lambda: ext.lse_rows(s, f32, torch.empty(4), None, 0, 0),
        "lse_cols": lambda: ext.lse_cols(s, f32, 64, torch.empty(1, 4), 0),
        "lse_grad": lambda: ext.lse_grad(s, f32, None, None, None, 0, None, None, torch.empty(4, 4), 0),
    }


def test_launchers_reject_cpu_tensors_clearly(extension):
    calls = _cpu_calls(extension)
    assert set(calls) == set(LAUNCHERS)
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            call()


def test_cuda_custom_ops_on_cpu_tensors_give_the_binding_error(use_extension):
    x, ids = torch.randn(2, 5, 8), torch.tensor([[0, 2], [4, 1]])
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.sslpt.gather_tokens_cuda(x, ids)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.sslpt.top_patches_cuda(torch.randn(3, 16), 4)


@pytest.mark.parametrize("call", [
    lambda: kernels.gather_tokens(torch.randn(2, 5, 8), torch.tensor([[0], [3]]), backend="cuda"),
    lambda: kernels.scatter_tokens(torch.randn(2, 1, 8), torch.tensor([[0], [3]]), 5, torch.zeros(8), backend="cuda"),
    lambda: kernels.patch_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.ones(2, 5), backend="cuda"),
    lambda: kernels.relative_loss(torch.randn(2, 5), torch.rand(2, 5), backend="cuda"),
    lambda: kernels.hard_patch_masking(torch.randn(2, 16), 0.75, 3, backend="cuda"),
    lambda: kernels.info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.1, backend="cuda"),
], ids=OPS)
def test_public_ops_with_backend_cuda_on_cpu_tensors_raise(call):
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        call()


def test_auto_keeps_the_cuda_kernels_off_until_measured(monkeypatch):
    assert not any(_backend.CUDA_PREFERRED.values())
    sentinel = object()
    monkeypatch.setattr(_cuda, "_module", sentinel)  # as if the extension were importable
    args = (torch.randn(2, 5, 8), torch.tensor([[0], [3]]))  # the device is given apart: "cuda" is faked

    def chosen(device):
        return _backend.choose("gather_tokens", "auto", device, *args).name
    assert chosen("cpu") == "reference"
    assert chosen("cuda") == "triton"
    monkeypatch.setitem(_backend.CUDA_PREFERRED, "gather_tokens", True)
    assert chosen("cpu") == "reference"
    assert chosen("cuda") == "cuda"


def test_extension_lookup_never_compiles_unasked(monkeypatch):
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "_failure", None)
    monkeypatch.setattr(_cuda, "jit_build", lambda *a, **k: pytest.fail("compiled without being asked"))
    monkeypatch.setattr(_cuda, "_import_installed", lambda: None)
    assert _cuda.extension(build=False) is None
    monkeypatch.delenv("SSL_FORCE_CUDA_BUILD", raising=False)
    if not HAS_GPU:  # build=True without a GPU and without the force flag: no build, a reason instead
        assert _cuda.extension(build=True) is None
        assert "GPU" in _cuda.unavailable_reason() or "toolchain" in _cuda.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            _cuda.load()


def test_arch_list_flag(monkeypatch):
    monkeypatch.delenv("SSL_CUDA_ARCHS", raising=False)
    assert _cuda.cuda_archs() == ["90a"]
    monkeypatch.setenv("SSL_CUDA_ARCHS", "9.0a, 80")
    assert _cuda.cuda_archs() == ["90a", "80"]
    assert _cuda.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_top_patches_reference_tie_rule():
    # ties at the boundary go to the lower position; NaN ranks above +inf; -0.0 equals +0.0
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0],
                           [0.0, -0.0, float("nan"), float("inf"), 0.0],
                           [-0.0, 0.0, -1.0, -0.0, 0.0]])
    got = top_patches_ref(scores, 2).sort(1).values
    assert got.tolist() == [[1, 2], [2, 3], [0, 1]]
    assert top_patches_ref(scores, 4).sort(1).values.tolist() == [[1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 3, 4]]


# ---- GPU: every kernel against the reference -------------------------------------------------------------

gpu = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture
def on_gpu(extension):
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    return _cuda.load()


def _nan_alloc(shape, *, dtype, device):
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch, poison_allocations):
    """Every buffer the CUDA paths allocate starts as NaN (or -7 / -1), so an unwritten element shows."""
    monkeypatch.setattr(gather_module, "_alloc", _nan_alloc)
    monkeypatch.setattr(scatter_module, "_alloc", _nan_alloc)


def _ids(batch, num_patches, num_keep, dtype=torch.int64):
    return torch.rand(batch, num_patches, device=CUDA).argsort(dim=1)[:, :num_keep].to(dtype)


# (B, L, K, D): 16-byte rows in every dtype (768, 192), odd widths (1000 fp16/bf16 -> 8-byte units, 8, 3)
GATHER_SHAPES = [(4, 196, 49, 768), (1, 197, 49, 192), (2, 67, 1, 1000), (3, 16, 16, 8), (2, 50, 13, 3)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gpu_gather_tokens(on_gpu, poisoned, shape, dtype, index_dtype):
    batch, num_patches, num_keep, dim = shape
    x = torch.randn(batch, num_patches, dim, device=CUDA, dtype=dtype, requires_grad=True)
    ids = _ids(batch, num_patches, num_keep, index_dtype)
    out = kernels.gather_tokens(x, ids, backend="cuda")
    grad = torch.randn_like(out)
    out.backward(grad)
    x32 = x.detach().float().requires_grad_()
    expected = gather_tokens_ref(x32, ids)
    expected.backward(grad.float())
    assert out.dtype == dtype and torch.equal(out.float(), expected)  # copies: exact
    assert torch.equal(x.grad.float(), x32.grad)


@gpu
@pytest.mark.parametrize("layout", ["transposed", "sliced_fp32", "sliced_bf16", "expanded"])
def test_gpu_gather_tokens_strided(on_gpu, poisoned, layout):
    batch, num_patches, dim = 2, 37, 96
    if layout == "transposed":  # stride 1 along L: copied to a unit last stride first
        x = torch.randn(batch, dim, num_patches, device=CUDA).transpose(1, 2)
    elif layout.startswith("sliced"):  # offset by 4 elements: 16-byte aligned in fp32, 8 in bf16
        dtype = torch.float32 if layout == "sliced_fp32" else torch.bfloat16
        x = torch.randn(batch, 2 * num_patches, dim + 8, device=CUDA, dtype=dtype)[:, ::2, 4:4 + dim]
    else:
        x = torch.randn(1, num_patches, dim, device=CUDA).expand(batch, -1, -1)
    ids = _ids(batch, num_patches, 11)
    assert torch.equal(kernels.gather_tokens(x, ids, backend="cuda"), gather_tokens_ref(x, ids))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gpu_scatter_tokens(on_gpu, poisoned, shape, dtype):
    batch, num_patches, num_keep, dim = shape
    x_vis = torch.randn(batch, num_keep, dim, device=CUDA, dtype=dtype, requires_grad=True)
    fill = torch.randn(dim, device=CUDA, dtype=dtype, requires_grad=True)
    ids = _ids(batch, num_patches, num_keep)
    out = kernels.scatter_tokens(x_vis, ids, num_patches, fill, backend="cuda")
    grad = torch.randn_like(out)
    out.backward(grad)
    x32, f32 = x_vis.detach().float().requires_grad_(), fill.detach().float().requires_grad_()
    expected = scatter_tokens_ref(x32, ids, num_patches, f32)
    expected.backward(grad.float())
    assert torch.equal(out.float(), expected)
    assert torch.equal(x_vis.grad.float(), x32.grad)
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, math.sqrt(batch * (num_patches - num_keep)))
    torch.testing.assert_close(fill.grad.float(), f32.grad, atol=atol * scale, rtol=rtol)


def _patch_loss_check(pred, target, mask, norm_pix=True, eps=1e-6):
    atol, rtol = TOLERANCES[pred.dtype]
    pred = pred.detach().requires_grad_()
    loss, per_patch = kernels.patch_loss(pred, target, mask, norm_pix, eps, backend="cuda")
    assert loss.dtype == per_patch.dtype == torch.float32
    grad_loss, grad_per_patch = torch.randn((), device=CUDA), torch.randn_like(per_patch)
    torch.autograd.backward((loss, per_patch), (grad_loss, grad_per_patch))
    ref_pred = pred.detach().float().requires_grad_()
    ref_loss, ref_per_patch = patch_loss_ref(ref_pred, target, mask, norm_pix, eps)
    torch.autograd.backward((ref_loss, ref_per_patch), (grad_loss, grad_per_patch))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_patch, ref_per_patch, atol=1e-5, rtol=1e-5)
    assert pred.grad.dtype == pred.dtype
    torch.testing.assert_close(pred.grad.float(), ref_pred.grad, atol=2 * atol * ref_pred.grad.abs().max(),
                               rtol=2 * rtol)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 48), (3, 5, 768), (1, 3, 1000), (2, 4, 2), (4, 196, 3 * 17 * 17)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_gpu_patch_loss(on_gpu, poisoned, dtype, shape, norm_pix):
    pred = torch.randn(*shape, device=CUDA).to(dtype)
    target = torch.randn(*shape, device=CUDA) * 2 + 0.5
    _patch_loss_check(pred, target, torch.rand(shape[:2], device=CUDA) < 0.75, norm_pix)


@gpu
@pytest.mark.parametrize("mask_kind", ["float", "bf16", "none_masked", "strided_inputs", "bf16_target"])
def test_gpu_patch_loss_layouts(on_gpu, poisoned, mask_kind):
    pred, target = torch.randn(3, 10, 64, device=CUDA), torch.randn(3, 10, 64, device=CUDA)
    mask = torch.rand(3, 10, device=CUDA) < 0.5
    if mask_kind == "float":
        mask = mask.float()
    elif mask_kind == "bf16":
        mask = mask.to(torch.bfloat16)
    elif mask_kind == "none_masked":
        mask = torch.zeros_like(mask)
    elif mask_kind == "strided_inputs":
        pred = torch.randn(3, 20, 64, device=CUDA)[:, ::2]
        target = torch.randn(10, 3, 64, device=CUDA).transpose(0, 1)
        mask = torch.rand(10, 3, device=CUDA).t() < 0.5
    else:
        target = target.to(torch.bfloat16)
    _patch_loss_check(pred, target, mask)


@gpu
@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("size_m, dtype", [(1, torch.float32), (2, torch.float16), (147, torch.float32),
                                           (147, torch.bfloat16), (200, torch.float16), (200, torch.bfloat16)])
def test_gpu_relative_loss(on_gpu, poisoned, size_m, dtype, stable):
    atol, rtol = TOLERANCES[dtype]
    p = (torch.randn(3, size_m, device=CUDA) * 2).to(dtype).requires_grad_()
    t = torch.rand(3, size_m, device=CUDA).to(dtype)
    t[:, : size_m // 3] = 0.5  # some ties
    loss = kernels.relative_loss(p, t, stable=stable, backend="cuda")
    (loss * 0.7).backward()
    ref_p = p.detach().float().requires_grad_()
    ref = relative_loss_ref(ref_p, t, stable)
    (ref * 0.7).backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert p.grad.dtype == dtype
    torch.testing.assert_close(p.grad.float(), ref_p.grad, atol=atol * ref_p.grad.abs().max().item(), rtol=rtol)


@gpu
def test_gpu_relative_loss_strided_and_reproducible(on_gpu):
    scores = (torch.randn(3, 90, device=CUDA) * 3)[:, 10:80:2]
    true_loss = torch.randint(0, 10, (35, 3), device=CUDA).float().t()
    results = []
    for _ in range(2):
        x = scores.detach().requires_grad_()
        loss = kernels.relative_loss(x, true_loss, backend="cuda")
        loss.backward()
        results.append((loss, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    x = scores.detach().requires_grad_()
    ref = relative_loss_ref(x, true_loss, True)
    ref.backward()
    torch.testing.assert_close(results[0][0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], x.grad, atol=1e-7, rtol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length, k", [(1, 1), (16, 5), (196, 73), (196, 196), (1000, 1), (5000, 2500)])
@pytest.mark.parametrize("ties", [False, True])
def test_gpu_top_patches_same_set_as_reference(on_gpu, poisoned, dtype, length, k, ties):
    scores = torch.randn(7, length, device=CUDA)
    if ties:  # few distinct values: the boundary falls inside a run of ties; plus NaN, inf and signed zeros
        scores = (scores * 2).round() / 2
        scores[0, : length // 2] = 0.0
        scores[1, ::3] = -0.0
        scores[2, ::5] = float("nan")
        scores[3, ::7] = float("inf")
    scores = scores.to(dtype)
    got = torch.ops.sslpt.top_patches_cuda(scores, k)
    want = top_patches_ref(scores, k)
    assert torch.equal(got, want.sort(1).values)  # the same set, in ascending position order


@gpu
def test_gpu_top_patches_strided_and_hard_patch_masking(on_gpu):
    scores = torch.randn(196, 12, device=CUDA).round().t()  # [12, 196], stride 1 along the batch
    gen = [torch.Generator(CUDA).manual_seed(3) for _ in range(2)]
    ref = kernels.hard_patch_masking(scores, 0.75, 73, generator=gen[0], backend="reference")
    got = kernels.hard_patch_masking(scores, 0.75, 73, generator=gen[1], backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def _info_nce_run(fn, q, k, temperature, **kw):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    t = temperature.detach().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = fn(q, k, t, **kw)
    loss.backward()
    return loss.detach(), q.grad, k.grad, (t.grad if isinstance(t, torch.Tensor) else None)


def _info_nce_check(q, k, temperature, *, rtol, normalize=True, symmetric=False):
    """The CUDA path on (q, k) in their dtype against the float64 reference (the Triton tests' criterion)."""
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    want = _info_nce_run(info_nce_ref, q.double(), k.double(), t64, normalize=normalize, symmetric=symmetric)
    got = _info_nce_run(kernels.info_nce, q, k, temperature, normalize=normalize, symmetric=symmetric,
                        backend="cuda")
    assert got[0].dtype == torch.float32 and got[1].dtype == q.dtype and got[2].dtype == k.dtype
    torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
    for g, w in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(g.double(), w, atol=rtol * w.abs().max().item() + 1e-12, rtol=0)
    if isinstance(temperature, torch.Tensor):
        torch.testing.assert_close(got[3].double(), want[3], atol=rtol * max(1.0, want[3].abs().item()), rtol=0)


INFO_NCE_CASES = [(1, 16, 0.1, True, False), (37, 100, 0.05, True, False), (100, 64, 1.0, False, False),
                  (37, 16, 0.2, True, True), (100, 100, 0.5, False, True), (300, 3000, 0.07, True, True)]


@gpu
@pytest.mark.parametrize("n,d,tau,normalize,symmetric", INFO_NCE_CASES)
def test_gpu_info_nce_fp32(on_gpu, poisoned, n, d, tau, normalize, symmetric):
    q, k = torch.randn(n, d, device=CUDA), torch.randn(n, d, device=CUDA)
    if not normalize:
        q, k = q / d**0.5, k / d**0.5 * 3
    _info_nce_check(q, k, torch.tensor(tau, device=CUDA), rtol=1e-4, normalize=normalize, symmetric=symmetric)


@gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_info_nce_low_precision(on_gpu, poisoned, dtype, rtol, symmetric):
    q, k = (torch.randn(200, 128, device=CUDA) / 128**0.5).to(dtype), (torch.randn(200, 128, device=CUDA) / 4).to(dtype)
    _info_nce_check(q, k, torch.tensor(0.1, device=CUDA), rtol=rtol, normalize=False, symmetric=symmetric)


@gpu
def test_gpu_info_nce_several_row_blocks(on_gpu, poisoned, monkeypatch):
    # blocks of 64 logits rows, column segments merged across blocks, positives in every block
    monkeypatch.setattr(info_nce_module, "_CUDA_CHUNK_ELEMENTS", 64 * 250)
    monkeypatch.setattr(info_nce_module, "_CUDA_COL_SEGMENT", 16)
    q = torch.randn(250, 32, device=CUDA)
    _info_nce_check(q, q + torch.randn_like(q), torch.tensor(0.07, device=CUDA), rtol=1e-4, symmetric=True)


@gpu
def test_gpu_ops_survive_torch_compile(on_gpu):
    x = torch.randn(2, 16, 64, device=CUDA, requires_grad=True)
    ids = _ids(2, 16, 4)
    fn = torch.compile(lambda a, b: gather_module.gather_tokens_cuda(a, b).square().sum(), fullgraph=True)
    fn(x, ids).backward()
    index = ids[..., None].expand(-1, -1, 64)
    expected = torch.zeros_like(x).scatter_(1, index, 2 * gather_tokens_ref(x.detach(), ids))
    assert torch.equal(x.grad, expected)


def _opcheck_cases():
    x, ids = torch.randn(2, 16, 64, device=CUDA), _ids(2, 16, 5)
    pred = torch.randn(2, 16, 48, device=CUDA, requires_grad=True)
    score = torch.randn(2, 30, device=CUDA, requires_grad=True)
    q, k = torch.randn(20, 16, device=CUDA, requires_grad=True), torch.randn(20, 16, device=CUDA, requires_grad=True)
    ops = torch.ops.sslpt
    return [
        (ops.gather_tokens_cuda, (x.requires_grad_(), ids)),
        (ops.scatter_tokens_cuda, (torch.randn(2, 5, 64, device=CUDA, requires_grad=True), ids, 16,
                                   torch.randn(64, device=CUDA, requires_grad=True))),
        (ops.patch_loss_cuda, (pred, torch.randn(2, 16, 48, device=CUDA), torch.rand(2, 16, device=CUDA) < 0.5, True,
                               1e-6, True)),
        (ops.relative_loss_cuda, (score, torch.rand(2, 30, device=CUDA), True, True)),
        (ops.top_patches_cuda, (torch.randn(3, 40, device=CUDA), 7)),
        (ops.info_nce_lse_cuda, (q, k, torch.tensor(3.0, device=CUDA, requires_grad=True), True, 0)),
    ]


@gpu
def test_gpu_custom_op_registration(on_gpu):
    """Schema, fake kernel and autograd formula of each CUDA custom op, as torch.compile sees them."""
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
