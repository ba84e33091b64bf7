"""info_nce: the Triton kernels against a float64 reference (loss, grads of q, k and a learnable temperature),
low precision, awkward shapes, unwritten outputs, bad inputs, the custom-op registration, the benchmark."""
import pytest
import torch
import torch.nn.functional as F

from sslpt.kernels import BackendUnavailable
from sslpt.kernels.info_nce import MAX_TRITON_DIM, info_nce, info_nce_lse, info_nce_ref, lse_backward, lse_forward
from testkit import as_ddp, spawn_ranks


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the kernels allocate with NaN, so an output element left unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _run(fn, q, k, temperature, **kw):
    """Loss and the gradients of q, k and (when a tensor) the temperature."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    t = temperature.detach().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = fn(q, k, t, **kw)
    loss.backward()
    return loss.detach(), q.grad, k.grad, (t.grad if isinstance(t, torch.Tensor) else None)


def _check(q, k, temperature, *, rtol, normalize=True, symmetric=False):
    """Triton on (q, k) in their dtype against the float64 reference on the same values."""
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    want = _run(info_nce_ref, q.double(), k.double(), t64, normalize=normalize, symmetric=symmetric)
    got = _run(info_nce, q, k, temperature, normalize=normalize, symmetric=symmetric, backend="triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == q.dtype and got[2].dtype == k.dtype
    torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
    for g, w in zip(got[1:3], want[1:3]):  # gradients: error relative to their largest entry
        torch.testing.assert_close(g.double(), w, atol=rtol * w.abs().max().item() + 1e-12, rtol=0)
    if isinstance(temperature, torch.Tensor):
        torch.testing.assert_close(got[3].double(), want[3], atol=rtol * max(1.0, want[3].abs().item()), rtol=0)


CASES = [  # N (1 and sizes off the tile), d (power of 2, not, small), temperature, normalize, symmetric
    (1, 16, 0.1, True, False),
    (37, 100, 0.05, True, False),
    (100, 64, 1.0, False, False),
    (37, 16, 0.2, True, True),
    (100, 100, 0.5, False, True),
    (37, 200, 0.1, True, False),    # wider rows (BLOCK_D 256 and 512)
    (20, 300, 0.3, True, True),
]


@pytest.mark.parametrize("n,d,tau,normalize,symmetric", CASES)
def test_fp32_matches_float64_reference(n, d, tau, normalize, symmetric):
    q, k = torch.randn(n, d), torch.randn(n, d)
    if not normalize:  # keep unnormalised logits O(1..10)
        q, k = q / d**0.5, k / d**0.5 * 3
    _check(q, k, torch.tensor(tau), rtol=2e-5, normalize=normalize, symmetric=symmetric)


def test_float_temperature_and_positive_pairs():
    q = torch.randn(37, 64)
    k = q + torch.randn(37, 64)  # correlated positives: a loss below log N
    _check(q, k, 0.07, rtol=2e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("d", [64, 300])
def test_low_precision(dtype, rtol, symmetric, d):
    """Inputs already unit-norm and rounded: the only error is the kernel's (P rounded for the 2nd matmul)."""
    q = F.normalize(torch.randn(37, d), dim=-1).to(dtype)
    k = F.normalize(q.float() + 0.5 * torch.randn(37, d), dim=-1).to(dtype)
    _check(q, k, torch.tensor(0.1), rtol=rtol, normalize=False, symmetric=symmetric)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_normalize_inside(dtype, rtol):
    """normalize=True rounds the unit vectors to the input dtype: the error of one more rounding."""
    _check(torch.randn(37, 100).to(dtype), torch.randn(37, 100).to(dtype), torch.tensor(0.2), rtol=rtol)


def test_bf16_gradient_of_confident_positives():
    """1 - P_ii down to 5e-4: (P - I) must be formed in fp32 before W is rounded to bf16 for the second
    matmul, or the rows of confident positives lose all their digits. Checked row by row."""
    q = F.normalize(torch.randn(32, 64), dim=-1).bfloat16()
    k = F.normalize(q.float() + 0.2 * torch.randn(32, 64), dim=-1).bfloat16()
    want = _run(info_nce_ref, q.double(), k.double(), 0.05, normalize=False)
    got = _run(info_nce, q, k, 0.05, normalize=False, backend="triton")
    for g, w in zip(got[1:3], want[1:3]):
        row_scale = w.abs().amax(dim=1, keepdim=True)
        assert ((g.double() - w).abs() <= 2e-2 * row_scale).all()


