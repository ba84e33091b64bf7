"""prototype_cross_entropy (DINO's multi-crop loss over K prototypes): the Triton kernels against the float64
reference (loss, d student, d prototypes and, through weight norm, d v and d g), cross and identity pairings,
centre, frozen prototypes, large logits, low precision, unwritten outputs; the reference against DINO's
original loop; gradcheck; prototype_center (one process and 2 gloo ranks); bad inputs; torch.compile."""
import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslpt.kernels import BackendUnavailable, prototype_center, prototype_cross_entropy
from sslpt.kernels.reference import prototype_cross_entropy_ref
from testkit import free_port

# the module (the package attribute of that name is the function)
pce = importlib.import_module("sslpt.kernels.prototype_cross_entropy")


def _inputs(batch, crops, protos, dim, *, pairing="cross", num_global=2, center=True, magnitude=1.0, seed=0):
    """Student / teacher features, weight-norm parameters (v, g) of both heads, a centre. ``magnitude`` scales
    the features and the prototype norms g: logits far outside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    teacher_rows = num_global * batch if pairing == "cross" else crops * batch
    student = torch.randn(crops * batch, dim, generator=g) * magnitude / dim**0.5
    teacher = torch.randn(teacher_rows, dim, generator=g) * magnitude / dim**0.5
    v_s, v_t = torch.randn(protos, dim, generator=g), torch.randn(protos, dim, generator=g)
    g_s = (0.5 + torch.rand(protos, generator=g)) * magnitude
    g_t = (0.5 + torch.rand(protos, generator=g)) * magnitude
    c = torch.randn(protos, generator=g) * 0.1 * magnitude if center else None
    return student, teacher, (v_s, g_s), (v_t, g_t), c


def _weight_norm(v, g):
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def _run(student, teacher, student_head, teacher_head, center, dtype, *, frozen=False, **kw):
    """Loss and the gradients of the student features, the effective prototypes, v and g (None where frozen).
    Weight norm runs in the leaves' dtype; the op sees its output rounded to ``dtype``."""
    student = student.to(dtype).detach().requires_grad_()
    v, g = (x.detach().requires_grad_(not frozen) for x in student_head)
    weight = _weight_norm(v, g).to(dtype)
    if not frozen:
        weight.retain_grad()
    teacher_weight = _weight_norm(*teacher_head).to(dtype)
    loss = prototype_cross_entropy(student, teacher.to(dtype), weight, teacher_weight, center, **kw)
    loss.backward()
    return loss.detach(), student.grad, weight.grad, v.grad, g.grad


def _check(inputs, dtype, rtol, *, frozen=False, **kw):
    """Triton in ``dtype`` against the float64 reference on the same rounded values."""
    student, teacher, student_head, teacher_head, center = inputs
    r64 = lambda x: x.to(dtype).double()  # noqa: E731 - the values the kernel sees
    want = _run(r64(student), r64(teacher), [x.double() for x in student_head], [x.double() for x in teacher_head],
                None if center is None else center.double(), torch.float64, frozen=frozen, backend="reference", **kw)
    got = _run(student, teacher, student_head, teacher_head, center, dtype, frozen=frozen, backend="triton", **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert torch.isfinite(got[0])
    torch.testing.assert_close(got[0].double(), want[0], atol=rtol * max(1.0, want[0].abs().item()), rtol=0)
    for g, w in zip(got[1:], want[1:]):  # gradients: error relative to their largest entry (K = 1: all zero)
        if frozen and w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w, atol=rtol * w.abs().max().item() + 1e-7, rtol=0)
    return got


# Large logits: fp32 itself rounds a logit s to |s| * 6e-8, so the softmax weights (and the gradients) carry a
# relative error of about max|s| * 6e-8 against float64 whoever computes them: the tolerance follows.
CASES = [  # batch, crops, K, d, pairing, centre, feature magnitude, rtol
    pytest.param(3, 10, 7, 48, "cross", True, 1.0, 1e-4, id="2+8-K7-centre"),
    pytest.param(3, 12, 300, 48, "cross", False, 1.0, 1e-4, id="2+10-K300"),
    pytest.param(2, 12, 4096, 32, "cross", True, 1.0, 1e-4, id="2+10-K4096-centre"),
    pytest.param(3, 10, 1, 48, "cross", True, 1.0, 1e-4, id="2+8-K1"),
    pytest.param(5, 2, 300, 20, "identity", False, 1.0, 1e-4, id="identity"),
    pytest.param(3, 10, 100, 48, "cross", True, 10.0, 1e-3, id="2+8-large-logits"),
    pytest.param(4, 3, 70, 24, "identity", False, 10.0, 1e-3, id="identity-large-logits"),
]


