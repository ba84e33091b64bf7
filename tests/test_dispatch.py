"""The one dispatch rule of every public op (kernels/_backend.py), attention included.

Each implementation states what it supports (``supports(device, *args)``: None or a reason). ``auto`` takes the
first one that can serve the call and records why it skipped the others; a backend the caller names raises that
reason as BackendUnavailable; the process-wide default is used strictly where the op has it, else auto. CUDA is
faked by passing the device apart from the (CPU) tensors: ``choose(op, backend, device, *impl_args)``.
"""
from typing import NamedTuple

import pytest
import torch

from sslpt import kernels
from sslpt.kernels import BackendUnavailable, _backend, _cuda
from sslpt.kernels._backend import OPS, choose, use_backend
from sslpt.kernels.info_nce import MAX_TRITON_DIM
from sslpt.kernels.sparse_attention import MAX_TRITON_HEAD_DIM

ATTN_KW = dict(cu_seqlens=None, max_seqlen=None, order=None, strict=False, scale=None)


class Case(NamedTuple):
    args: tuple               # what the implementations get
    kwargs: dict
    call: callable            # call(backend): the public function on the same inputs
    first: str                # the implementation auto prefers on (faked) CUDA tensors
    fallback: str             # auto's choice when ``first`` cannot serve (a built CUDA extension before the reference)


def _cases():
    x, ids = torch.randn(2, 5, 8), torch.tensor([[0, 2], [4, 1]])
    x_vis, fill = torch.randn(2, 2, 8), torch.randn(8)
    imgs, pids = torch.randn(2, 1, 4, 4), torch.tensor([[0, 3], [2, 1]])
    weight, bias, pos = torch.randn(8, 1, 2, 2), torch.randn(8), torch.randn(1, 4, 8)
    pred, target, mask = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]]).bool()
    score, true = torch.randn(2, 4), torch.rand(2, 4)
    scores = torch.randn(2, 16)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    qa = torch.randn(1, 2, 4, 16)
    ps, pt, pw = torch.randn(8, 8), torch.randn(4, 8), torch.randn(5, 8)
    f1, f2 = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    return {
        "dense_match": Case((f1, f2), {}, lambda b: kernels.dense_match(f1, f2, backend=b), "triton", "reference"),
        "prototype_cross_entropy": Case((ps, pt, pw, pw, None, 0.1, 0.04, 2, "cross"), {},
                                        lambda b: kernels.prototype_cross_entropy(ps, pt, pw, pw, backend=b),
                                        "triton", "reference"),
        "gather_tokens": Case((x, ids), {}, lambda b: kernels.gather_tokens(x, ids, backend=b), "triton",
                              "cuda"),
        "scatter_tokens": Case((x_vis, ids, 5, fill), {},
                               lambda b: kernels.scatter_tokens(x_vis, ids, 5, fill, backend=b), "triton", "cuda"),
        "embed_visible_patches": Case((imgs, pids, weight, bias, pos, 2), {},
                                      lambda b: kernels.embed_visible_patches(imgs, pids, weight, bias, pos, 2,
                                                                              backend=b), "triton", "reference"),
        "patch_loss": Case((pred, target, mask, True, 1e-6), {},
                           lambda b: kernels.patch_loss(pred, target, mask, backend=b), "triton", "cuda"),
        "relative_loss": Case((score, true, True), {}, lambda b: kernels.relative_loss(score, true, backend=b),
                              "triton", "cuda"),
        "hard_patch_masking": Case((scores, 3), {}, lambda b: kernels.hard_patch_masking(scores, 0.75, 3, backend=b),
                                   "cuda", "reference"),
        "info_nce": Case((q, k, 0.1, True, False, None), {}, lambda b: kernels.info_nce(q, k, 0.1, backend=b),
                         "triton", "cuda"),
        "nt_xent": Case((q, k, 0.1, None), {}, lambda b: kernels.nt_xent(q, k, 0.1, backend=b), "triton",
                        "reference"),
        "sparse_attention": Case((qa, qa, qa), ATTN_KW, lambda b: kernels.sparse_attention(qa, qa, qa, backend=b),
                                 "triton", "reference"),
        "attention": Case((qa, qa, qa), ATTN_KW, lambda b: kernels.attention(qa, qa, qa, backend=b), "triton",
                          "sdpa"),
    }


