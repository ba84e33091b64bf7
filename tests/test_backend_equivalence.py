"""One MAE / HPM training step gives the same loss and gradients with the Triton ops
(under the interpreter on CPU) as with the references."""
import pytest
import torch

from sslpt import kernels
from sslpt.engine.config import load_config
from sslpt.engine.objectives import StepContext, build_objective

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "train.epochs=2"]


def step(objective, imgs, backend):
    objective.zero_grad(set_to_none=True)
    with kernels.use_backend(backend):
        ctx = StepContext(epoch=1, step=1, steps_per_epoch=1, epochs=2, generator=torch.Generator().manual_seed(7))
        loss, metrics = objective(imgs, ctx)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.trainable.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


OPS_COUNTED = ("embed_visible_patches", "scatter_tokens", "patch_loss", "relative_loss")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of each op's Triton implementation, to prove the step really used them."""
    from sslpt.kernels._backend import OPS

    calls = {}
    for op in OPS_COUNTED:
        impl = OPS[op].impls["triton"]

        def counted(*args, _fn=impl.fn, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(impl, "fn", counted)
    return calls


@pytest.mark.parametrize("name, norm_pix", [("hpm", False), ("hpm", True), ("mae", True)])
def test_triton_step_matches_reference(name, norm_pix, triton_calls):
    torch.manual_seed(0)
    hard = ["objective.hpm.alpha_T=1.0"] if name == "hpm" else []
    cfg = load_config(f"{name}_digits", TINY + hard + [f"objective.{name}.norm_pix={str(norm_pix).lower()}"])
    objective = build_objective(cfg)
    imgs = torch.randn(6, 1, 8, 8)
    ref_loss, ref_metrics, ref_grads = step(objective, imgs, "reference")
    assert not triton_calls
    tri_loss, tri_metrics, tri_grads = step(objective, imgs, "triton")
    used = {"embed_visible_patches", "scatter_tokens", "patch_loss"} | ({"relative_loss"} if name == "hpm" else set())
    assert set(triton_calls) == used
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in ref_metrics:
        torch.testing.assert_close(tri_metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) > 10
    for key in ref_grads:
        torch.testing.assert_close(tri_grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)