@pytest.mark.parametrize("batch,crops,protos,dim,pairing,center,magnitude,rtol", CASES)
def test_fp32_matches_float64_reference(batch, crops, protos, dim, pairing, center, magnitude, rtol):
    inputs = _inputs(batch, crops, protos, dim, pairing=pairing, center=center, magnitude=magnitude)
    _check(inputs, torch.float32, rtol, pairing=pairing, student_temp=0.1, teacher_temp=0.04)


def test_large_logits_really_are_large():
    """The large-magnitude cases do what they claim: student logits in the hundreds (no |z| <= 1 assumption)."""
    student, _, head, _, _ = _inputs(3, 10, 100, 48, magnitude=10.0)
    assert (student @ _weight_norm(*head).T).abs().max() / 0.1 > 300


def test_one_global_crop_and_other_temperatures():
    inputs = _inputs(3, 4, 50, 16, num_global=1)
    _check(inputs, torch.float32, 1e-4, num_global=1, student_temp=0.2, teacher_temp=0.07)


@pytest.mark.parametrize("pairing,center", [("cross", True), ("identity", False)])
def test_fp16_matches_float64_reference(pairing, center):
    inputs = _inputs(3, 10, 300, 48, pairing=pairing, center=center)
    _check(inputs, torch.float16, 1e-2, pairing=pairing)


def test_fp16_keeps_small_softmax_weights(monkeypatch):
    """A confident student (tail weights 1e-7..1e-4, fp16's subnormal range): the prototype gradient of every row,
    relative to that row, stays exact because the weights are scaled by W_SCALE before the fp16 rounding; without
    the scale (shown by setting it to 1) the rows of rare prototypes lose their digits."""
    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(64, 16, generator=g), dim=-1).half()
    h = (1.2 * w[0].float() + 0.05 * torch.randn(40, 16, generator=g)).half()
    logits = h.double() @ w.double().T / 0.1
    want = logits.softmax(-1).T @ h.double()              # sum_r sigma_rk h_r: the student part of dW
    nothing = torch.zeros(1, 16).half()                    # no teacher rows contribute (lse_t = inf)

    def worst_row_error():
        got = pce.prototype_grad(h, w, logits.logsumexp(-1).float(), torch.ones(40), nothing, w, None,
                                 torch.full((1,), float("inf")), nothing, 10.0, 1.0)
        return ((got.double() - want).abs().amax(1) / want.abs().amax(1)).max().item()

    assert worst_row_error() < 2e-3
    monkeypatch.setattr(pce, "W_SCALE", 1.0)
    assert worst_row_error() > 1e-1


