"""kernels.attention: every available backend against the fp32 explicit-softmax reference, and the ViT on top.

Dense, order-masked (ties, strict, a rank-minimum cls token) and packed (a sample of length 1 and one of
length 0) cases, forward and gradients. "triton" runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py);
FlexAttention has no backward on CPU, so there only its forward is compared; xformers is CUDA-only and not
installed here, so its cases skip with the reason. Also: clear errors for unknown / unavailable backends,
auto's choice, and the ViT and config plumbing of ``model.attn_backend``.
"""
import importlib.util
import sys

import pytest
import torch

from sslpt import kernels
from sslpt.kernels import ATTENTION_BACKENDS, BackendUnavailable, attention
from sslpt.kernels.sparse_attention import sparse_attention_ref

attention_module = sys.modules["sslpt.kernels.attention"]  # the package attribute of that name is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=3e-5, rtol=3e-5)
BACKENDS = ("triton", "sdpa", "flex", "xformers", "reference", "auto")


def _dense(shape=(2, 3, 13, 16)):
    return [torch.randn(shape, device=DEVICE) for _ in range(3)], {}


def _order(strict, shape=(2, 3, 13, 16)):
    qkv, _ = _dense(shape)
    order = torch.randint(0, 5, shape[::2], device=DEVICE).float()  # many ties
    order[:, 0] = -1.0  # a cls token seen by every query (with strict: it sees nothing itself)
    return qkv, dict(order=order, strict=strict)


def _packed(lengths=(6, 1, 0, 9), heads=3, head_dim=16):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total = int(cu[-1])
    return [torch.randn(total, heads, head_dim, device=DEVICE) for _ in range(3)], dict(cu_seqlens=cu)


CASES = {
    "dense": lambda: _dense(),
    "dense_n1": lambda: _dense((3, 2, 1, 16)),
    "dense_n50": lambda: _dense((1, 2, 50, 32)),
    "order": lambda: _order(False),
    "order_strict": lambda: _order(True),
    "packed": lambda: _packed(),
    "packed_one_token": lambda: _packed((1,)),
}