CASES = _cases()
PUBLIC_OPS = sorted(CASES)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make auto's CUDA path decidable on CPU tensors: an extension that looks built and preferred for the op
    that has no Triton kernel, and attention's unmeasured (table) choice, as while a CUDA graph captures."""
    monkeypatch.setattr(_cuda, "_module", object())
    monkeypatch.setitem(_backend.CUDA_PREFERRED, "hard_patch_masking", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    attention_module = __import__("sslpt.kernels.attention", fromlist=["_auto_cache"])
    monkeypatch.setattr(attention_module, "_auto_cache", {})


def _float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def test_every_public_op_is_registered_with_a_reference():
    assert set(OPS) == set(PUBLIC_OPS)
    for name, op in OPS.items():
        assert "reference" in op.impls and set(op.impls) <= set(kernels.BACKENDS), name
    assert set(OPS["attention"].impls) == set(kernels.ATTENTION_BACKENDS) - {"auto"}


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_auto_on_cpu_tensors(op):
    case = CASES[op]
    choice = choose(op, "auto", "cpu", *case.args, **case.kwargs)
    assert choice.name == ("sdpa" if op == "attention" else "reference")


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_auto_falls_back_with_the_reason_and_the_named_backend_raises_it(op, fake_cuda, monkeypatch):
    case = CASES[op]
    assert choose(op, "auto", "cuda", *case.args, **case.kwargs).name == case.first  # it can serve: chosen
    reason = f"refused for {op}'s test"
    monkeypatch.setattr(OPS[op].impls[case.first], "supports", lambda device, *a, **k: reason)
    choice = choose(op, "auto", "cuda", *case.args, **case.kwargs)
    assert choice.name == case.fallback and choice.skipped[case.first] == reason
    assert choice.fn is OPS[op].impls[case.fallback].fn
    with pytest.raises(BackendUnavailable) as err:
        case.call(case.first)
    assert str(err.value).startswith(f"{op}: backend={case.first!r} cannot serve this call: {reason}; use backend=")
    assert str(err.value).endswith("'auto'") and "'reference'" in str(err.value)
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize("op, dim", [("info_nce", MAX_TRITON_DIM + 1), ("nt_xent", MAX_TRITON_DIM + 1),
                                     ("sparse_attention", MAX_TRITON_HEAD_DIM + 16),
                                     ("attention", MAX_TRITON_HEAD_DIM + 16)])
def test_real_triton_limits(op, dim, fake_cuda):
    if op in ("info_nce", "nt_xent"):
        a = torch.randn(2, dim)
        args, kwargs = ((a, a, 0.1, True, False, None) if op == "info_nce" else (a, a, 0.1, None)), {}
        call = getattr(kernels, op)
        public = lambda b: call(a, a, 0.1, backend=b)  # noqa: E731
        why = f"d={dim} > {MAX_TRITON_DIM} (the Triton kernel's limit)"
    else:
        a = torch.randn(1, 1, 3, dim)
        args, kwargs = (a, a, a), ATTN_KW
        public = lambda b: getattr(kernels, op)(a, a, a, backend=b)  # noqa: E731
        why = f"head dim {dim} > {MAX_TRITON_HEAD_DIM} (the Triton kernel's limit)"
    choice = choose(op, "auto", "cuda", *args, **kwargs)
    assert choice.name == CASES[op].fallback and choice.skipped["triton"] == why
    with pytest.raises(BackendUnavailable) as err:
        public("triton")
    hint = "'sdpa', 'flex', 'reference' or 'auto'" if op == "attention" else "'reference' or 'auto'"
    assert str(err.value) == f"{op}: backend='triton' cannot serve this call: {why}; use backend={hint}"
    public("auto")  # the CPU tensors' auto serves it


@pytest.mark.parametrize("op", [op for op in PUBLIC_OPS if "triton" in OPS[op].impls])
def test_triton_refuses_float64_naming_the_reference(op, fake_cuda):
    case = CASES[op]
    args = _float64(case.args)
    with pytest.raises(BackendUnavailable, match=r"float64 inputs: the Triton kernel .*backend='reference'"):
        choose(op, "triton", "cpu", *args, **case.kwargs)
    choice = choose(op, "auto", "cuda", *args, **case.kwargs)   # the CUDA extension computes in fp32 at most too
    assert choice.name == ("sdpa" if op == "attention" else "reference") and "float64" in choice.skipped["triton"]


@pytest.mark.parametrize("op", [op for op in PUBLIC_OPS if "cuda" in OPS[op].impls])
def test_cuda_refuses_float64_and_cpu_tensors(op, fake_cuda):
    case = CASES[op]
    with pytest.raises(BackendUnavailable, match=r"float64 inputs: the CUDA kernel .*backend='reference'"):
        choose(op, "cuda", "cuda", *_float64(case.args), **case.kwargs)
    with pytest.raises(BackendUnavailable, match=rf"{op}: backend='cuda' cannot serve this call: the CUDA extension "
                                                 r"needs CUDA tensors, got 'cpu'"):
        case.call("cuda")


def test_float64_through_the_public_function():
    x, ids = torch.randn(2, 5, 8, dtype=torch.float64), torch.tensor([[0, 2], [4, 1]])
    try:
        kernels.gather_tokens(x, ids, backend="reference")
    except TypeError:
        pytest.skip("the public validation does not take float64 yet")
    with pytest.raises(BackendUnavailable, match="gather_tokens: backend='triton' .*float64.*backend='reference'"):
        kernels.gather_tokens(x, ids, backend="triton")
    torch.testing.assert_close(kernels.gather_tokens(x, ids), x[torch.arange(2)[:, None], ids])  # auto: reference


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_names_an_op_lacks_and_unknown_names(op):
    case = CASES[op]
    missing = next(n for n in ("cuda", "sdpa") if n not in OPS[op].impls)
    with pytest.raises(BackendUnavailable, match=rf"{op}: backend='{missing}' cannot serve this call: {op} has no "
                                                 rf"'{missing}' implementation"):
        case.call(missing)
    with pytest.raises(ValueError, match="backend must be one of"):
        case.call("fa3")


def test_set_backend_checks_the_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("fa3")
    assert {"auto", "reference", "triton", "cuda", "sdpa", "flex", "xformers"} == set(kernels.BACKENDS)


def test_process_default_applies_to_attention(monkeypatch):
    case = CASES["attention"]
    calls = []
    reference = OPS["attention"].impls["reference"]
    monkeypatch.setattr(reference, "fn", lambda *a, _fn=reference.fn, **k: calls.append(1) or _fn(*a, **k))
    with use_backend("reference"):
        case.call(None)
    assert calls == [1]
    case.call(None)  # the default "auto": sdpa on CPU
    assert calls == [1]
    big = torch.randn(1, 1, 3, MAX_TRITON_HEAD_DIM + 16)
    with use_backend("triton"):  # an attention backend: used strictly, as if named
        assert choose("attention", None, "cpu", *case.args, **case.kwargs).name == "triton"
        with pytest.raises(BackendUnavailable, match="attention: backend='triton' cannot serve this call: head dim"):
            kernels.attention(big, big, big)
        kernels.attention(big, big, big, backend="auto")  # a name given to the call wins over the default
    for default in ("cuda", "sdpa"):
        with use_backend(default):
            want = "sdpa"  # "cuda" is no attention backend: auto (sdpa on CPU); "sdpa" is one
            assert choose("attention", None, "cpu", *case.args, **case.kwargs).name == want


def test_process_default_that_an_op_lacks_means_auto():
    with use_backend("sdpa"):
        for op in PUBLIC_OPS:
            if op != "attention":
                case = CASES[op]
                assert choose(op, None, "cpu", *case.args, **case.kwargs).name == "reference", op
    with use_backend("cuda"):
        nt = CASES["nt_xent"]
        assert choose("nt_xent", None, "cpu", *nt.args).name == "reference"  # no cuda kernel: auto
        with pytest.raises(BackendUnavailable, match="gather_tokens: backend='cuda' cannot serve this call"):
            CASES["gather_tokens"].call(None)  # it has one: strict


def test_choose_never_builds_the_extension_for_auto(monkeypatch):
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "_failure", None)
    monkeypatch.setattr(_cuda, "_import_installed", lambda: None)
    monkeypatch.setattr(_cuda, "jit_build", lambda *a, **k: pytest.fail("auto compiled the extension"))
    monkeypatch.setitem(_backend.CUDA_PREFERRED, "gather_tokens", True)
    case = CASES["gather_tokens"]
    choice = choose("gather_tokens", "auto", "cuda", *case.args)
    assert choice.name == "triton" and "not built" in choice.skipped["cuda"]