def test_frozen_prototypes_skip_the_weight_gradient(monkeypatch):
    """student_weight without grad (DINO's frozen last layer): no prototype-gradient pass, d student still exact."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the prototype-gradient kernel ran for frozen prototypes")

    monkeypatch.setattr(pce, "prototype_grad", forbidden)
    got = _check(_inputs(3, 10, 60, 48), torch.float32, 1e-4, frozen=True)
    assert got[2] is None and got[3] is None


def test_unwritten_outputs_would_show(poison_allocations):
    """Every buffer the kernels allocate starts as NaN: a tile left unwritten would reach the loss or a grad."""
    _check(_inputs(3, 10, 300, 48), torch.float32, 1e-4)
    _check(_inputs(5, 2, 70, 20, pairing="identity", center=False), torch.float32, 1e-4, pairing="identity")


def test_teacher_pass_merges_prototype_splits():
    """U and lse_t of the teacher pass (several prototype splits at K = 600) against torch."""
    teacher, wt, ws = torch.randn(6, 40), torch.randn(600, 40), torch.randn(600, 40)
    center = torch.randn(600)
    assert pce._teacher_split(6, 600, teacher.device) < 600
    u, lse = pce.teacher_pass(teacher, wt, ws, center, 1 / 0.04)
    logits = (teacher @ wt.T - center) / 0.04
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(u, logits.softmax(-1) @ ws, atol=1e-4, rtol=1e-4)


def test_gpu_split_sizes():
    """The GPU's prototype splits: about two programs per SM (132 SMs) at DINO's sizes, none where rows suffice."""
    chunk = pce.split_size(2048, 65536, 264)   # B = 1024: 32 row tiles -> 9 splits of 7296
    assert chunk % 64 == 0 and -(-65536 // chunk) == 9
    assert pce.split_size(12, 7, 264) >= 7       # tiny K: one split
    assert pce.split_size(65536, 65536, 264) >= 65536  # many rows: no split
    assert pce.split_size(128, 65536, 264) >= 512


def test_gpu_configs_fit_shared_memory():
    for dim in (32, 128, 256, 384, 512, 1024):
        for elsize in (2, 4):
            for kind in ("teacher", "grad"):
                block_d = pce._block_d(dim)
                for c in pce._gpu_configs(kind, block_d, elsize):
                    rows = c.kwargs["BLOCK_M" if kind == "teacher" else "BLOCK_K"]
                    assert pce.shared_bytes(kind, rows, c.kwargs["BLOCK_N"], block_d, c.num_stages, elsize) <= \
                        pce.SHARED_MEMORY_LIMIT
    for kind in ("teacher", "grad"):  # DINO's d = 256: only 64-row (wgmma) tiles, as compiled by make aot-check
        assert all(c.kwargs[pce._ROWS[kind]] >= 64 for c in pce._gpu_configs(kind, 256, 2))
    for dim in (256, 384, 512):  # DINO's bottleneck, MOKD's T-head width, the GPU limit of info_nce's lse kernels
        assert pce.width_reason(dim, torch.bfloat16) is None
    assert pce.width_reason(256, torch.float32) is None
    assert "513 > 512" in pce.width_reason(513, torch.bfloat16)
    assert "1025 > 1024" in pce.width_reason(1025, torch.bfloat16)


def test_strided_inputs():
    student, teacher, head_s, head_t, center = _inputs(3, 10, 40, 32)
    wide = torch.randn(student.shape[0], 64)
    wide[:, ::2] = student
    strided = (wide[:, ::2], teacher, head_s, head_t, center)
    assert not strided[0].is_contiguous()
    _check(strided, torch.float32, 1e-4)


# ---- the reference -----------------------------------------------------------------------------------------

def _dino_loop(student, teacher, student_weight, teacher_weight, center, tau_s, tau_t, crops):
    """DINO's loss as its repositories write it: the student log-softmax recomputed for every teacher crop."""
    student_out = (student @ student_weight.T / tau_s).chunk(crops)
    teacher_out = F.softmax((teacher @ teacher_weight.T - center) / tau_t, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total += loss.mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("crops", [10, 12])
def test_reference_matches_dino_loop(crops):
    student, teacher, head_s, head_t, center = (x.double() if torch.is_tensor(x) else [y.double() for y in x]
                                               for x in _inputs(4, crops, 33, 16, magnitude=5.0))
    ws, wt = _weight_norm(*head_s).requires_grad_(), _weight_norm(*head_t)
    student.requires_grad_()
    got = prototype_cross_entropy(student, teacher, ws, wt, center, student_temp=0.1, teacher_temp=0.04,
                                  backend="reference")
    want = _dino_loop(student, teacher, ws, wt, center, 0.1, 0.04, crops)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (student, ws)), torch.autograd.grad(want, (student, ws))):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("pairing", ["cross", "identity"])
def test_reference_gradcheck(pairing):
    student, teacher, head_s, head_t, center = _inputs(2, 3, 5, 4, pairing=pairing)
    student, teacher, ws, wt = (x.double() for x in (student, teacher, _weight_norm(*head_s), _weight_norm(*head_t)))
    student.requires_grad_()
    ws.requires_grad_()
    fn = lambda s, w: prototype_cross_entropy(s, teacher, w, wt, center.double(), pairing=pairing,  # noqa: E731
                                              backend="reference")
    assert torch.autograd.gradcheck(fn, (student, ws))


