"""patch_loss: MAE's definition by hand, the Triton kernel against the reference, gradients, errors."""
import importlib
from pathlib import Path

import pytest
import torch

from sslpt import kernels
from sslpt.kernels import patch_loss, patchify
from sslpt.kernels.patch_loss import _patch_loss_op, patch_loss_ref

from conftest import TOLERANCES

patch_loss_module = importlib.import_module("sslpt.kernels.patch_loss")   # kernels.patch_loss is the function

BACKENDS = ["reference", "triton"]


def _inputs(batch, num_patches, dim, dtype, mask_fraction=0.75):
    pred = torch.randn(batch, num_patches, dim).to(dtype)
    target = torch.randn(batch, num_patches, dim) * 2 + 0.5
    mask = torch.rand(batch, num_patches) < mask_fraction
    return pred, target, mask


def _check_against_reference(pred, target, mask, norm_pix=True, eps=1e-6):
    """Forward and backward (random grads for loss and per_patch) of Triton vs the fp32 reference."""
    atol, rtol = TOLERANCES[pred.dtype]
    pred = pred.detach().requires_grad_()
    loss, per_patch = patch_loss(pred, target, mask, norm_pix, eps, backend="triton")
    assert loss.dtype == per_patch.dtype == torch.float32
    grad_loss, grad_per_patch = torch.randn(()), torch.randn_like(per_patch)
    torch.autograd.backward((loss, per_patch), (grad_loss, grad_per_patch))

    ref_pred = pred.detach().float().requires_grad_()
    ref_loss, ref_per_patch = patch_loss_ref(ref_pred, target, mask, norm_pix, eps)
    torch.autograd.backward((ref_loss, ref_per_patch), (grad_loss, grad_per_patch))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_patch, ref_per_patch, atol=1e-5, rtol=1e-5)
    assert pred.grad.dtype == pred.dtype
    # the gradient is rounded once to pred's dtype (the CUDA path: diff stored in it, then rescaled: twice)
    torch.testing.assert_close(pred.grad.float(), ref_pred.grad, atol=2 * atol * ref_pred.grad.abs().max(),
                               rtol=2 * rtol)


