"""embed_visible_patches: the fused Triton kernel (interpreter on CPU) against patchify + gather + linear."""
import importlib

import pytest
import torch
from conftest import TOLERANCES

from sslpt.kernels import embed_visible_patches
from sslpt.kernels._backend import triton_usable
from sslpt.kernels.embed_visible_patches import embed_visible_patches_ref, embed_visible_patches_triton
from sslpt.kernels.gather_tokens import gather_tokens_ref, gather_tokens_triton
from sslpt.kernels.scatter_tokens import scatter_tokens_ref, scatter_tokens_triton

MODULES = [importlib.import_module(f"sslpt.kernels.{name}")
           for name in ("embed_visible_patches", "gather_tokens", "scatter_tokens")]

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu"))[0] and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nan_alloc(shape, *, dtype, device):
    """Stands in for torch.empty in the launchers: any element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    for module in MODULES:
        monkeypatch.setattr(module, "_alloc", nan_alloc)


def random_ids(batch, num_patches, num_keep, dtype=torch.int64):
    return torch.rand(batch, num_patches, device=DEVICE).argsort(dim=1)[:, :num_keep].to(dtype)


def make_inputs(batch, channels, height, width, patch, dim, dtype, *, bias=True, pos_grad=True):
    kw = dict(device=DEVICE, dtype=dtype)
    num_patches = (height // patch) * (width // patch)
    imgs = torch.randn(batch, channels, height, width, **kw).requires_grad_()
    weight = (torch.randn(dim, channels, patch, patch, **kw) / (channels * patch * patch) ** 0.5).requires_grad_()
    bias_t = torch.randn(dim, **kw).requires_grad_() if bias else None
    pos = torch.randn(1, num_patches, dim, device=DEVICE).requires_grad_(pos_grad)  # fp32, like MAE's buffer
    return imgs, weight, bias_t, pos


def assert_close_to(actual, expected, dtype):
    """Within the dtype's tolerance, atol relative to the size of the expected values."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected, atol=atol * scale, rtol=rtol)


def check_against_reference(imgs, ids, weight, bias, pos, patch, dtype):
    out = embed_visible_patches(imgs, ids, weight, bias, pos, patch, backend="triton")
    grad = torch.randn_like(out)
    leaves = [t for t in (imgs, weight, bias, pos) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad)
    leaves32 = {id(t): t.detach().float().requires_grad_(t.requires_grad) for t in (imgs, weight, bias, pos)
                if t is not None}
    as32 = [leaves32[id(t)] if t is not None else None for t in (imgs, weight, bias, pos)]
    expected = embed_visible_patches_ref(as32[0], ids, as32[1], as32[2], as32[3], patch)
    expected_grads = torch.autograd.grad(expected, [leaves32[id(t)] for t in leaves], grad.float())
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close_to(out, expected, dtype)
    for leaf, actual, wanted in zip(leaves, grads, expected_grads):
        assert actual.dtype == leaf.dtype and actual.shape == leaf.shape
        assert_close_to(actual, wanted, dtype)