def test_strided_inputs():
    base_q, base_k = torch.randn(40, 128), torch.randn(64, 40)
    q, k = base_q[:, ::2], base_k.T  # [40, 64] views, neither contiguous
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, torch.tensor(0.1), rtol=2e-5)


def test_unwritten_outputs_would_show(poisoned):
    q, k = torch.randn(37, 100), torch.randn(37, 100)
    scale = torch.tensor(5.0)
    lse, pos = lse_forward(q, k, scale, positive=(0, 0, 37))
    assert torch.isfinite(lse).all() and torch.isfinite(pos).all()
    s = q @ k.T * 5
    # the truth in float64 (an fp32 matmul sums in another order: its rounding and ours add up past fp32's tolerance)
    s64 = q.double() @ k.double().T * 5
    torch.testing.assert_close(lse, torch.logsumexp(s64, 1).float())
    torch.testing.assert_close(pos, s64.diagonal().float())
    g = torch.full((37,), 1 / 37)
    dq = lse_backward(q, k, scale, (lse, g, -g), None, positive=(0, 0, 37))
    want = ((torch.softmax(s, 1) - torch.eye(37)) @ k) * 5 / 37
    torch.testing.assert_close(dq, want, atol=1e-5, rtol=1e-4)
    row, col, pos = info_nce_lse(q, k, scale, True, 0)
    torch.testing.assert_close(col, torch.logsumexp(s64, 0).float())