# ---- MAE's definition, by hand ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_patch_by_hand(backend):
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    pred = torch.zeros_like(target)
    mask = torch.ones(1, 1, dtype=torch.bool)
    # mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, eps inside the sqrt
    eps = 0.1
    loss, per_patch = patch_loss(pred, target, mask, norm_pix=True, eps=eps, backend=backend)
    assert per_patch.item() == pytest.approx(5.0 / (4 * (5.0 / 3 + eps)), rel=1e-6)
    assert loss.item() == pytest.approx(per_patch.item(), rel=1e-6)
    # an exact prediction of the normalised target costs nothing
    t_hat = (target - 2.5) / (5.0 / 3 + eps) ** 0.5
    assert patch_loss(t_hat, target, mask, eps=eps, backend=backend)[0].item() == pytest.approx(0.0, abs=1e-6)
    # raw pixels: mean of squares
    loss, _ = patch_loss(pred, target, mask, norm_pix=False, backend=backend)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_order_is_patchify(backend):
    # image value = 100*c + 10*row + col; patch 1 (top right) in (row, col, channel) order is
    # [2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213]
    c, r, q = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    target = patchify((100 * c + 10 * r + q).float().unsqueeze(0), 2)
    by_hand = torch.tensor([2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213], dtype=torch.float32)
    pred = torch.zeros_like(target)
    pred[0, 1] = (by_hand - by_hand.mean()) / by_hand.var(unbiased=True).sqrt()
    _, per_patch = patch_loss(pred, target, torch.ones(1, 4), eps=0.0, backend=backend)
    assert per_patch[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # a zero prediction of a normalised patch costs sum(t_hat^2) / P = (P - 1) / P
    for i in (0, 2, 3):
        assert per_patch[0, i].item() == pytest.approx(11 / 12, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_and_float_masks_agree(backend):
    pred, target, mask = _inputs(2, 9, 12, torch.float32)
    loss_bool, pp_bool = patch_loss(pred, target, mask, backend=backend)
    loss_float, pp_float = patch_loss(pred, target, mask.float(), backend=backend)
    assert torch.equal(pp_bool, pp_float)
    torch.testing.assert_close(loss_bool, loss_float)
    assert loss_bool.item() == pytest.approx(pp_bool[mask].mean().item(), rel=1e-6)


def test_fractional_float_mask_weights_patches():
    pred, target, _ = _inputs(2, 9, 12, torch.float32)
    weight = torch.rand(2, 9)
    weight[0, 0] = 0.0
    _check_against_reference(pred, target, weight.half())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask_gives_zero_loss_and_gradient(backend):
    pred, target, mask = _inputs(2, 9, 12, torch.float32)
    pred.requires_grad_()
    loss, per_patch = patch_loss(pred, target, torch.zeros_like(mask), backend=backend)
    assert loss.item() == 0.0
    assert (per_patch > 0).all()
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


# ---- Triton against the reference -----------------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# every dtype on the narrow patches, fp32 and bf16 (the interpreter's upcast path) on the wide ones
@pytest.mark.parametrize("dim, dtype", [pytest.param(d, t, id=f"P{d}-{str(t)[6:]}")
                                        for d, dtypes in ((192, _DTYPES), (3, _DTYPES),
                                                          (768, _DTYPES[::2]), (1000, _DTYPES[::2]))
                                        for t in dtypes])
def test_triton_matches_reference(dim, dtype):
    _check_against_reference(*_inputs(1, 197, dim, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_raw_pixels(dtype):
    _check_against_reference(*_inputs(2, 33, 48, dtype), norm_pix=False)


def test_triton_low_precision_target_and_float_mask():
    pred, target, mask = _inputs(2, 33, 48, torch.float16)
    _check_against_reference(pred, target.bfloat16(), mask.float())


def test_triton_strided_inputs():
    # HPM/MAE slice predictions out of a wider decoder output; target may come transposed
    out = torch.randn(2, 40, 50)
    pred = out[:, 3:, 1:49]
    target = torch.randn(2, 48, 37).transpose(1, 2)
    mask = (torch.rand(37, 2) < 0.5).t()
    assert not (pred.is_contiguous() or target.is_contiguous() or mask.is_contiguous())
    _check_against_reference(pred, target, mask)


def test_triton_wide_patches_use_chunks(monkeypatch):
    # patches too wide for one register tile are read in chunks (three passes)
    monkeypatch.setattr(patch_loss_module, "_MAX_SINGLE_BLOCK", 128)
    monkeypatch.setattr(patch_loss_module, "_CHUNK", 64)
    assert patch_loss_module._layout(300)[2] == 5
    pred, target, mask = _inputs(2, 5, 300, torch.bfloat16)
    _check_against_reference(pred, target * 10 + 3, mask)
    _check_against_reference(pred, target, mask, norm_pix=False)


@pytest.mark.parametrize("through", ["loss", "per_patch"])
def test_triton_gradient_through_one_output(through):
    pred, target, mask = _inputs(2, 11, 20, torch.float32)
    grads = []
    for backend in BACKENDS:
        x = pred.clone().requires_grad_()
        loss, per_patch = patch_loss(x, target, mask, backend=backend)
        (loss * 3.0 if through == "loss" else (per_patch * torch.arange(11.0)).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_triton_outputs_are_all_written(poison_allocations):
    pred, target, mask = _inputs(3, 13, 40, torch.float16)
    _check_against_reference(pred, target, mask)


def test_triton_without_grad_and_deterministic():
    pred, target, mask = _inputs(2, 50, 64, torch.float32)
    with torch.no_grad():
        first = patch_loss(pred.requires_grad_(), target, mask, backend="triton")
    runs = []
    for _ in range(2):
        x = pred.detach().requires_grad_()
        loss, per_patch = patch_loss(x, target, mask, backend="triton")
        loss.backward()
        runs.append((loss, per_patch, x.grad))
    assert torch.equal(first[0], runs[0][0]) and torch.equal(first[1], runs[0][1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_custom_op_registration():
    pred, target, mask = _inputs(2, 3, 8, torch.float32)
    torch.library.opcheck(_patch_loss_op, (pred.requires_grad_(), target, mask, True, 1e-6, 0))
    imgs = torch.randn(2, 2, 2, 6)
    torch.library.opcheck(_patch_loss_op, (pred, imgs, mask, True, 1e-6, 2))
    torch.library.opcheck(patch_loss_module._patch_loss_bwd_op,
                          (pred.detach(), imgs, mask, torch.tensor(1.5), torch.tensor(2.0), None, True, 1e-6, 2))


# ---- targets read straight from the images ------------------------------------------------------

def _image_inputs(batch, channels, height, width, patch, dtype, image_dtype=torch.float32):
    num_patches, patch_dim = (height // patch) * (width // patch), channels * patch * patch
    pred = torch.randn(batch, num_patches, patch_dim).to(dtype)
    imgs = (torch.randn(batch, channels, height, width) * 2 + 0.5).to(image_dtype)
    return pred, imgs, torch.rand(batch, num_patches) < 0.75


def _check_image_target(pred, imgs, mask, patch, norm_pix=True):
    """Triton reading the images against the reference on patchify(imgs), forward and backward."""
    atol, rtol = TOLERANCES[pred.dtype]
    grads, outs = [], []
    grad_loss, grad_per_patch = torch.randn(()), torch.randn(mask.shape)
    for target, kw, backend in ((imgs, {"patch_size": patch}, "triton"), (patchify(imgs, patch), {}, "reference"),
                                (imgs, {"patch_size": patch}, "reference")):
        x = (pred.detach() if backend == "triton" else pred.detach().float()).requires_grad_()
        loss, per_patch = patch_loss(x, target, mask, norm_pix, **kw, backend=backend)
        torch.autograd.backward((loss, per_patch), (grad_loss, grad_per_patch))
        outs.append((loss, per_patch))
        grads.append(x.grad)
    for loss, per_patch in outs[1:]:
        torch.testing.assert_close(outs[0][0], loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0][1], per_patch, atol=1e-5, rtol=1e-5)
    assert grads[0].dtype == pred.dtype and grads[0].shape == pred.shape
    torch.testing.assert_close(grads[0].float(), grads[1], atol=2 * atol * grads[1].abs().max(), rtol=2 * rtol)
    assert torch.equal(grads[1], grads[2])


# (B, C, H, W, p): MAE's layout, a non-square grid of odd size, one channel, p = 3 (P = 27, not a power of 2)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 4), (1, 3, 12, 20, 4), (3, 1, 9, 6, 3), (2, 3, 9, 9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_targets_from_images(shape, dtype, poison_allocations):
    batch, channels, height, width, patch = shape
    _check_image_target(*_image_inputs(batch, channels, height, width, patch, dtype), patch)


def test_triton_targets_from_strided_low_precision_images():
    pred, imgs, mask = _image_inputs(2, 3, 8, 12, 4, torch.float32, torch.float16)
    imgs = imgs.to(memory_format=torch.channels_last)
    _check_image_target(pred, imgs, mask, 4)
    crop = torch.randn(2, 3, 12, 16)[:, :, 2:10, 2:14]        # a crop: no dense layout at all
    _check_image_target(pred, crop, mask, 4, norm_pix=False)


def test_triton_targets_from_images_in_chunks(monkeypatch):
    monkeypatch.setattr(patch_loss_module, "_MAX_SINGLE_BLOCK", 32)
    monkeypatch.setattr(patch_loss_module, "_CHUNK", 16)
    assert patch_loss_module._layout(75)[2] == 5
    _check_image_target(*_image_inputs(2, 3, 10, 15, 5, torch.float32), 5)


def test_triton_keeps_nothing_but_its_inputs_for_the_backward():
    """No [B, L, P] buffer lives between forward and backward: only pred, target, mask and the count."""
    pred, imgs, mask = _image_inputs(2, 3, 8, 8, 4, torch.float16)
    pred.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = patch_loss(pred, imgs, mask, patch_size=4, backend="triton")
    assert sum(t.numel() for t in saved) == pred.numel() + imgs.numel() + mask.numel() + 1
    loss.backward()


def test_image_target_errors():
    pred, imgs, mask = _image_inputs(2, 3, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="patchify to"):
        patch_loss(pred, imgs[:, :2], mask, patch_size=4, backend="triton")
    with pytest.raises(ValueError, match="must divide"):
        patch_loss(pred, imgs[..., :7], mask, patch_size=4, backend="triton")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        patch_loss(pred, imgs[0], mask, patch_size=4, backend="triton")
    with pytest.raises(ValueError, match="patch_size"):
        patch_loss(pred, imgs, mask, patch_size=0, backend="triton")


def test_auto_backend_on_cpu_is_the_reference():
    pred, target, mask = _inputs(1, 4, 8, torch.float32)
    with kernels.use_backend("auto"):
        loss, _ = patch_loss(pred, target, mask)
    assert torch.equal(loss, patch_loss_ref(pred, target, mask, True, 1e-6)[0])


# ---- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    pred, target, mask = _inputs(2, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="target"):
        patch_loss(pred, target[:, :3], mask, backend=backend)
    with pytest.raises(ValueError, match="mask"):
        patch_loss(pred, target, mask[:, :3], backend=backend)
    with pytest.raises(ValueError, match="pred"):
        patch_loss(pred[0], target[0], mask, backend=backend)
    with pytest.raises(TypeError, match="pred"):
        patch_loss(pred.long(), target, mask, backend=backend)
    with pytest.raises(TypeError, match="target"):
        patch_loss(pred, target.long(), mask, backend=backend)
    with pytest.raises(TypeError, match="mask"):
        patch_loss(pred, target, mask.long(), backend=backend)
    with pytest.raises(ValueError, match="P=1"):
        patch_loss(pred[..., :1], target[..., :1], mask, norm_pix=True, backend=backend)
    patch_loss(pred[..., :1], target[..., :1], mask, norm_pix=False, backend=backend)  # fine without norm_pix
    with pytest.raises(ValueError, match="eps"):
        patch_loss(pred, target, mask, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="target"):
        patch_loss(pred, target.to("meta"), mask, backend=backend)


# ---- benchmark smoke test ------------------------------------------------------------------------

def test_bench_loss_runs_on_cpu(monkeypatch):
    # benchmarks/ is a package at the repository root, not part of the installed distribution
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench_loss = pytest.importorskip("benchmarks.bench_loss", reason="benchmarks/bench_loss.py is not importable")
    # eager "compile" and one repetition: this checks the wiring, not the speed
    rows = bench_loss.run("cpu", tiny=True, warmup=0, rep=1, compile_backend="eager")
    assert {(r.case, r.provider) for r in rows} >= set(bench_loss.expected_rows(tiny=True))
    assert all(r.ms > 0 for r in rows)   # nothing skipped: Triton runs under the interpreter here