# (B, C, H, W, p, D, K): a 1 x 197 grid (odd L), K = 1 with B = 1, D = 1000, one channel, p = 3
SHAPES = [(1, 3, 2, 394, 2, 24, 50), (1, 3, 8, 8, 4, 1000, 1), (2, 3, 12, 20, 4, 192, 7), (3, 1, 9, 9, 3, 8, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    batch, channels, height, width, patch, dim, num_keep = shape
    imgs, weight, bias, pos = make_inputs(batch, channels, height, width, patch, dim, dtype)
    ids = random_ids(batch, (height // patch) * (width // patch), num_keep)
    check_against_reference(imgs, ids, weight, bias, pos, patch, dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_no_bias_frozen_pos_and_strided_image(index_dtype):
    """MAE's case: pos_embed frozen ([L, D] here), imgs channels-last and cropped (non-contiguous)."""
    imgs, weight, _, pos = make_inputs(2, 3, 16, 24, 4, 40, torch.float32, bias=False, pos_grad=False)
    imgs = imgs.detach().to(memory_format=torch.channels_last)[:, :, 4:, 4:20].requires_grad_()
    assert not imgs.is_contiguous()
    ids = random_ids(2, 12, 5, index_dtype)
    pos = pos[0, :12].contiguous()
    check_against_reference(imgs, ids, weight, None, pos, 4, torch.float32)
    out = embed_visible_patches(imgs, ids, weight, None, pos, 4, backend="triton")
    out.sum().backward()
    assert pos.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 3, 8, 12, 4, 40, 5), (1, 1, 9, 9, 3, 1000, 2), (5, 3, 4, 4, 2, 8, 4)])
def test_frozen_pos_bias_grad_is_a_plain_reduction(shape, dtype, monkeypatch):
    """MAE's case (frozen pos_embed, learnable bias): dbias without the position-gradient kernel."""
    module = MODULES[0]

    def no_dpos(*args):
        raise AssertionError("the position gradient must not be computed for a frozen pos_embed")

    monkeypatch.setattr(module, "_pos_grad_op", no_dpos)
    batch, channels, height, width, patch, dim, num_keep = shape
    imgs, weight, bias, pos = make_inputs(batch, channels, height, width, patch, dim, dtype, pos_grad=False)
    ids = random_ids(batch, (height // patch) * (width // patch), num_keep)
    check_against_reference(imgs.detach(), ids, weight, bias, pos, patch, dtype)


@pytest.mark.parametrize("programs", [1, 3, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_learnable_pos_grad_split_over_the_batch(programs, dtype, monkeypatch):
    """A learnable table: dpos is summed over batch chunks (7 rows: uneven chunks), partials poisoned."""
    module = MODULES[0]
    monkeypatch.setattr(module, "_DPOS_PROGRAMS", programs)
    splits, chunk = module._dpos_splits(7, 2, torch.device(DEVICE))
    assert (splits - 1) * chunk < 7 <= splits * chunk and splits == min(7, max(1, -(-programs // 2)))
    imgs, weight, bias, pos = make_inputs(7, 3, 8, 8, 2, 136, dtype)
    ids = random_ids(7, 16, 11)
    check_against_reference(imgs, ids, weight, bias, pos, 2, dtype)


def test_gradients_only_where_needed():
    """imgs without requires_grad (the usual case) and a learnable pos_embed."""
    imgs, weight, bias, pos = make_inputs(2, 3, 8, 8, 2, 16, torch.float32)
    imgs = imgs.detach()
    ids = random_ids(2, 16, 4)
    check_against_reference(imgs, ids, weight, bias, pos, 2, torch.float32)


def test_backward_is_deterministic():
    """dpos sums a position's rows over the batch in a fixed order: repeated runs agree bit for bit."""
    imgs, weight, bias, pos = make_inputs(8, 3, 8, 8, 2, 32, torch.float32)
    ids = random_ids(8, 16, 12)
    out = embed_visible_patches(imgs, ids, weight, bias, pos, 2, backend="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (imgs, weight, bias, pos), grad, retain_graph=True)
    second = torch.autograd.grad(out, (imgs, weight, bias, pos), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("bad, error, match", [
    (lambda a: {**a, "imgs": a["imgs"].long()}, TypeError, "imgs must have dtype"),
    (lambda a: {**a, "weight": a["weight"].half()}, TypeError, "weight must have dtype in \\(float32\\)"),
    (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias must have dtype"),
    (lambda a: {**a, "ids_keep": a["ids_keep"].float()}, TypeError, "ids_keep must have dtype"),
    (lambda a: {**a, "imgs": a["imgs"][0]}, ValueError, "imgs must have 4 dimensions"),
    (lambda a: {**a, "weight": a["weight"][:, :2]}, ValueError, r"weight must have shape \[8, 3, 4, 4\]"),
    (lambda a: {**a, "bias": a["bias"][:5]}, ValueError, r"bias must have shape \[8\]"),
    (lambda a: {**a, "pos_embed": a["pos_embed"][:, :5]}, ValueError, r"pos_embed must have shape \[1, 8, 8\]"),
    (lambda a: {**a, "ids_keep": a["ids_keep"][:1]}, ValueError, "batch size"),
    (lambda a: {**a, "ids_keep": a["ids_keep"] + 8}, IndexError, r"ids_keep must hold indices in \[0, 8\)"),
    (lambda a: {**a, "imgs": a["imgs"][..., :15]}, ValueError, "must divide the image size"),
    (lambda a: {**a, "patch_size": 4.5}, ValueError, "patch_size must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(bad, error, match):
    imgs, weight, bias, pos = make_inputs(2, 3, 8, 16, 4, 8, torch.float32)
    args = dict(imgs=imgs.detach().cpu(), ids_keep=random_ids(2, 8, 3).cpu(), weight=weight.detach().cpu(),
                bias=bias.detach().cpu(), pos_embed=pos.detach().cpu(), patch_size=4)
    with pytest.raises(error, match=match):
        embed_visible_patches(**bad(args), backend="triton")


def test_custom_ops_pass_opcheck():
    imgs, weight, bias, pos = make_inputs(2, 3, 8, 8, 4, 16, torch.float32)
    ids = random_ids(2, 4, 2)
    ops = torch.ops.sslpt
    torch.library.opcheck(ops.embed_visible_patches_triton.default, (imgs, ids, weight, bias, pos, 4))
    torch.library.opcheck(ops.embed_visible_patches_triton.default, (imgs, ids, weight, None, pos, 4))
    torch.library.opcheck(ops.embed_visible_patches_triton_patches.default, (imgs.detach(), ids, 4))
    dout = torch.randn(2, 2, 16, device=DEVICE)
    torch.library.opcheck(ops.embed_visible_patches_triton_pos_grad.default, (dout, ids, 4))


def test_torch_compile_fullgraph_of_the_triton_path():
    """embed -> scatter (mask token) -> gather under torch.compile(fullgraph=True), inductor included.

    The Triton implementations are called directly: the public functions' CPU index check reads
    the indices on the host, which fullgraph compilation rejects.
    """
    patch, num_patches = 4, 16

    def step(imgs, ids, weight, bias, pos, mask_token, impl):
        embed, scatter, gather = impl
        tokens = embed(imgs, ids, weight, bias, pos, patch)
        full = scatter(tokens, ids, num_patches, mask_token)
        return full.square().mean() + gather(full * 3, ids).mean()

    imgs, weight, bias, pos = make_inputs(2, 3, 16, 16, patch, 32, torch.float32)
    mask_token = torch.randn(32, device=DEVICE, requires_grad=True)
    ids = random_ids(2, num_patches, 5)
    leaves = (imgs, weight, bias, pos, mask_token)
    triton_impl = (embed_visible_patches_triton, scatter_tokens_triton, gather_tokens_triton)
    reference_impl = (embed_visible_patches_ref, scatter_tokens_ref, gather_tokens_ref)
    compiled = torch.compile(step, fullgraph=True)
    try:
        loss = compiled(imgs, ids, weight, bias, pos, mask_token, triton_impl)
    except Exception as exc:  # noqa: BLE001 - inductor needs a working C++ toolchain on CPU
        if DEVICE == "cpu" and any(word in str(exc) for word in ("compiler", "CppCompileError", "g++", "gcc")):
            pytest.skip(f"torch.compile cannot build CPU code here: {str(exc)[:200]}")
        raise
    grads = torch.autograd.grad(loss, leaves)
    expected = step(imgs, ids, weight, bias, pos, mask_token, reference_impl)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-4)


def test_autocast_projects_in_the_autocast_dtype():
    imgs, weight, bias, pos = make_inputs(2, 3, 8, 8, 4, 16, torch.float32)
    ids = random_ids(2, 4, 3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = embed_visible_patches(imgs, ids, weight, bias, pos, 4, backend="triton")
        expected = embed_visible_patches(imgs, ids, weight, bias, pos, 4, backend="reference")
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close_to(out, expected.float(), torch.bfloat16)
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and imgs.grad.dtype == torch.float32
