"""sparse_attention: the Triton kernels (forward and backward) against the fp32 explicit-softmax reference.

Dense, packed (cu_seqlens) and order-masked attention; lengths 1..197 with one- and multi-tile paths; order
ties, strict vs non-strict, the rank-minimum token; head dims 32/64/80/128; fp16/bf16 by flash-attention's rule;
strided inputs; unwritten outputs; bad inputs; the custom-op registration; the benchmark. On CPU the kernels run
under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from sslpt.kernels import BackendUnavailable
from sslpt.kernels.sparse_attention import (MAX_TRITON_HEAD_DIM, _sparse_attention_fwd_op, sparse_attention,
                                      sparse_attention_ref, triton_block_sizes)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the launchers allocate with NaN, so an element a kernel leaves unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _blocks(blocks):
    return triton_block_sizes(*blocks) if blocks else contextlib.nullcontext()


def _qkv(shape, dtype=torch.float32, device=DEVICE):
    return [torch.randn(shape, device=device).to(dtype) for _ in range(3)]


def _run(fn, q, k, v, grad, **kw):
    """Output and (dq, dk, dv) of ``fn`` for the upstream gradient ``grad``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _triton(q, k, v, **kw):
    return sparse_attention(q, k, v, backend="triton", **kw)


def _check_fp32(q, k, v, blocks=None, **kw):
    grad = torch.randn_like(q)
    with _blocks(blocks):
        got = _run(_triton, q, k, v, grad, **kw)
    want = _run(sparse_attention_ref, q, k, v, grad, **kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    return got


def _check_low_precision(q, k, v, dtype, blocks=None, **kw):
    """flash-attention's rule: |kernel - fp32 truth| <= 2 |reference in dtype - fp32 truth| + atol."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad = torch.randn_like(q)
    with _blocks(blocks):
        got = _run(_triton, q, k, v, grad, **kw)
    truth = _run(sparse_attention_ref, q.float(), k.float(), v.float(), grad.float(), **kw)
    low = _run(lambda *a, **w: sparse_attention_ref(*a, upcast=False, **w), q, k, v, grad, **kw)
    atol = 2e-3 if dtype == torch.float16 else 1e-2
    for name, g, t, lo in zip(("out", "dq", "dk", "dv"), got, truth, low):
        assert g.dtype == dtype, name
        err, budget = (g.float() - t).abs().max().item(), 2 * (lo.float() - t).abs().max().item() + atol
        assert err <= budget, f"{name}: error {err:.3e} > 2 x reference error + atol = {budget:.3e}"


# ---- dense ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 49, 50, 197])
def test_dense_lengths(n):
    _check_fp32(*_qkv((2, 2, n, 64) if n < 100 else (1, 1, n, 64)))


@pytest.mark.parametrize("blocks", [(16, 16), (16, 64), (32, 16)])
def test_dense_multi_tile(blocks):
    """Several query and key tiles (separate dQ kernel), or one key tile over several query tiles (fused dQ)."""
    _check_fp32(*_qkv((1, 2, 50, 64)), blocks=blocks, scale=0.3)


@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_head_dims(head_dim):
    """80 pads to a 128-wide block with masked columns."""
    _check_fp32(*_qkv((1, 2, 21, head_dim)), blocks=(16, 16) if head_dim == 80 else None)


def test_matches_sdpa():
    q, k, v = _qkv((2, 3, 50, 32))
    torch.testing.assert_close(_triton(q, k, v), F.scaled_dot_product_attention(q, k, v), **FP32_TOL)
    torch.testing.assert_close(_triton(q, k, v, scale=0.5), F.scaled_dot_product_attention(q, k, v, scale=0.5),
                               **FP32_TOL)


def test_strided_inputs():
    """q, k, v as views of a fused qkv projection [B, N, 3, H, Dh], and a non-contiguous upstream gradient."""
    qkv = torch.randn(2, 50, 3, 2, 32, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    grad = torch.randn(2, 50, 2, 32, device=DEVICE).transpose(1, 2)
    got = _run(_triton, q, k, v, grad)
    want = _run(sparse_attention_ref, q, k, v, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32_TOL)


def test_backward_deterministic():
    q, k, v = _qkv((1, 1, 40, 32))
    grad = torch.randn_like(q)
    with triton_block_sizes(16, 16):
        first, second = _run(_triton, q, k, v, grad), _run(_triton, q, k, v, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- packed -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [None, (16, 16)])
def test_packed_uneven_lengths(blocks):
    lengths = [1, 7, 50, 0, 23]  # a single token, an empty sample, uneven rest
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv((sum(lengths), 2, 32))
    _check_fp32(q, k, v, blocks=blocks, cu_seqlens=cu, max_seqlen=max(lengths))


def test_packed_is_block_diagonal():
    """Changing one sample's tokens leaves the other samples' outputs bit-identical; max_seqlen may be omitted."""
    cu = torch.tensor([0, 5, 12, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv((30, 2, 32))
    base = _triton(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[5:12] += 1.0
    v2[5:12] -= 2.0
    moved = _triton(q, k2, v2, cu_seqlens=cu, max_seqlen=18)
    assert torch.equal(base[:5], moved[:5]) and torch.equal(base[12:], moved[12:])
    assert not torch.equal(base[5:12], moved[5:12])


def test_packed_equals_dense_per_sample():
    q, k, v = _qkv((2, 2, 9, 32))
    dense = _triton(q, k, v)
    packed = _triton(*(t.transpose(1, 2).reshape(18, 2, 32) for t in (q, k, v)),
                     cu_seqlens=torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE), max_seqlen=9)
    torch.testing.assert_close(packed.reshape(2, 9, 2, 32).transpose(1, 2), dense, **FP32_TOL)


# ---- order ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("blocks", [None, (16, 16)])
def test_order_with_ties(strict, blocks):
    q, k, v = _qkv((1, 2, 50, 32))
    order = torch.randint(0, 6, (1, 50), device=DEVICE)  # many ties
    order[:, 0] = -1  # a cls token ranked first
    _check_fp32(q, k, v, blocks=blocks, order=order, strict=strict)


@pytest.mark.parametrize("strict", [False, True])
def test_order_skips_tiles(strict):
    """Sorted float ranks make whole key tiles invisible to early query tiles (the skip path)."""
    q, k, v = _qkv((1, 1, 50, 32))
    order = torch.cat([torch.full((1, 1), -1.0), torch.rand(1, 49).sort(dim=1).values], 1).to(DEVICE)
    _check_fp32(q, k, v, blocks=(16, 16), order=order, strict=strict)


def test_order_semantics():
    """Ascending ranks are causal attention; equal ranks (non-strict) are full attention."""
    q, k, v = _qkv((1, 2, 33, 32))
    ranks = torch.arange(33, device=DEVICE).expand(1, 33)
    with triton_block_sizes(16, 16):
        causal = _triton(q, k, v, order=ranks)
        full = _triton(q, k, v, order=torch.zeros(1, 33, dtype=torch.int16, device=DEVICE))
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), **FP32_TOL)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v), **FP32_TOL)


def test_strict_minimum_token_outputs_zero():
    """Under strict, a token with the lowest rank sees nothing: output 0, zero gradients, no NaN anywhere."""
    q, k, v = _qkv((1, 2, 20, 32))
    order = torch.arange(20, dtype=torch.float32, device=DEVICE).expand(1, 20).clone()
    order[0, 3] = order[0, 0] = -5.0  # two tokens share the minimum rank
    out, dq, dk, dv = _check_fp32(q, k, v, order=order, strict=True)
    assert (out[0, :, [0, 3]] == 0).all() and (dq[0, :, [0, 3]] == 0).all()
    # the minimum tokens are still seen by every other query, so their keys do receive gradients
    assert (dk[0, :, [0, 3]] != 0).any()


@pytest.mark.parametrize("blocks", [(16, 32), (16, 16)])
def test_strict_query_tile_that_sees_nothing(blocks, poisoned):
    """A whole query tile of minimum-rank tokens skips every key tile: its outputs and dQ are still written."""
    q, k, v = _qkv((1, 1, 20, 32))
    order = torch.cat([torch.zeros(1, 16), torch.arange(1.0, 5.0)[None]], 1).to(DEVICE)
    out, dq, _, _ = _check_fp32(q, k, v, blocks=blocks, order=order, strict=True)
    assert (out[0, :, :16] == 0).all() and (dq[0, :, :16] == 0).all()


@pytest.mark.parametrize("order_dtype", [torch.int64, torch.bfloat16, torch.float64])
def test_order_dtypes(order_dtype):
    q, k, v = _qkv((1, 2, 20, 32))
    order = torch.randint(0, 8, (1, 20), device=DEVICE).to(order_dtype)
    torch.testing.assert_close(_triton(q, k, v, order=order), sparse_attention_ref(q, k, v, order=order),
                               **FP32_TOL)


# ---- low precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["dense", "order", "packed"])
def test_low_precision(dtype, mode):
    if mode == "packed":
        q, k, v = _qkv((40, 2, 64))
        kw = dict(cu_seqlens=torch.tensor([0, 1, 30, 40], dtype=torch.int32, device=DEVICE), max_seqlen=29)
    else:
        q, k, v = _qkv((1, 2, 50, 64))
        kw = dict(order=torch.randint(0, 10, (1, 50), device=DEVICE)) if mode == "order" else {}
    _check_low_precision(q, k, v, dtype, blocks=(16, 32) if mode == "order" else None, **kw)


# ---- plumbing ---------------------------------------------------------------------------------------------

def test_unwritten_outputs_would_show(poisoned):
    cu = torch.tensor([0, 3, 20, 21], dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv((21, 1, 80))
    order = torch.randint(0, 5, (1, 20), device=DEVICE)
    qd, kd, vd = _qkv((1, 1, 20, 80))
    for blocks in ((16, 16), (16, 32)):
        with triton_block_sizes(*blocks):
            packed = _run(_triton, q, k, v, torch.randn_like(q), cu_seqlens=cu, max_seqlen=17)
            ordered = _run(_triton, qd, kd, vd, torch.randn_like(qd), order=order, strict=True)
        for t in packed + ordered:
            assert torch.isfinite(t).all()


def test_empty_inputs():
    q, k, v = _qkv((0, 2, 5, 32))
    assert _triton(q, k, v).shape == (0, 2, 5, 32)
    q, k, v = _qkv((0, 2, 32))
    out = _triton(q, k, v, cu_seqlens=torch.zeros(2, dtype=torch.int32, device=DEVICE), max_seqlen=1)
    assert out.shape == (0, 2, 32)


def test_custom_op_registration():
    """Schema, fake kernel and autograd formula as torch.compile sees them; aot_eager traces the op."""
    q, k, v = (t.requires_grad_() for t in _qkv((1, 1, 9, 16)))
    order = torch.randint(0, 3, (1, 9), device=DEVICE)
    torch.library.opcheck(_sparse_attention_fwd_op, (q, k, v, None, order, 9, True, 0.25, 16, 16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    compiled = torch.compile(lambda a, b, c: _triton(a, b, c, order=order), backend="aot_eager", fullgraph=True)
    grad = torch.randn_like(q)
    got = _run(compiled, q, k, v, grad)
    want = _run(sparse_attention_ref, q, k, v, grad, order=order)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32_TOL)


def test_auto_backend_uses_reference_on_cpu():
    q, k, v = _qkv((1, 2, 5, 8), device="cpu")
    torch.testing.assert_close(sparse_attention(q, k, v), sparse_attention_ref(q, k, v))


def _bad_cases():
    q = torch.randn(2, 2, 5, 32)
    packed = torch.randn(6, 2, 32)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        ((q, q[:, :, :4], q), {}, ValueError, "k must have the shape of q"),
        ((q, q, q[..., :16]), {}, ValueError, "v must have the shape of q"),
        ((q, q.half(), q), {}, TypeError, "k must have the dtype of q"),
        ((q.long(), q.long(), q.long()), {}, TypeError, "q must have dtype"),
        ((q[0, 0], q[0, 0], q[0, 0]), {}, ValueError, "q must have 3 or 4 dimensions"),
        ((packed, packed, packed), {}, ValueError, "needs cu_seqlens"),
        ((packed,) * 3, dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must have dtype"),
        ((packed,) * 3, dict(cu_seqlens=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "start at 0"),
        ((packed,) * 3, dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "end at T=6"),
        ((packed,) * 3, dict(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        ((packed,) * 3, dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "B\\+1 >= 2"),
        ((packed,) * 3, dict(cu_seqlens=cu, max_seqlen=3), ValueError, "below the longest sample"),
        ((packed,) * 3, dict(cu_seqlens=cu, max_seqlen=0), ValueError, "max_seqlen must be a positive"),
        ((packed,) * 3, dict(cu_seqlens=cu, order=torch.zeros(2, 3)), ValueError, "dense"),
        ((q, q, q), dict(cu_seqlens=cu), ValueError, "for packed"),
        ((q, q, q), dict(order=torch.zeros(2, 4)), ValueError, "order must have shape"),
        ((q, q, q), dict(order=torch.zeros(2, 5, dtype=torch.bool)), TypeError, "order must have dtype"),
        ((q, q, q), dict(order=torch.zeros(10)), ValueError, "order must have 2 dimensions"),
        ((q, q, q), dict(scale="0.1"), TypeError, "scale"),
    ]


@pytest.mark.parametrize("args,kwargs,error,match", _bad_cases())
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparse_attention(*args, **kwargs)


def test_head_dim_too_large_for_triton():
    q = torch.randn(1, 1, 4, MAX_TRITON_HEAD_DIM + 16)
    with pytest.raises(BackendUnavailable, match=r"backend='triton' cannot serve this call: head dim 144 > 128"):
        sparse_attention(q, q, q, backend="triton")
    sparse_attention(q, q, q, backend="reference")  # the reference takes any head dim


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        with triton_block_sizes(24, 16):
            pass


def test_benchmark_smoke():
    from benchmarks.bench_attention import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared CPU
    try:
        rows = run("cpu", tiny=True, warmup=0, rep=1)
    finally:
        torch.set_num_threads(threads)
    providers = {r.provider for r in rows}
    assert {"reference", "sdpa", "triton"} <= providers, providers
    for r in rows:
        if r.provider in ("reference", "sdpa", "triton"):
            assert r.ms > 0, r


# ---- GPU --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 12, 50, 64), (8, 12, 197, 64), (4, 16, 50, 128), (2, 4, 1025, 64),
                                   (16, 8, 197, 80), (64, 16, 197, 32)])
def test_gpu_dense(shape, dtype):
    _check_low_precision(*_qkv(shape), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("strict", [False, True])
def test_gpu_order(strict):
    q, k, v = _qkv((32, 12, 197, 64))
    order = torch.rand(32, 197, device=DEVICE)
    order[:, 0] = -1.0
    _check_low_precision(q, k, v, torch.bfloat16, order=order, strict=strict)
    _check_fp32(q[:4], k[:4], v[:4], order=order[:4], strict=strict)


@pytest.mark.gpu
def test_gpu_packed():
    lengths = torch.randint(30, 61, (256,)).tolist()
    lengths[3] = 1
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv((sum(lengths), 12, 64))
    _check_low_precision(q, k, v, torch.bfloat16, cu_seqlens=cu, max_seqlen=max(lengths))
    _check_fp32(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
