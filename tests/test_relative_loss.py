"""relative_loss: brute force over pairs, both forms, saturation, gradients, Triton vs the reference."""
import math

import pytest
import torch

from sslpt.kernels import relative_loss
from sslpt.kernels.relative_loss import _relative_loss_op, relative_loss_ref

from conftest import TOLERANCES

BACKENDS = ["reference", "triton"]
EPS = 1e-6


def _brute_force(p, t, stable):
    """The definition, one ordered pair at a time, in Python floats (double precision)."""
    total, count = 0.0, 0
    for pb, tb in zip(p.tolist(), t.tolist()):
        for j in range(len(pb)):
            for k in range(len(pb)):
                if tb[k] == tb[j]:
                    continue
                z, positive = pb[k] - pb[j], tb[k] > tb[j]
                if stable:
                    x = -z if positive else z
                    total += max(x, 0.0) + math.log1p(math.exp(-abs(x)))
                else:
                    s = 1 / (1 + math.exp(-z))
                    total -= math.log(s + EPS) if positive else math.log(1 - s + EPS)
                count += 1
    return total / max(count, 1)


def _loss64(p, t, stable):
    """The reference's math in float64 (the reference itself computes in fp32)."""
    z = p.unsqueeze(1) - p.unsqueeze(2)
    pos = (t.unsqueeze(1) > t.unsqueeze(2)).double()
    neg = (t.unsqueeze(1) < t.unsqueeze(2)).double()
    if stable:
        terms = pos * torch.nn.functional.softplus(-z) + neg * torch.nn.functional.softplus(z)
    else:
        s = torch.sigmoid(z)
        terms = -pos * torch.log(s + EPS) - neg * torch.log(1 - s + EPS)
    return terms.sum() / (pos + neg).sum().clamp_min(1.0)


def _scores(batch, size_m, dtype=torch.float32, scale=2.0):
    return (torch.randn(batch, size_m) * scale).to(dtype)


def _tied_losses(batch, size_m, levels=4):
    return torch.randint(0, levels, (batch, size_m)).float() / levels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force(backend, stable, ties):
    p = _scores(2, 7)
    t = _tied_losses(2, 7) if ties else torch.rand(2, 7)
    got = relative_loss(p, t, stable=stable, backend=backend)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_brute_force(p, t, stable), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stable", [True, False])