def _run(backend, q, k, v, grad, **kw):
    """Output and (dq, dk, dv) for the upstream gradient ``grad`` (forward only when ``grad`` is None)."""
    q, k, v = (t.detach().requires_grad_(grad is not None) for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kw) if backend else sparse_attention_ref(q, k, v, **kw)
    if grad is None:
        return (out.detach(),)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _call_or_skip(backend, *args, **kw):
    try:
        return _run(backend, *args, **kw)
    except BackendUnavailable as why:
        pytest.skip(f"backend {backend!r} unavailable here: {why}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, case):
    (q, k, v), kw = CASES[case]()
    got, = _call_or_skip(backend, q, k, v, None, **kw)
    want, = _run(None, q, k, v, None, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend, case):
    (q, k, v), kw = CASES[case]()
    grad = torch.randn_like(q)
    got = _call_or_skip(backend, q, k, v, grad, **kw)
    want = _run(None, q, k, v, grad, **kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_low_precision_within_twice_the_reference_error(backend, dtype):
    """flash-attention's rule: |backend - fp32 truth| <= 2 |reference in dtype - fp32 truth| + atol."""
    (q, k, v), kw = _order(False, (2, 2, 20, 32))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got, = _run(backend, q, k, v, None, **kw)
    truth = sparse_attention_ref(q.float(), k.float(), v.float(), **kw)
    low = sparse_attention_ref(q, k, v, upcast=False, **kw)
    atol = 2e-3 if dtype == torch.float16 else 1e-2
    assert got.dtype == dtype
    assert (got.float() - truth).abs().max() <= 2 * (low.float() - truth).abs().max() + atol


def test_scale_is_honoured():
    (q, k, v), kw = _order(False)
    want = sparse_attention_ref(q, k, v, scale=0.3, **kw)
    for backend in ("triton", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, backend=backend, scale=0.3, **kw), want, **FP32_TOL)


# ---- errors and availability ---------------------------------------------------------------------------------

def test_unknown_backend_names_the_argument():
    (q, k, v), _ = _dense()
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fa3'"):
        attention(q, k, v, backend="fa3")
    with pytest.raises(BackendUnavailable, match=r"attention: backend='cuda' cannot serve this call: attention has "
                                                 r"no 'cuda' implementation"):
        attention(q, k, v, backend="cuda")  # a backend of other ops: the dispatch rule's error, not a typo


def test_bad_inputs_name_the_argument():
    (q, k, v), _ = _dense()
    with pytest.raises(ValueError, match="order must have shape"):
        attention(q, k, v, backend="sdpa", order=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q[0], k[0], v[0], backend="sdpa")
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        attention(q, k.half(), v, backend="sdpa")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_missing_xformers_is_a_clear_error_not_an_import_error():
    (q, k, v), _ = _dense()
    with pytest.raises(BackendUnavailable, match="needs the xformers package, which is not installed"):
        attention(q, k, v, backend="xformers")


def test_broken_xformers_install_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers...` raise ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    (q, k, v), _ = _dense()
    with pytest.raises(BackendUnavailable, match="xformers is installed but does not import"):
        attention(q, k, v, backend="xformers")


def test_triton_without_triton_says_why(monkeypatch):
    from sslpt.kernels import _backend

    monkeypatch.setattr(_backend, "triton_usable", lambda device: (False, "no Triton for this test"))
    (q, k, v), _ = _dense()
    with pytest.raises(BackendUnavailable, match="backend='triton'.*no Triton for this test"):
        attention(q, k, v, backend="triton")


def test_triton_head_dim_limit_is_a_clear_error():
    q = torch.randn(1, 1, 4, 144, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="head dim 144"):
        attention(q, q, q, backend="triton")
    attention(q, q, q, backend="sdpa")  # SDPA takes it


@pytest.mark.skipif(DEVICE != "cpu", reason="FlexAttention's CPU limitation")
def test_flex_backward_on_cpu_is_a_clear_error():
    (q, k, v), kw = _order(False)
    q.requires_grad_()
    try:
        out = attention(q, k, v, backend="flex", **kw)
    except BackendUnavailable as why:
        assert "backend='flex'" in str(why) and "cpu" in str(why)
    else:  # a newer torch may add the CPU backward: then it must be right
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


# ---- auto ------------------------------------------------------------------------------------------------------

def test_auto_on_cpu_is_sdpa(monkeypatch):
    calls = []
    sdpa = attention_module._OP.impls["sdpa"]
    monkeypatch.setattr(sdpa, "fn", lambda *a, _fn=sdpa.fn, **k: calls.append(1) or _fn(*a, **k))
    (q, k, v), kw = _packed()
    attention(q.cpu(), k.cpu(), v.cpu(), cu_seqlens=kw["cu_seqlens"].cpu())
    assert calls == [1]


def test_auto_picks_the_fastest_and_skips_failures():
    times = {"triton": 2.0, "sdpa": 1.0, "xformers": 1.0}

    def time_one(name):
        if name == "broken":
            raise RuntimeError("cannot run")
        return times[name]
    assert attention_module._pick_fastest(["broken", "triton", "sdpa", "xformers"], time_one) == "sdpa"  # tie: first
    assert attention_module._pick_fastest(["broken"], time_one) is None


def test_auto_measures_once_per_case_and_caches(monkeypatch):
    """The CUDA path of auto, driven on CPU tensors with a fake timer."""
    timed = []

    def fake_time(name, q, k, v, kwargs, needs_grad):
        timed.append(name)
        return {"triton": 3.0, "sdpa": 2.0, "xformers": 1.0}[name]
    monkeypatch.setattr(attention_module, "_time_backend", fake_time)
    monkeypatch.setattr(attention_module, "_auto_cache", {})
    monkeypatch.setattr(attention_module.importlib.util, "find_spec", lambda name: None)  # no xformers
    (q, k, v), _ = _dense()
    kwargs = dict(cu_seqlens=None, max_seqlen=None, order=None, strict=False, scale=None)
    choose = attention_module._measured_choice
    assert choose(q, k, v, kwargs, measurable=False) == "triton"  # the table, nothing measured or cached
    assert timed == [] and attention_module.auto_choices() == {}
    assert choose(q, k, v, kwargs, measurable=True) == "sdpa"
    assert timed == ["triton", "sdpa"]
    assert choose(q, k, v, kwargs, measurable=False) == "sdpa"  # cached: same answer while compiling
    assert choose(q[:, :, :11], k[:, :, :11], v[:, :, :11], kwargs, measurable=True) == "sdpa"  # same bucket
    assert timed == ["triton", "sdpa"] and len(attention_module.auto_choices()) == 1


def test_auto_key_buckets_shapes():
    key = attention_module._auto_key
    q49, q50 = torch.empty(8, 12, 49, 64), torch.empty(8, 12, 50, 64)
    assert key(q49, None, None, None, False, True) == key(q50, None, None, None, False, True)
    assert key(q50, None, None, None, False, True) != key(q50, None, None, None, False, False)
    assert key(q50, None, None, torch.empty(8, 50), True, True)[:2] == ("order", True)
    assert key(torch.empty(400, 12, 64), torch.empty(9), 60, None, False, True)[0] == "packed"


def test_xformers_order_bias_is_aligned_and_right():
    order = torch.tensor([[-1.0, 2.0, 1.0, 2.0, 0.5]])
    bias, empty = attention_module._xformers_order_bias(order, True, heads=3, dtype=torch.float16)
    assert bias.shape == (1, 3, 5, 5) and bias.stride(-2) % 8 == 0
    visible = order[0, None, :] < order[0, :, None]
    visible[0, 0] = True  # the empty row sees itself, then gets zeroed
    assert torch.equal(bias[0, 1] == 0, visible)
    assert empty[0, 0, :, 0].tolist() == [True, False, False, False, False]


# ---- the ViT and its config ------------------------------------------------------------------------------------

def _vit(backend):
    from sslpt.engine.models.vit import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                             attn_backend=backend).to(DEVICE)


def test_vit_forward_and_gradients_agree_across_backends():
    imgs = torch.randn(3, 1, 8, 8, device=DEVICE)
    ids_keep = torch.stack([torch.randperm(16, device=DEVICE)[:5] for _ in range(3)])
    results = {}
    for backend in ("sdpa", "auto", "triton", "reference"):
        model = _vit(backend)
        out = model(imgs, ids_keep)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    if DEVICE == "cpu":  # auto is SDPA there: training on CPU gives the same numbers as before the backends
        assert torch.equal(results["auto"][0], results["sdpa"][0])
    for backend in ("triton", "reference"):
        torch.testing.assert_close(results[backend][0], results["sdpa"][0], **FP32_TOL)
        for name, grad in results["sdpa"][1].items():
            torch.testing.assert_close(results[backend][1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_attention_module_masks_pass_through():
    from sslpt.engine.models.vit import Block

    torch.manual_seed(0)
    block = Block(32, 2, attn_backend="sdpa").to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    order = torch.rand(2, 7, device=DEVICE)
    causal = block(x, order=order)
    assert not torch.allclose(causal, block(x))
    # the token ranked first sees only itself: equal to running it alone
    first = order.argmin(dim=1)
    for b in range(2):
        alone = block(x[b:b + 1, first[b]:first[b] + 1])
        torch.testing.assert_close(causal[b, first[b]], alone[0, 0], **FP32_TOL)
    # packed [T, D] with cu_seqlens == each sample alone
    lengths = (4, 1, 6)
    packed = torch.randn(sum(lengths), 32, device=DEVICE)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32, device=DEVICE)
    got = block(packed, cu_seqlens=cu, max_seqlen=6)
    want = torch.cat([block(p[None])[0] for p in packed.split(lengths)])
    torch.testing.assert_close(got, want, **FP32_TOL)


def test_config_field_reaches_every_attention_layer():
    from sslpt.engine.config import ConfigError, load_config
    from sslpt.engine.models.mae import MaskedAutoencoder
    from sslpt.engine.models.vit import Attention

    tiny = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16",
            "model.decoder_depth=1", "model.decoder_heads=2"]
    cfg = load_config("hpm_digits", tiny)
    assert cfg.model.attn_backend == "auto"
    cfg = load_config("hpm_digits", tiny + ["model.attn_backend=triton"])
    model = MaskedAutoencoder(cfg.model, loss_predictor=True)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 3 and all(m.backend == "triton" for m in layers)
    with pytest.raises(ConfigError, match=r"model.attn_backend must be one of .*got 'fa3'"):
        load_config("hpm_digits", tiny + ["model.attn_backend=fa3"])
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        Attention(32, 2, backend="fa3")
    assert set(ATTENTION_BACKENDS) == set(BACKENDS)
    assert kernels.attention is attention


def test_benchmark_lists_every_backend():
    from benchmarks.bench_attention import run

    rows = run("cpu", tiny=True, warmup=0, rep=1, names=["tiny_order"])
    by_provider = {r.provider: r for r in rows if r.mode == "full"}
    assert {"flex", "xformers", "auto", "sdpa", "triton"} <= set(by_provider)
    assert by_provider["auto"].ms > 0 and by_provider["sdpa"].ms > 0
    if DEVICE == "cpu":  # skipped with a reason (printed by the harness), not missing
        assert by_provider["flex"].ms != by_provider["flex"].ms  # NaN
