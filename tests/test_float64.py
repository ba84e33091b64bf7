"""float64: every public op accepts it, and its reference computes in float64 (never downcast), so
torch.autograd.gradcheck holds through the public functions with backend="reference". Small shapes."""
import pytest
import torch
from torch.autograd import gradcheck

from sslpt.kernels import (attention, embed_visible_patches, gather_tokens, hard_patch_masking, info_nce,
                           nt_xent, patch_loss, relative_loss, scatter_tokens, sparse_attention)

F64 = torch.float64


def _rand(*shape, grad=True):
    return torch.randn(*shape, dtype=F64).requires_grad_(grad)


def _ids(batch, num_patches, keep):
    return torch.stack([torch.randperm(num_patches)[:keep] for _ in range(batch)])


def test_gather_tokens():
    x, ids = _rand(2, 5, 3), _ids(2, 5, 3)
    assert gather_tokens(x, ids, backend="reference").dtype == F64
    assert gradcheck(lambda x: gather_tokens(x, ids, backend="reference"), (x,))


def test_scatter_tokens_with_fill_gradient():
    x_vis, fill, ids = _rand(2, 3, 4), _rand(4), _ids(2, 6, 3)
    assert scatter_tokens(x_vis, ids, 6, fill, backend="reference").dtype == F64
    assert gradcheck(lambda x, f: scatter_tokens(x, ids, 6, f, backend="reference"), (x_vis, fill))


@pytest.mark.parametrize("with_bias", [True, False])
def test_embed_visible_patches(with_bias):
    imgs, ids = _rand(2, 2, 4, 4), _ids(2, 4, 3)  # p = 2: 4 patches of 8 values
    weight, pos = _rand(3, 2, 2, 2), _rand(1, 4, 3)
    bias = _rand(3) if with_bias else None

    def run(imgs, weight, pos, *bias):
        return embed_visible_patches(imgs, ids, weight, bias[0] if bias else None, pos, 2, backend="reference")

    inputs = (imgs, weight, pos) + ((bias,) if with_bias else ())
    assert run(*inputs).dtype == F64
    assert gradcheck(run, inputs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_loss(norm_pix):
    pred, target = _rand(2, 3, 4), torch.randn(2, 3, 4, dtype=F64)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    loss, per_patch = patch_loss(pred, target, mask, norm_pix=norm_pix, backend="reference")
    assert loss.dtype == per_patch.dtype == F64
    assert gradcheck(lambda p: patch_loss(p, target, mask, norm_pix=norm_pix, backend="reference"), (pred,))


def test_patch_loss_float64_target_is_not_downcast():
    # an fp32 prediction against a float64 target: the difference is taken in float64
    target = torch.full((1, 1, 2), 1.0, dtype=F64) + torch.tensor([0.0, 1e-12], dtype=F64)
    pred = torch.ones(1, 1, 2)
    loss, _ = patch_loss(pred, target, torch.ones(1, 1, dtype=torch.bool), norm_pix=False, backend="reference")
    assert loss.dtype == F64 and loss.item() > 0


@pytest.mark.parametrize("stable", [True, False])
def test_relative_loss(stable):
    scores, true_loss = _rand(2, 4), torch.rand(2, 4, dtype=F64)
    assert relative_loss(scores, true_loss, stable=stable, backend="reference").dtype == F64
    assert gradcheck(lambda s: relative_loss(s, true_loss, stable=stable, backend="reference"), (scores,))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce(normalize, symmetric):
    q, k, tau = _rand(4, 3), _rand(4, 3), torch.tensor(0.5, dtype=F64, requires_grad=True)

    def run(q, k, tau):
        return info_nce(q, k, tau, normalize=normalize, symmetric=symmetric, backend="reference")

    assert run(q, k, tau).dtype == F64
    assert gradcheck(run, (q, k, tau))
    assert info_nce(q, k, 0.5, normalize=normalize, symmetric=symmetric, backend="reference").dtype == F64


def test_nt_xent():
    z1, z2, tau = _rand(3, 4), _rand(3, 4), torch.tensor(0.5, dtype=F64, requires_grad=True)
    assert nt_xent(z1, z2, tau, backend="reference").dtype == F64
    assert gradcheck(lambda a, b, t: nt_xent(a, b, t, backend="reference"), (z1, z2, tau))


def _qkv(*shape):
    return tuple(_rand(*shape) for _ in range(3))


@pytest.mark.parametrize("op", ["sparse_attention", "attention"])
@pytest.mark.parametrize("mode", ["dense", "order", "strict_order", "packed"])
def test_attention(op, mode):
    fn = sparse_attention if op == "sparse_attention" else attention
    kwargs = {"backend": "reference"}
    if mode == "packed":
        q, k, v = _qkv(7, 2, 4)
        kwargs.update(cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=torch.int32), max_seqlen=4)
    else:
        q, k, v = _qkv(2, 2, 4, 4)
        if mode != "dense":
            kwargs.update(order=torch.tensor([[0, 2, 1, 3], [3, 1, 1, 0]]), strict=mode == "strict_order")
    assert fn(q, k, v, **kwargs).dtype == F64
    assert gradcheck(lambda q, k, v: fn(q, k, v, **kwargs), (q, k, v))


def test_hard_patch_masking_compares_float64_scores_in_float64():
    scores = torch.ones(1, 4, dtype=F64)
    scores[0, 2] += 1e-12  # the same score in fp32
    masking = hard_patch_masking(scores, 0.25, 1, backend="reference")
    assert bool(masking.mask[0, 2])


def test_auto_serves_float64_on_cpu():
    x, ids = torch.randn(2, 5, 3, dtype=F64), _ids(2, 5, 3)
    torch.testing.assert_close(gather_tokens(x, ids, backend="auto"), gather_tokens(x, ids, backend="reference"))
    q, k = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert info_nce(q, k, 0.1).dtype == F64