def test_custom_op_registration():
    """Schema, fake (meta) kernel and autograd formula as torch.compile sees them."""
    q, k = torch.randn(20, 16, requires_grad=True), torch.randn(20, 16, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(info_nce_lse, (q, k, scale, True, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_auto_backend_uses_reference_on_cpu():
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(info_nce(q, k, 0.1), info_nce_ref(q, k, 0.1))


def test_bad_inputs():
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="k must have shape"):
        info_nce(q, torch.randn(8, 17), 0.1)
    with pytest.raises(ValueError, match="k must have shape"):
        info_nce(q, torch.randn(9, 16), 0.1)
    with pytest.raises(TypeError, match="k must have the dtype"):
        info_nce(q, k.half(), 0.1)
    with pytest.raises(ValueError, match="q must have 2 dimensions"):
        info_nce(q[None], k[None], 0.1)
    with pytest.raises(TypeError, match="q must have dtype"):
        info_nce(q.long(), k.long(), 0.1)
    with pytest.raises(ValueError, match="at least one row"):
        info_nce(q[:0], k[:0], 0.1)
    for bad in (0.0, -0.5, float("nan"), float("inf"), torch.tensor(0.0), torch.tensor(-1.0)):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            info_nce(q, k, bad)
    with pytest.raises(ValueError, match="0-dim"):
        info_nce(q, k, torch.tensor([0.1]))
    with pytest.raises(TypeError, match="temperature"):
        info_nce(q, k, "0.1")
    with pytest.raises(BackendUnavailable, match=f"d={MAX_TRITON_DIM + 1} > {MAX_TRITON_DIM}"):
        big = torch.randn(2, MAX_TRITON_DIM + 1)
        info_nce(big, big, 0.1, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 500])   # 500: the widest rows the GPU kernels serve, not a power of two
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_against_reference(d, dtype, rtol, symmetric):
    q = torch.randn(1000, d, device="cuda").to(dtype)
    k = torch.randn(1000, d, device="cuda").to(dtype)
    _check(q, k, torch.tensor(0.07, device="cuda"), rtol=rtol, symmetric=symmetric)


def test_benchmark_smoke():
    from benchmarks.bench_contrastive import FAMILIES, MATCH_FAMILIES, PROVIDERS, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared CPU
    try:
        rows = run("cpu", tiny=True)
    finally:
        torch.set_num_threads(threads)
    for family in FAMILIES:
        names = {r.provider for r in rows if r.family == family}
        assert names == set(PROVIDERS), (family, names)
    for family in MATCH_FAMILIES:   # forward only, no chunked or CUDA provider
        assert {(r.provider, r.mode) for r in rows if r.family == family} == \
            {("reference", "fwd"), ("compile", "fwd"), ("triton", "fwd")}
    assert all(r.ms > 0 for r in rows if r.provider in ("reference", "chunked", "triton"))


# ---- GPU autotuning configs: sized for sm_90 (checked by compiling them: make aot-check) ----------------------

def test_gpu_configs_fit_shared_memory_and_registers_and_prefer_wgmma():
    import importlib

    m = importlib.import_module("sslpt.kernels.info_nce")
    for elsize in (2, 4):
        for dim in (16, 64, 128, 250, 256, 500, m.MAX_GPU_DIM):
            for kind in ("fwd", "bwd"):
                configs = m._gpu_configs(kind, m._block_d(dim), elsize)
                assert configs, (dim, elsize, kind)
                block_d = m._block_d(dim)
                for c in configs:
                    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                    assert m.shared_bytes(kind, bm, bn, block_d, c.num_stages, elsize) <= m.SHARED_MEMORY_LIMIT
                    assert m._registers_fit(kind, bm, bn, block_d, c.num_warps, elsize)
                rows = {c.kwargs["BLOCK_M"] for c in configs}
                assert min(rows) >= m.WGMMA_MIN_ROWS or max(rows) < m.WGMMA_MIN_ROWS
    # what make aot-check found spilling on sm_90 is never offered: nt_xent's backward at d = 256 bf16 on 4 warps,
    # fp32 backward tiles of 64 x 256, 4-warp forward tiles of 512-wide rows, 64 x 512 B tiles
    assert all(c.num_warps == 8 for c in m._gpu_configs("bwd", 256, 2))
    assert all(c.kwargs["BLOCK_M"] * 256 <= 8192 for c in m._gpu_configs("bwd", 256, 4))
    assert all(c.num_warps == 8 for kind in ("fwd", "bwd") for c in m._gpu_configs(kind, 512, 2))
    assert all(c.kwargs["BLOCK_N"] * 512 <= 16384 for c in m._gpu_configs("bwd", 512, 2))
    # fp32 keeps one B buffer per pipeline stage (measured: 256 KB for 128 x 64 tiles of 256 values on 2 stages)
    assert m.shared_bytes("fwd", 128, 64, 256, 2, 4) == 256 * 1024
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert m.gpu_width_reason(m.MAX_GPU_DIM, dtype) is None
        assert f"d={m.MAX_GPU_DIM + 1} > {m.MAX_GPU_DIM}" in m.gpu_width_reason(m.MAX_GPU_DIM + 1, dtype)


def test_auto_serves_rows_too_wide_for_the_gpu_kernels_elsewhere(monkeypatch):
    from sslpt.kernels import _cuda
    from sslpt.kernels._backend import choose
    from sslpt.kernels.info_nce import MAX_GPU_DIM as widest

    pytest.importorskip("triton")
    wide = torch.empty(8, widest + 1, device="meta", dtype=torch.bfloat16)  # a CUDA call's shapes and dtypes
    narrow = torch.empty(8, widest, device="meta", dtype=torch.bfloat16)
    assert choose("info_nce", "auto", "cuda", narrow, narrow, 0.1, True, False, None).name == "triton"
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "extension", lambda build=True: None)
    choice = choose("info_nce", "auto", "cuda", wide, wide, 0.1, True, False, None)
    assert choice.name == "reference" and "spill registers" in choice.skipped["triton"]
    assert "not built" in choice.skipped["cuda"]
    # with the extension built, its blocked cuBLAS logits serve the wide rows; Triton still comes first
    monkeypatch.setattr(_cuda, "extension", lambda build=True: object())
    assert choose("info_nce", "auto", "cuda", wide, wide, 0.1, True, False, None).name == "cuda"
    assert choose("info_nce", "auto", "cuda", narrow, narrow, 0.1, True, False, None).name == "triton"