def test_reference_bfloat16_computes_in_float32():
    inputs = _inputs(3, 10, 50, 16)
    student, teacher, head_s, head_t, center = inputs
    bf = [x.bfloat16() for x in (student, teacher, _weight_norm(*head_s), _weight_norm(*head_t))]
    got = prototype_cross_entropy(*bf, center, backend="reference")
    want = prototype_cross_entropy(*(x.double() for x in bf), center.double(), backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_teacher_side_gets_no_gradient():
    student, teacher, head_s, head_t, center = _inputs(2, 4, 20, 16)
    teacher.requires_grad_()
    wt = _weight_norm(*head_t).requires_grad_()
    center.requires_grad_()
    for backend in ("reference", "triton"):
        loss = prototype_cross_entropy(student.requires_grad_(), teacher, _weight_norm(*head_s), wt, center,
                                       backend=backend)
        assert torch.autograd.grad(loss, (teacher, wt, center), allow_unused=True) == (None, None, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_centre_updated_in_place_before_the_backward(backend):
    """DINO updates its running centre in place after the loss and before backward(): the gradient is the one of
    the centre the loss used."""
    student, teacher, head_s, head_t, center = _inputs(2, 4, 20, 16)
    ws, wt = _weight_norm(*head_s).requires_grad_(), _weight_norm(*head_t)
    want = torch.autograd.grad(prototype_cross_entropy_ref(student.requires_grad_(), teacher, ws, wt, center.clone(),
                                                           0.1, 0.04, 2, "cross"), (student, ws))
    loss = prototype_cross_entropy(student, teacher, ws, wt, center, backend=backend)
    center.lerp_(prototype_center(teacher, wt), 0.1)
    for g, w in zip(torch.autograd.grad(loss, (student, ws)), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_auto_backend_uses_reference_on_cpu():
    student, teacher, head_s, head_t, center = _inputs(2, 4, 20, 16)
    ws, wt = _weight_norm(*head_s), _weight_norm(*head_t)
    torch.testing.assert_close(prototype_cross_entropy(student, teacher, ws, wt, center),
                               prototype_cross_entropy_ref(student, teacher, ws, wt, center, 0.1, 0.04, 2, "cross"))


# ---- prototype_center --------------------------------------------------------------------------------------

def test_prototype_center_is_the_mean_teacher_logit():
    teacher, wt = torch.randn(12, 16), torch.randn(30, 16)
    torch.testing.assert_close(prototype_center(teacher, wt), (teacher @ wt.T).mean(0), atol=1e-5, rtol=1e-5)
    low = prototype_center(teacher.bfloat16(), wt.bfloat16())
    assert low.dtype == torch.float32 and low.shape == (30,)
    assert prototype_center(teacher.double(), wt.double()).dtype == torch.float64


WORLD = 2


def _center_worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        teacher, wt = _center_data()
        rows = teacher.shape[0] // WORLD
        center = prototype_center(teacher[rank * rows:(rank + 1) * rows], wt, group=dist.group.WORLD)
        gathered = [torch.empty_like(center) for _ in range(WORLD)]
        dist.all_gather(gathered, center)
        if rank == 0:
            torch.save(torch.stack(gathered), out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _center_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(24, 16, generator=g)


def test_prototype_center_over_two_ranks_is_the_global_mean(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "centers.pt")
    # fork: the children inherit the imported modules (spawn would re-import torch, seconds per rank)
    mp.start_processes(_center_worker, args=(free_port(), out), nprocs=WORLD, join=True, start_method="fork")
    teacher, wt = _center_data()
    for center in torch.load(out):  # every rank holds the global-batch centre
        torch.testing.assert_close(center, (teacher @ wt.T).mean(0), atol=1e-5, rtol=1e-5)


# ---- bad inputs ----------------------------------------------------------------------------------------------

def _bad_cases():
    s, t, ws, wt, c = torch.randn(12, 8), torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 8), torch.randn(5)
    return [
        ((s, t[:, :7], ws, wt, c), {}, ValueError, "teacher must have d=8"),
        ((s, t, ws[:, :7], wt, c), {}, ValueError, "student_weight must have d=8"),
        ((s, t, ws, wt[:4], c), {}, ValueError, "teacher_weight must have K=5"),
        ((s, t, ws, wt, c[:4]), {}, ValueError, r"center must have shape \[5\]"),
        ((s, t, ws, wt, c[None]), {}, ValueError, "center must have 1 dimensions"),
        ((s, t.half(), ws, wt, c), {}, TypeError, "teacher must have the dtype of student"),
        ((s.long(), t, ws, wt, c), {}, TypeError, "student must have dtype"),
        ((s[None], t, ws, wt, c), {}, ValueError, "student must have 2 dimensions"),
        ((s, t[:3], ws, wt, c), {}, ValueError, "teacher must have num_global"),
        ((s[:11], t, ws, wt, c), {}, ValueError, "student must have n_c"),
        ((s[:2], t, ws, wt, c), {}, ValueError, "student must have n_c"),
        ((s[:2], t[:2], ws, wt, c), {"num_global": 1}, ValueError, "pairs no crops"),
        ((s, t, ws, wt, c), {"num_global": 0}, ValueError, "num_global must be an int"),
        ((s, t, ws, wt, c), {"pairing": "crosss"}, ValueError, "pairing must be one of"),
        ((s, t, ws, wt, c), {"pairing": "identity"}, ValueError, "pairing='identity' needs"),
        ((s, t, ws, wt, c), {"student_temp": 0.0}, ValueError, "student_temp must be > 0"),
        ((s, t, ws, wt, c), {"teacher_temp": -0.04}, ValueError, "teacher_temp must be > 0"),
        ((s, t, ws, wt, c), {"teacher_temp": float("nan")}, ValueError, "teacher_temp must be > 0"),
        ((s, t, ws, wt, c), {"student_temp": "0.1"}, TypeError, "student_temp must be a float"),
        ((s, t, ws, wt, c), {"backend": "nope"}, ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("args,kwargs,error,match", _bad_cases())
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        prototype_cross_entropy(*args, **kwargs)


def test_bad_center_inputs_and_wide_rows():
    with pytest.raises(ValueError, match="teacher_weight must have d=8"):
        prototype_center(torch.randn(4, 8), torch.randn(5, 7))
    with pytest.raises(ValueError, match="teacher must have at least one row"):
        prototype_center(torch.randn(0, 8), torch.randn(5, 8))
    wide = torch.randn(4, pce.MAX_TRITON_DIM + 1)
    with pytest.raises(BackendUnavailable, match=f"d={pce.MAX_TRITON_DIM + 1} > {pce.MAX_TRITON_DIM}"):
        prototype_cross_entropy(wide, wide[:2], wide[:3], wide[:3], num_global=1, backend="triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        prototype_cross_entropy(*(torch.randn(4, 8, dtype=torch.float64) for _ in range(2)),
                                *(torch.randn(3, 8, dtype=torch.float64) for _ in range(2)), backend="triton")


# ---- custom op / torch.compile -----------------------------------------------------------------------------

def test_custom_op_registration():
    """Schema, fake (meta) kernel and autograd formula as torch.compile sees them."""
    student, teacher, head_s, head_t, center = _inputs(2, 4, 20, 16)
    ws = _weight_norm(*head_s).requires_grad_()
    torch.library.opcheck(pce.prototype_ce, (student.requires_grad_(), teacher, ws, _weight_norm(*head_t), center,
                                             10.0, 25.0, 2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    student, teacher, head_s, head_t, center = _inputs(2, 4, 20, 16)
    v, g = (x.clone().requires_grad_() for x in head_s)
    wt = _weight_norm(*head_t)

    def step(s, v, g):
        return prototype_cross_entropy(s, teacher, _weight_norm(v, g), wt, center, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s = student.clone().requires_grad_()
    got = compiled(s, v, g)
    got_grads = torch.autograd.grad(got, (s, v, g))
    want = step(s, v, g)
    want_grads = torch.autograd.grad(want, (s, v, g))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# ---- memory: what the backward keeps ------------------------------------------------------------------------

def test_triton_saves_no_logits():
    """The benchmark's saved-for-backward measure: the reference keeps [N, K] tensors, Triton only O(N d)."""
    from benchmarks import bench_dino_loss

    shape = bench_dino_loss.Shape(2, 6, 256, 16, torch.float32)   # N_s = 12 rows, K = 256
    x = bench_dino_loss.make_inputs(shape, "cpu")
    logits = 12 * 256 * 4
    assert bench_dino_loss.saved_bytes(bench_dino_loss._reference, x) >= logits   # the student log-softmax, p
    # beyond the inputs: U [4, 16], lse_s [12], lse_t [4] and the copy of the centre [256], in fp32
    assert bench_dino_loss.saved_bytes(bench_dino_loss._triton, x) == (4 * 16 + 12 + 4 + 256) * 4


# ---- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 384])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pairing", ["cross", "identity"])
def test_gpu_against_reference(d, dtype, rtol, pairing):
    student, teacher, head_s, head_t, center = (
        x.cuda() if torch.is_tensor(x) else [y.cuda() for y in x]
        for x in _inputs(8, 10, 4096, d, pairing=pairing, center=pairing == "cross"))
    _check((student, teacher, head_s, head_t, center), dtype, rtol, pairing=pairing)
