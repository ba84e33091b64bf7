"""nt_xent: SimCLR's definition by hand, the Triton kernels (one fused backward pass) against a float64
reference with a learnable temperature, low precision, unwritten outputs, bad inputs, the custom ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt.kernels.info_nce import lse_forward
from sslpt.kernels.nt_xent import nt_xent, nt_xent_lse, nt_xent_lse_rows, nt_xent_ref


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the kernels allocate with NaN, so an output element left unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _run(fn, z1, z2, temperature, **kw):
    z1, z2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    t = temperature.detach().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = fn(z1, z2, t, **kw)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad, (t.grad if isinstance(t, torch.Tensor) else None)


def _check(z1, z2, temperature, *, rtol):
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    want = _run(nt_xent_ref, z1.double(), z2.double(), t64)
    got = _run(nt_xent, z1, z2, temperature, backend="triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == z1.dtype
    torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
    for g, w in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(g.double(), w, atol=rtol * w.abs().max().item() + 1e-12, rtol=0)
    if isinstance(temperature, torch.Tensor):
        torch.testing.assert_close(got[3].double(), want[3], atol=rtol * max(1.0, want[3].abs().item()), rtol=0)


def test_reference_is_simclr_by_hand():
    """Each of the 2N views: -log(exp(s_pos) / sum over the 2N - 1 other views)."""
    z1, z2, tau = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    total = 0.0
    for i in range(6):
        others = [j for j in range(6) if j != i]
        pos = (i + 3) % 6
        denominator = sum(math.exp(float(z[i] @ z[j]) / tau) for j in others)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denominator)
    assert abs(float(nt_xent_ref(z1, z2, tau)) - total / 6) < 1e-12


@pytest.mark.parametrize("n,d,tau", [(1, 16, 0.1), (37, 100, 0.05), (50, 64, 0.5), (20, 16, 1.0)])
def test_fp32_matches_float64_reference(n, d, tau):
    _check(torch.randn(n, d), torch.randn(n, d), torch.tensor(tau), rtol=2e-5)


def test_float_temperature_and_correlated_views():
    z1 = torch.randn(30, 64)
    _check(z1, z1 + 0.5 * torch.randn(30, 64), 0.1, rtol=2e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision(dtype, rtol):
    z1 = torch.randn(37, 64)
    _check(z1.to(dtype), (z1 + torch.randn(37, 64)).to(dtype), torch.tensor(0.2), rtol=rtol)


def test_strided_inputs():
    base = torch.randn(24, 96)
    z1, z2 = base[:, ::3], base[:, 1::3]
    assert not z1.is_contiguous()
    _check(z1, z2, torch.tensor(0.3), rtol=2e-5)


def test_unwritten_outputs_would_show(poisoned):
    z = F.normalize(torch.randn(74, 100), dim=-1)
    scale = torch.tensor(10.0)
    lse, pos = nt_xent_lse(z, scale)
    assert torch.isfinite(lse).all() and torch.isfinite(pos).all()
    z = z.double()   # the truth in float64, compared at fp32's tolerance
    s = (z @ z.T * 10).masked_fill(torch.eye(74, dtype=torch.bool), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, 1).float())
    torch.testing.assert_close(pos, s[torch.arange(74), (torch.arange(74) + 37) % 74].float())


def test_rows_op_with_offsets_matches_the_one_process_op():
    """The distributed op on one rank's rows (here: the second half of a fake 2-rank gather) against the fused one."""
    z_all = F.normalize(torch.randn(2 * 2 * 9, 32), dim=-1)  # 2 ranks x 2 views x 9 samples
    local = z_all[18:].clone()  # rank 1's [z1; z2]
    lse, pos = nt_xent_lse_rows(local, z_all, torch.tensor(4.0), 18)
    s = local.double() @ z_all.double().T * 4
    rows = torch.arange(18)
    s[rows, rows + 18] = float("-inf")
    torch.testing.assert_close(lse, torch.logsumexp(s, 1).float())
    torch.testing.assert_close(pos, s[rows, 18 + (rows + 9) % 18].float())
    # the forward launcher excludes exactly the self column, even at a column-tile border
    lse2, _ = lse_forward(local, z_all, torch.tensor(4.0), self_offset=18)
    torch.testing.assert_close(lse2, lse)


def test_custom_op_registration():
    z = torch.randn(24, 16, requires_grad=True)
    keys = torch.randn(48, 16, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(nt_xent_lse, (z, scale), test_utils=utils)
    torch.library.opcheck(nt_xent_lse_rows, (z, keys, scale, 24), test_utils=utils)


def test_auto_backend_uses_reference_on_cpu():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), nt_xent_ref(z1, z2, 0.1))


def test_bad_inputs():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="z2 must have shape"):
        nt_xent(z1, torch.randn(7, 16), 0.1)
    with pytest.raises(TypeError, match="z2 must have the dtype"):
        nt_xent(z1, z2.bfloat16(), 0.1)
    with pytest.raises(ValueError, match="z1 must have 2 dimensions"):
        nt_xent(z1[0], z2[0], 0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(z1, z2, 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(z1, z2, torch.tensor(-0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 500])   # 500: the widest rows the GPU kernels serve, not a power of two
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_against_reference(d, dtype, rtol):
    z1 = torch.randn(1000, d, device="cuda")
    z2 = z1 + torch.randn(1000, d, device="cuda")
    _check(z1.to(dtype), z2.to(dtype), torch.tensor(0.1, device="cuda"), rtol=rtol)