# ---- against a queue (MoCo v2 / DenseCL): extra negatives streamed as columns, no gradient to the queue ------

def _run_queue(fn, q, k, queue, temperature, **kw):
    """Loss and the gradients of q, k and the temperature; the queue asks for a gradient and must get none."""
    q, k, queue = q.detach().requires_grad_(), k.detach().requires_grad_(), queue.detach().requires_grad_()
    t = temperature.detach().requires_grad_()
    loss = fn(q, k, t, queue=queue, **kw)
    loss.backward()
    assert queue.grad is None
    return loss.detach(), q.grad, k.grad, t.grad


def _explicit_queue_loss(q, k, queue, tau, in_batch, normalize):
    """The loss written out in float64: -log softmax of the positive among [keys or k_i ; queue]."""
    q, k, queue = (F.normalize(x.double(), dim=-1) if normalize else x.double() for x in (q, k, queue))
    neg = q @ queue.T / tau
    pos = (q * k).sum(-1) / tau
    if in_batch:
        return (torch.logsumexp(torch.cat([q @ k.T / tau, neg], 1), 1) - pos).mean()
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


QUEUE_CASES = [  # N, Q, d, in_batch_negatives, normalize (1 row, 1 queue entry, sizes off the tile)
    (1, 1, 16, False, True),
    (37, 50, 24, False, True),
    (37, 70, 100, True, True),
    (20, 33, 64, False, False),
    (5, 100, 16, True, False),
]


@pytest.mark.parametrize("n,size,d,in_batch,normalize", QUEUE_CASES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_queue_matches_float64_reference(n, size, d, in_batch, normalize, dtype, rtol):
    g = torch.Generator().manual_seed(n + size)
    q, k, queue = (torch.randn(r, d, generator=g) for r in (n, n, size))
    if not normalize:  # unit rows, so the logits stay O(1 / tau)
        q, k, queue = (F.normalize(x, dim=-1) for x in (q, k, queue))
    q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
    tau = torch.tensor(0.2)
    kw = dict(in_batch_negatives=in_batch, normalize=normalize)
    want = _run_queue(info_nce_ref, q.double(), k.double(), queue.double(), tau.double(), **kw)
    torch.testing.assert_close(want[0], _explicit_queue_loss(q, k, queue, 0.2, in_batch, normalize))
    for backend in ("reference", "triton"):
        got = _run_queue(info_nce, q, k, queue, tau, backend=backend, **kw)
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
        for g_, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g_.double(), w, atol=rtol * w.abs().max().item() + 1e-12, rtol=0)


def test_queue_unwritten_outputs_would_show(poisoned):
    from sslpt.kernels.info_nce import info_nce_queue_lse

    q, k, queue = torch.randn(37, 24), torch.randn(37, 24), torch.randn(70, 24)
    scale = torch.tensor(4.0)
    lse, pos, queue_lse = info_nce_queue_lse(q, k, queue, scale)
    q, k, queue = q.double(), k.double(), queue.double()   # the truth in float64, compared at fp32's tolerance
    want_pos = (q * k).sum(-1) * 4
    torch.testing.assert_close(queue_lse, torch.logsumexp(q @ queue.T * 4, 1).float())
    torch.testing.assert_close(pos, want_pos.float())
    torch.testing.assert_close(lse, torch.logsumexp(torch.cat([want_pos[:, None], q @ queue.T * 4], 1), 1).float())


def test_queue_custom_op_registration():
    from sslpt.kernels.info_nce import info_nce_queue_lse

    q, k = torch.randn(20, 16, requires_grad=True), torch.randn(20, 16, requires_grad=True)
    queue, scale = torch.randn(40, 16), torch.tensor(3.0, requires_grad=True)
    for args in ((q, k, queue, scale), (q, None, queue, scale)):
        torch.library.opcheck(info_nce_queue_lse, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_queue_compiles_fullgraph(backend):
    torch._dynamo.reset()
    q, k, queue = torch.randn(12, 16, requires_grad=True), torch.randn(12, 16), torch.randn(30, 16)
    temperature = torch.nn.Parameter(torch.tensor(0.2))

    def loss_fn(q, k, queue, t):
        return (info_nce(q, k, t, queue=queue, in_batch_negatives=False, backend=backend)
                + info_nce(q, k, t, queue=queue, backend=backend))

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, queue, temperature)
    got_grads = torch.autograd.grad(got, (q, temperature))
    want = loss_fn(q, k, queue, temperature)
    want_grads = torch.autograd.grad(want, (q, temperature))
    torch.testing.assert_close(got, want)
    for g_, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g_, w)