def test_all_tied_gives_zero(backend, stable):
    p = _scores(3, 5).requires_grad_()
    loss = relative_loss(p, torch.full((3, 5), 0.25), stable=stable, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forms_agree_for_moderate_logits(backend):
    # |z| <= 4: the official 1e-6 shifts each term by at most 1e-6 / sigmoid(-4) ~ 6e-5
    p = torch.rand(2, 20) * 2 - 1
    t = torch.rand(2, 20)
    stable = relative_loss(p, t, stable=True, backend=backend)
    official = relative_loss(p, t, stable=False, backend=backend)
    assert official.item() == pytest.approx(stable.item(), abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_form_saturates_when_badly_misordered(backend):
    # t_1 > t_0 but the scores put patch 1 far below patch 0: z = p_1 - p_0 = -30
    p = torch.tensor([[15.0, -15.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]])
    stable = relative_loss(p, t, stable=True, backend=backend)
    stable_grad, = torch.autograd.grad(stable, p)
    official = relative_loss(p, t, stable=False, backend=backend)
    official_grad, = torch.autograd.grad(official, p)
    # stable: softplus(30) ~ 30 and the pair still pulls with d/dp_1 = sigmoid(z) - 1 ~ -1
    assert stable.item() == pytest.approx(30.0, rel=1e-6)
    torch.testing.assert_close(stable_grad, torch.tensor([[1.0, -1.0]]))
    # official: capped at -log(1e-6) = 13.8 and its gradient is dead (~sigmoid(-30) / 1e-6)
    assert official.item() == pytest.approx(-math.log(EPS), rel=1e-3)
    assert official_grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("stable", [True, False])
def test_gradient_vs_autograd_and_finite_differences(stable):
    p = _scores(2, 7, scale=3.0)
    t = _tied_losses(2, 7)
    p64 = p.double().requires_grad_()
    torch.autograd.gradcheck(lambda x: _loss64(x, t.double(), stable), (p64,))
    # central differences of the float64 definition
    fd = torch.zeros_like(p64)
    h = 1e-6
    for i in range(p.numel()):
        step = torch.zeros_like(p64).view(-1)
        step[i] = h
        step = step.view_as(p64)
        fd.view(-1)[i] = (_loss64(p64 + step, t, stable) - _loss64(p64 - step, t, stable)) / (2 * h)
    for backend in BACKENDS:
        x = p.clone().requires_grad_()
        (relative_loss(x, t, stable=stable, backend=backend) * 1.5).backward()
        torch.testing.assert_close(x.grad.double(), 1.5 * fd, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("size_m, dtype", [(1, torch.float32), (2, torch.float16), (147, torch.float32),
                                           (147, torch.bfloat16), (200, torch.float16), (200, torch.bfloat16)])
def test_triton_matches_reference(size_m, dtype, stable):
    atol, rtol = TOLERANCES[dtype]
    p = _scores(1, size_m, dtype).requires_grad_()
    t = torch.rand(1, size_m).to(dtype)
    t[0, : size_m // 3] = 0.5   # some ties
    loss = relative_loss(p, t, stable=stable, backend="triton")
    (loss * 0.7).backward()
    ref_p = p.detach().float().requires_grad_()
    ref = relative_loss_ref(ref_p, t, stable)
    (ref * 0.7).backward()
    # the inputs are the same low-precision values, so only fp32 summation order differs
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert p.grad.dtype == dtype
    torch.testing.assert_close(p.grad.float(), ref_p.grad, atol=atol * ref_p.grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("stable", [True, False])
def test_triton_several_images_strided(stable):
    # as HPM calls it: scores gathered from a wider tensor, true losses transposed
    scores = _scores(3, 90)[:, 10:80:2]
    true_loss = _tied_losses(35, 3, levels=10).t()
    assert not scores.is_contiguous() and not true_loss.is_contiguous()
    grads = []
    for backend in BACKENDS:
        x = scores.detach().requires_grad_()
        loss = relative_loss(x, true_loss, stable=stable, backend=backend)
        loss.backward()
        grads.append((loss, x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-7, rtol=1e-5)


def test_triton_outputs_are_all_written(monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -(2 ** 30))

    monkeypatch.setattr(torch, "empty", poisoned)
    p = _scores(2, 37).requires_grad_()
    t = torch.rand(2, 37)
    loss = relative_loss(p, t, backend="triton")
    loss.backward()
    ref_p = p.detach().requires_grad_()
    relative_loss_ref(ref_p, t, True).backward()
    torch.testing.assert_close(loss, relative_loss_ref(p.detach(), t, True))
    torch.testing.assert_close(p.grad, ref_p.grad)


def test_triton_without_grad_and_deterministic():
    p, t = _scores(4, 50), _tied_losses(4, 50)
    with torch.no_grad():
        first = relative_loss(p.requires_grad_(), t, backend="triton")
    runs = []
    for _ in range(2):
        x = p.detach().requires_grad_()
        loss = relative_loss(x, t, stable=False, backend="triton")
        loss.backward()
        runs.append((loss, x.grad))
    assert torch.equal(first, relative_loss(p.detach(), t, backend="triton"))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_custom_op_registration():
    p, t = _scores(2, 5).requires_grad_(), torch.rand(2, 5)
    torch.library.opcheck(_relative_loss_op, (p, t, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    p, t = _scores(2, 5), torch.rand(2, 5)
    with pytest.raises(ValueError, match="true_loss"):
        relative_loss(p, t[:, :4], backend=backend)
    with pytest.raises(ValueError, match="pred_score"):
        relative_loss(p[0], t[0], backend=backend)
    with pytest.raises(TypeError, match="pred_score"):
        relative_loss(p.long(), t, backend=backend)
    with pytest.raises(TypeError, match="true_loss"):
        relative_loss(p, t.long(), backend=backend)
