"""dense_match: the Triton kernel (interpreter) against argmax over the explicit similarity matrix; ties to the lowest
index, awkward shapes and strides, unwritten outputs, no gradient, bad inputs, the custom-op registration."""
import pytest
import torch
import torch.nn.functional as F

from sslpt.kernels import BackendUnavailable, dense_match
from sslpt.kernels.dense_match import dense_match_argmax
from sslpt.kernels.reference import dense_match_ref


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the kernel allocates with NaN (and indices with -1), so an unwritten output shows."""
    empty = torch.empty

    def poisoned_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
    monkeypatch.setattr(torch, "empty", poisoned_empty)


def _explicit(f1, f2):
    """float64 similarity matrix, written out: [B, S1, S2]."""
    a, b = f1.double(), f2.double()
    return (a @ b.transpose(1, 2)) / (a.norm(dim=-1)[..., None] * b.norm(dim=-1)[:, None, :]).clamp_min(1e-24)


def _check(f1, f2, backend, tol):
    """Similarities within tol of the float64 truth; the index is a maximiser up to tol, and THE argmax where
    the best location leads the runner-up by more than tol."""
    index, sim = dense_match(f1, f2, backend=backend)
    assert index.dtype == torch.int64 and sim.dtype == torch.float32 and index.shape == f1.shape[:2]
    truth = _explicit(f1, f2)
    top2 = truth.topk(min(2, truth.shape[-1]), dim=-1).values
    best = top2[..., 0]
    chosen = truth.gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(sim.double(), chosen, atol=tol, rtol=0)
    assert (chosen >= best - tol).all()
    clear = (top2[..., 0] - top2[..., -1] > tol) if truth.shape[-1] > 1 else torch.ones_like(best, dtype=torch.bool)
    assert torch.equal(index[clear], truth.argmax(-1)[clear])


SHAPES = [  # B, S1, S2, C: 1 location, 7x7 (ResNet C5), sizes off the tile, C off the chunk
    (1, 1, 1, 16),
    (2, 49, 49, 70),
    (3, 37, 100, 33),
    (1, 5, 1, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_explicit_argmax(shape, dtype, tol, backend, poisoned):
    b, s1, s2, c = shape
    g = torch.Generator().manual_seed(s1 * s2 + c)
    f1, f2 = torch.randn(b, s1, c, generator=g).to(dtype), torch.randn(b, s2, c, generator=g).to(dtype)
    _check(f1, f2, backend, tol)   # the values are rounded to dtype first: the dot products are then exact-ish


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ties_go_to_the_lowest_index(backend):
    """Integer features: every dot product and norm is exact, so repeated locations tie exactly, also across
    tiles of S2 (the Triton tile is 16 or 32 wide here) and within one."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (2, 7, 24), generator=g).float()
    f2 = base[:, torch.arange(100) % 7]               # location j repeats location j % 7
    f1 = torch.cat([base, 2 * base[:, :3]], dim=1)     # scaled copies: the same cosine
    index, sim = dense_match(f1, f2, backend=backend)
    truth = _explicit(f1, f2)
    lowest = torch.stack([torch.stack([(row == row.max()).nonzero()[0, 0] for row in img]) for img in truth])
    assert torch.equal(index, lowest)
    assert (index < 7).all()
    torch.testing.assert_close(sim.double(), truth.amax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_inputs(backend):
    """A [B, C, H, W] map as locations (channel stride H*W), and a slice with a large batch stride."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 40, 5, 9, generator=g)
    f1 = maps.flatten(2).transpose(1, 2)              # [2, 45, 40], not contiguous
    big = torch.randn(6, 300, 80, generator=g)
    f2 = big[::3, 7:70:2, ::2]                        # [2, 32, 40] with strides (72000, 160, 2)
    assert not f1.is_contiguous() and not f2.is_contiguous()
    _check(f1, f2, backend, 1e-5)


def test_float64_reference_and_zero_vectors():
    f1, f2 = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    f1[0, 2] = 0   # no direction: similarity 0 with every location, index 0
    index, sim = dense_match(f1, f2)
    assert sim.dtype == torch.float64 and index[0, 2] == 0 and sim[0, 2] == 0
    truth = _explicit(f1, f2)
    assert torch.equal(index[1], truth[1].argmax(-1))
    with pytest.raises(BackendUnavailable, match="float64"):
        dense_match(f1, f2, backend="triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_gradient(backend):
    f1, f2 = torch.randn(1, 4, 16, requires_grad=True), torch.randn(1, 5, 16, requires_grad=True)
    index, sim = dense_match(f1, f2, backend=backend)
    assert not sim.requires_grad and not index.requires_grad


def test_bad_inputs():
    f1, f2 = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="f1 must have 3 dimensions"):
        dense_match(f1[0], f2)
    with pytest.raises(ValueError, match=r"f2 must have shape \[2, \*, 8\]"):
        dense_match(f1, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match=r"f2 must have shape \[2, \*, 8\]"):
        dense_match(f1, torch.randn(2, 5, 9))
    with pytest.raises(TypeError, match="f2 must have the dtype of f1"):
        dense_match(f1, f2.half())
    with pytest.raises(TypeError, match="f1 must have dtype"):
        dense_match(f1.long(), f2.long())
    with pytest.raises(ValueError, match="at least one image, location and channel"):
        dense_match(f1[:, :0], f2)


def test_custom_op_registration_and_compile():
    f1, f2 = torch.randn(2, 20, 16), torch.randn(2, 18, 16)
    torch.library.opcheck(dense_match_argmax, (f1, f2), test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: dense_match(a, b, backend="triton"), fullgraph=True, backend="aot_eager")
    got, want = compiled(f1, f2), dense_match_ref(f1, f2)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_against_reference(dtype):
    f1 = torch.randn(8, 196, 384, device="cuda").to(dtype)
    f2 = F.normalize(torch.randn(8, 300, 384, device="cuda"), dim=-1).to(dtype)
    _check(f1, f2, "triton", 1e-3 if dtype == torch.float32 else 1e-5)