def test_queue_bad_inputs():
    q, k, queue = torch.randn(8, 16), torch.randn(8, 16), torch.randn(20, 16)
    with pytest.raises(ValueError, match=r"queue must have shape \[\*, 16\]"):
        info_nce(q, k, 0.1, queue=torch.randn(20, 17))
    with pytest.raises(TypeError, match="queue must have the dtype of q"):
        info_nce(q, k, 0.1, queue=queue.half())
    with pytest.raises(ValueError, match="queue must have at least one row"):
        info_nce(q, k, 0.1, queue=queue[:0])
    with pytest.raises(ValueError, match="symmetric=True cannot be combined with a queue"):
        info_nce(q, k, 0.1, queue=queue, symmetric=True)
    with pytest.raises(ValueError, match="in_batch_negatives=False needs a queue"):
        info_nce(q, k, 0.1, in_batch_negatives=False)
    with pytest.raises(BackendUnavailable, match="no queue"):
        info_nce(q, k, 0.1, queue=queue, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("in_batch", [True, False])
def test_queue_gpu_against_reference(dtype, rtol, in_batch):
    q, k = torch.randn(1000, 128, device="cuda").to(dtype), torch.randn(1000, 128, device="cuda").to(dtype)
    queue = torch.randn(8192, 128, device="cuda").to(dtype)
    want = _run_queue(info_nce_ref, q.double(), k.double(), queue.double(), torch.tensor(0.2, device="cuda").double(),
                      in_batch_negatives=in_batch)
    got = _run_queue(info_nce, q, k, queue, torch.tensor(0.2, device="cuda"), in_batch_negatives=in_batch,
                     backend="triton")
    torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
    for g_, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g_.double(), w, atol=rtol * w.abs().max().item() + 1e-12, rtol=0)


# 2 gloo ranks x N/2 rows against 1 process x N rows, with a queue shared by the ranks
WORLD, N_DIST, D_DIST = 2, 12, 16


def _queue_data():
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(r, D_DIST, generator=g) for r in (N_DIST, N_DIST, 40))


def _queue_step(q, k, queue, in_batch, backend, group):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    t = torch.tensor(0.2, requires_grad=True)
    loss = info_nce(q, k, t, queue=queue, in_batch_negatives=in_batch, group=group, backend=backend)
    loss.backward()
    return {"loss": loss.detach(), "t": t.grad, "q": q.grad, "k": k.grad}


def _queue_worker(rank: int, port: int, out_path: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        q, k, queue = _queue_data()
        rows = slice(rank * N_DIST // WORLD, (rank + 1) * N_DIST // WORLD)
        results = {}
        for backend in ("reference", "triton"):
            for in_batch in (True, False):
                r = _queue_step(q[rows], k[rows], queue, in_batch, backend, dist.group.WORLD)
                as_ddp(r, ("loss", "t"), ("q", "k"), WORLD)
                results[backend, in_batch] = r
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def queue_two_ranks(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path_factory.mktemp("queue_dist") / "results.pt")
    spawn_ranks(_queue_worker, out, nprocs=WORLD)
    return torch.load(out)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("in_batch", [True, False])
def test_queue_two_ranks_match_one_process(queue_two_ranks, backend, in_batch):
    q, k, queue = _queue_data()
    single = _queue_step(q, k, queue, in_batch, "reference", None)
    ranks = queue_two_ranks[backend, in_batch]
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ranks["loss"], single["loss"], **tol)
    torch.testing.assert_close(ranks["t"], single["t"], **tol)
    for key in ("q", "k"):   # each rank's mean is over its own rows: W times the one-process gradient
        torch.testing.assert_close(ranks[key] / WORLD, single[key], **tol)
