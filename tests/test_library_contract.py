"""The drop-in library's contract beyond each op's math: the reference namespace, type hints and docstrings,
torch.compile with a learnable temperature, distinct ids_keep, a finite attention scale, infinite scores in
relative_loss, and cross-rank gathers without deprecated collectives."""
import math
import os
import sys
import typing
import warnings

import pytest
import torch
import torch.distributed as dist

import sslpt.kernels as K
from sslpt.kernels import (attention, embed_visible_patches, gather_tokens, info_nce, nt_xent, relative_loss,
                           scatter_tokens, sparse_attention)
from testkit import free_port

OPS = ("gather_tokens", "scatter_tokens", "embed_visible_patches", "hard_patch_masking", "patch_loss",
       "relative_loss", "info_nce", "nt_xent", "sparse_attention", "attention")


# ---- the references --------------------------------------------------------------------------------------

def test_every_reference_is_exported():
    from sslpt.kernels.reference import info_nce_ref  # the documented spelling

    assert "reference" in K.__all__ and K.reference.info_nce_ref is info_nce_ref
    # the op modules (sys.modules: sslpt.kernels.info_nce the attribute is the function, not the module)
    modules = [m for name, m in sys.modules.items() if name.startswith("sslpt.kernels.")]
    refs = {name for m in modules for name in vars(m) if name.endswith("_ref") and callable(getattr(m, name))}
    assert {"info_nce_ref", "sparse_attention_ref"} <= refs <= set(K.reference.__all__)
    for name in K.reference.__all__:
        assert callable(getattr(K.reference, name))


# ---- type hints and docstrings ---------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [info_nce, nt_xent])
def test_contrastive_type_hints(fn):
    hints = typing.get_type_hints(fn)
    assert set(typing.get_args(hints["temperature"])) == {float, torch.Tensor}
    assert set(typing.get_args(hints["group"])) == {dist.ProcessGroup, type(None)}


@pytest.mark.parametrize("name", OPS)
def test_public_functions_are_annotated_and_documented(name):
    fn = getattr(K, name)
    hints = typing.get_type_hints(fn)
    params = [p for p in fn.__code__.co_varnames[:fn.__code__.co_argcount + fn.__code__.co_kwonlyargcount]]
    assert set(params) <= set(hints), f"{name}: parameters without a type hint: {set(params) - set(hints)}"
    doc = fn.__doc__ or ""
    for word in ("Backends", "Dtypes", "float64", "Limits"):
        assert word in doc, f"{name}'s docstring does not mention {word}"


def test_info_nce_docstring_gives_the_triton_width_limit():
    from sslpt.kernels.info_nce import MAX_TRITON_DIM

    assert f"d <= {MAX_TRITON_DIM}" in info_nce.__doc__ and f"d <= {MAX_TRITON_DIM}" in nt_xent.__doc__


# ---- torch.compile with a learnable temperature ----------------------------------------------------------

@pytest.mark.parametrize("op", ["info_nce", "nt_xent"])
def test_learnable_temperature_compiles_fullgraph(op):
    torch._dynamo.reset()
    a, b = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    temperature = torch.nn.Parameter(torch.tensor(0.2))

    def loss_fn(a, b, t):
        if op == "info_nce":
            return info_nce(a, b, t, symmetric=True, backend="reference")
        return nt_xent(a, b, t, backend="reference")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(a, b, temperature)
    got_grads = torch.autograd.grad(got, (a, b, temperature))
    want = loss_fn(a, b, temperature)
    want_grads = torch.autograd.grad(want, (a, b, temperature))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_bad_tensor_temperature_still_rejected_eagerly():
    q = torch.randn(4, 3)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            info_nce(q, q, torch.tensor(bad), backend="reference")


# ---- distinct ids_keep -----------------------------------------------------------------------------------

DUP_IDS = torch.tensor([[0, 2, 2], [1, 3, 0]])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_repeated_ids_keep_are_rejected(backend):
    x = torch.randn(2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="ids_keep must hold distinct indices"):
        gather_tokens(x, DUP_IDS, backend=backend)
    with pytest.raises(ValueError, match="ids_keep must hold distinct indices"):
        scatter_tokens(torch.randn(2, 3, 8), DUP_IDS, 4, torch.zeros(8), backend=backend)
    imgs, weight, bias, pos = torch.randn(2, 1, 4, 4), torch.randn(8, 1, 2, 2), torch.zeros(8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="ids_keep must hold distinct indices"):
        embed_visible_patches(imgs, DUP_IDS, weight, bias, pos, 2, backend=backend)
    # distinct rows (the same index in different rows is fine) still run
    gather_tokens(x, torch.tensor([[0, 2, 3], [0, 2, 3]]), backend=backend)


def test_repeated_ids_keep_under_compile_is_a_device_assert():
    torch._dynamo.reset()
    x = torch.randn(2, 4, 8)
    compiled = torch.compile(lambda x, ids: gather_tokens(x, ids, backend="reference"), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x, torch.tensor([[0, 2, 3], [1, 3, 0]])),
                               gather_tokens(x, torch.tensor([[0, 2, 3], [1, 3, 0]]), backend="reference"))
    with pytest.raises(RuntimeError, match="distinct"):
        compiled(x, DUP_IDS)


# ---- attention scale -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fn", [sparse_attention, attention])
def test_non_finite_attention_scale_is_rejected(fn, bad):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="scale"):
        fn(q, q, q, scale=bad, backend="reference")


# ---- relative_loss with infinite scores ------------------------------------------------------------------

@pytest.mark.parametrize("stable", [True, False])
def test_relative_loss_infinite_score_agrees_across_backends(stable):
    true_loss = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    results = {}
    for backend in ("reference", "triton"):
        scores = torch.tensor([[0.2, -0.1, math.inf, 0.4]], requires_grad=True)
        loss = relative_loss(scores, true_loss, stable=stable, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), scores.grad)
    ref, tri = results["reference"], results["triton"]
    # one infinitely mis-ordered pair: an infinite BCE term (stable), a saturated log(1e-6) one (official)
    assert (torch.isinf(ref[0]) and ref[0] > 0) if stable else torch.isfinite(ref[0])
    torch.testing.assert_close(tri[0], ref[0])
    torch.testing.assert_close(tri[1], ref[1], equal_nan=True)


# ---- cross-rank gather: functional collectives, no deprecation warning -----------------------------------

@pytest.fixture
def one_rank_group():
    port = free_port()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("op", ["info_nce", "nt_xent"])
def test_group_gather_uses_no_deprecated_collective(one_rank_group, op):
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    fn = (lambda g: info_nce(a, b, 0.2, symmetric=True, group=g, backend="reference")) if op == "info_nce" else \
        (lambda g: nt_xent(a, b, 0.2, group=g, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        loss = fn(one_rank_group)
        grads = torch.autograd.grad(loss, (a, b))
    want = fn(None)
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, torch.autograd.grad(want, (a, b))):
        torch.testing.assert_close(g, w)
