"""SemAIM: one training step against an explicit-mask reference written as the official code computes it
((B, 1, L, L) additive masks, plain softmax) in float64 for every order type; the Triton path against it in
fp32; no L x L mask on the order-mask fast path; the orders, the blur, causality, the settings, the picture,
and the generic objective checks (attention backend everywhere, 2 + resume + 2 = 4 epochs)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sslpt import kernels
from sslpt.engine.config import CONFIG_DIR, ConfigError, ModelConfig, load_config
from sslpt.engine.models.semaim import CrossAttention, QueryBlock, token_order
from sslpt.engine.models.vit import Attention
from sslpt.engine.objectives import StepContext, build_objective, get
from sslpt.engine.objectives.semaim import (SemAIMSettings, attention_center_order, attention_map,
                                            center2out_order, gaussian_kernel, raster_order)

ORDERS = ["attention_center", "raster", "stochastic", "center2out"]
TINY = ModelConfig(arch="vit_tiny", img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)


def _objective(model=TINY, **settings):
    torch.manual_seed(0)
    return get("semaim")(SemAIMSettings(**settings), model)


def _ctx(seed=0):
    return StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the official computation

def _official_perm(kind, attention, batch, grid, gen):
    """The orders as the official ``generate_*_permutation`` functions draw them (widths generalised)."""
    L = grid * grid
    if kind == "raster":
        perm = torch.zeros(batch, grid, grid)
        for i in range(grid):
            row = torch.arange(grid) if i % 2 == 0 else torch.tensor([grid - 1 - j for j in range(grid)])
            perm[:, i, :] = row + i * grid
        return perm.reshape(batch, L)
    if kind == "stochastic":
        return torch.rand(batch, L, generator=gen)
    if kind == "center2out":
        half = grid // 2
        perm = torch.rand(batch, grid, grid, generator=gen)
        for r in (1, 3, 5, 7, 9, 11, 13):
            if r < half:
                perm[:, half - r:half + r, half - r:half + r] -= 1
        return perm.reshape(batch, L)
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(1, L, 2)
    centre = attention.argmax(dim=-1)
    perm = ((coords[..., 0] - (centre // grid)[:, None]) ** 2 + (coords[..., 1] - (centre % grid)[:, None]) ** 2)
    return perm.double() ** 0.5 + torch.rand(batch, L, generator=gen).double() * 1e-3


def _official_masks(perm, dtype):
    """mask_h, mask_g [B, 1, 1 + L, 1 + L] additive, built as the official ``generate_attention_mask``."""
    B, L = perm.shape
    full, none = torch.full((B, L, L), -math.inf, dtype=dtype), torch.zeros(B, L, L, dtype=dtype)
    mask_h = torch.where(perm.unsqueeze(-1) < perm.unsqueeze(1), full, none)
    mask_g = torch.where(perm.unsqueeze(-1) <= perm.unsqueeze(1), full, none)
    top = torch.full((B, 1, L), -math.inf, dtype=dtype)
    left = torch.zeros(B, L + 1, 1, dtype=dtype)
    pad = lambda m: torch.cat((left, torch.cat((top, m), dim=1)), dim=2).unsqueeze(1)  # noqa: E731
    return pad(mask_h), pad(mask_g)


def _softmax_attention(q, k, v, heads, mask=None):
    B, N, C = q.shape
    split = lambda t: t.reshape(B, N, heads, C // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    if mask is not None:
        attn = attn + mask
    return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)


def _block(blk, x, heads, mask=None):
    """The official ``Block_SelfMask`` on our parameters."""
    y = blk.norm1(x)
    q, k, v = blk.attn.qkv(y).chunk(3, dim=-1)
    x = x + blk.attn.proj(_softmax_attention(q, k, v, heads, mask))
    return x + blk.mlp(blk.norm2(x))


def _query_block(blk, g, h, heads, mask):
    """The official ``Block_SelfCrossMask`` on our parameters (one norm1 for q and for k/v)."""
    a = blk.attn
    out = _softmax_attention(a.q(blk.norm1(g)), a.k(blk.norm1(h)), a.v(blk.norm1(h)), heads, mask)
    g = g + a.proj(out)
    return g + blk.mlp(blk.norm2(g))


def _official_tokens(enc, imgs):
    x = enc.patch_embed(imgs).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def _official_loss(obj, imgs, gen):
    """The official training step (forward_encoder for the attention, forward_aim, forward_pixel_loss)."""
    net, s, heads = obj.model, obj.settings, TINY.dims[2]
    enc = net.encoder
    with torch.no_grad():
        x = _official_tokens(enc, imgs)
        for blk in enc.blocks:
            x = _block(blk, x, heads)
        tokens = F.normalize(enc.norm(x), p=2, dim=-1)
        attention = torch.sum(tokens[:, 0, :].unsqueeze(1) * tokens[:, 1:, :], dim=-1).softmax(dim=1)
    perm = _official_perm(s.permutation_type, attention, imgs.shape[0], obj.grid, gen)
    mask_h, mask_g = _official_masks(perm, imgs.dtype)
    h = _official_tokens(enc, imgs)
    g = enc.pos_embed.expand(h.shape[0], -1, -1)
    for i, blk in enumerate(enc.blocks):
        h = _block(blk, h, heads, mask_h)
        if (i + 1) % net.step == 0:
            g = _query_block(net.query_blocks[i // net.step], g, h, heads, mask_g)
    pred = net.head(enc.norm(g))[:, 1:]
    # GaussianConv2d as the official code builds it
    size, sigma = 9, 1
    position = torch.stack(torch.meshgrid([torch.arange(size), torch.arange(size)], indexing="ij"), dim=-1)
    mean, std = torch.tensor([(size - 1) // 2] * 2), torch.tensor([sigma, sigma], dtype=torch.float64)  # (fp32 there)
    kernel = 1 / (2 * math.pi * torch.prod(std, dim=-1)) * math.e ** (-((position - mean) ** 2 / std ** 2).sum(-1) / 2)
    kernel = (kernel / kernel.sum()).view(1, 1, size, size).to(imgs)
    blurred, p = F.conv2d(imgs, kernel, padding=size // 2), TINY.patch_size
    n, c, w = blurred.shape[0], blurred.shape[1], blurred.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", blurred.reshape(n, c, w, p, w, p)).reshape(n, w * w, p * p * c)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.e-6) ** .5
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("kind", ORDERS)
def test_step_equals_the_explicit_mask_reference_in_float64(kind, backend):
    model = ModelConfig(**{**TINY.__dict__, "attn_backend": backend})
    obj = _objective(model, permutation_type=kind).double()
    imgs = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    params = [p for p in obj.model.parameters() if p.requires_grad]
    loss, _ = obj(imgs, _ctx(7))
    grads = torch.autograd.grad(loss, params)
    want = _official_loss(obj, imgs, _ctx(7).generator)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-10)
    for p, g, w in zip(params, grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("kind", ["attention_center", "stochastic"])
def test_triton_step_equals_the_reference_in_fp32(kind):
    model = ModelConfig(**{**TINY.__dict__, "attn_backend": "triton"})
    obj = _objective(model, permutation_type=kind)
    imgs = torch.randn(3, 1, 8, 8)
    params = [p for p in obj.model.parameters() if p.requires_grad]
    loss, _ = obj(imgs, _ctx(3))
    grads = torch.autograd.grad(loss, params)
    want = _official_loss(obj, imgs, _ctx(3).generator)
    for p, g, w in zip(params, grads, torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ the kernels, both streams

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("patches", [16, 49])   # 17 and 50 tokens: a partial tile
@pytest.mark.parametrize("strict", [False, True])
def test_kernel_serves_both_streams(dtype, patches, strict):
    """Queries of one stream, keys/values of the other, the cls rules through token_order; forward and backward
    of the Triton kernels against the fp32 reference."""
    B, H, N, D = 2, 2, patches + 1, 32
    q, k, v = (torch.randn(B, H, N, D).to(dtype) for _ in range(3))
    order = token_order(torch.rand(B, patches))
    grad = torch.randn(B, H, N, D).to(dtype)

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves, order=order, strict=strict)
        out.backward(grad.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    got = run(lambda *a, **kw: kernels.attention(*a, backend="triton", **kw), q, k, v)
    truth = run(lambda *a, **kw: kernels.attention(*a, backend="reference", **kw), q.float(), k.float(), v.float())
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
    for name, g, t in zip(("out", "dq", "dk", "dv"), got, truth):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), t, **tol, msg=lambda m: f"{name}: {m}")
    if strict:   # the cls query sees nothing under the strict mask: output 0 (its prediction is never used)
        assert (got[0][:, :, 0] == 0).all()
    visible = kernels.reference.sparse_attention_ref  # every patch sees cls, cls sees only itself (non-strict)
    ones = torch.eye(N)[None, None].expand(B, H, N, N)
    seen = visible(ones.clone(), ones.clone(), ones.clone(), order=order, strict=strict, scale=1e-9)
    assert (seen[:, :, 1:, 0] > 0).all()
    if not strict:
        torch.testing.assert_close(seen[:, :, 0], ones[:, :, 0])


class _Shapes(TorchDispatchMode):
    """Every tensor an op produces, by shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _square_masks(backend):
    model = ModelConfig(**{**TINY.__dict__, "attn_backend": backend})
    obj = _objective(model, permutation_type="stochastic")
    imgs = torch.randn(3, 1, 8, 8)
    n = obj.grid ** 2 + 1
    with _Shapes() as seen:
        loss, _ = obj(imgs, _ctx())
        loss.backward()
    return [s for s in seen.shapes if len(s) >= 2 and s[-2:] == (n, n)]


def test_order_mask_fast_path_never_builds_a_token_by_token_tensor():
    assert _square_masks("sdpa"), "the detector must see SDPA's [B, 1, N, N] mask"
    assert _square_masks("triton") == []


# ------------------------------------------------------------------------------------ orders, targets, causality

def test_orders_match_the_official_formulas():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for grid in (4, 14):
        torch.testing.assert_close(raster_order(2, grid, "cpu"), _official_perm("raster", None, 2, grid, gen()))
        torch.testing.assert_close(center2out_order(2, grid, gen()), _official_perm("center2out", None, 2, grid, gen()))
        attention = torch.rand(2, grid * grid, generator=gen())
        torch.testing.assert_close(attention_center_order(attention, grid, gen()).double(),
                                   _official_perm("attention_center", attention, 2, grid, gen()), rtol=1e-6, atol=1e-6)
    # 14 x 14 raster is the official snake: row 1 runs 27, 26, ..., 14
    assert raster_order(1, 14, "cpu")[0, 14:28].tolist() == list(range(27, 13, -1))
    # the centre is the argmax and comes first; patches at equal distance are ordered at random
    attention = torch.zeros(1, 16)
    attention[0, 5] = 1.0
    perm = attention_center_order(attention, 4, gen())
    assert perm.argmin().item() == 5 and perm[0, 5] < 1e-3
    assert sorted(perm[0].argsort()[1:5].tolist()) == [1, 4, 6, 9]


def test_attention_maps():
    obj = _objective()
    imgs = torch.randn(2, 1, 8, 8)
    tokens = F.normalize(obj.model.encoder(imgs), dim=-1)
    cls = attention_map(obj.model.encoder, imgs, "cls")
    torch.testing.assert_close(cls, (tokens[:, :1] * tokens[:, 1:]).sum(-1).softmax(dim=1))
    for kind in ("cls", "gap", "self"):
        a = attention_map(obj.model.encoder, imgs, kind)
        assert a.shape == (2, 16) and (a > 0).all()
        # cls / gap: a softmax over the patches; self: the cls query's weights, less what it gives itself
        assert torch.allclose(a.sum(dim=1), torch.ones(2)) if kind != "self" else (a.sum(dim=1) < 1).all()


def test_gaussian_kernel():
    k = gaussian_kernel(9, 1.0)
    assert k.shape == (9, 9) and abs(k.sum().item() - 1) < 1e-6 and k.argmax().item() == 40
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k[4, 5] / k[4, 4], torch.tensor(math.exp(-0.5), dtype=torch.float64))


@pytest.mark.parametrize("kind", ORDERS)
def test_each_patch_is_predicted_from_strictly_earlier_patches(kind):
    obj = _objective(permutation_type=kind).double()
    imgs = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    perm, _ = obj.permutation(imgs.detach(), torch.Generator().manual_seed(1))
    pred = obj.model(imgs, perm)
    for i in (0, 7, 15):
        (grad,) = torch.autograd.grad(pred[0, i].sum(), imgs, retain_graph=True)
        per_patch = kernels.patchify(grad, 2)[0].abs().sum(-1)   # gradient reaching each input patch
        later = perm[0] >= perm[0, i]
        assert (per_patch[later] == 0).all() and (per_patch[~later] > 0).all(), (kind, i)


# ------------------------------------------------------------------------------------ settings, features, pictures

@pytest.mark.parametrize("override, message", [
    ("objective.semaim.query_depth=3", "objective.semaim.query_depth=3 must divide the encoder depth"),
    ("objective.semaim.blur_kernel=4", "objective.semaim.blur_kernel must be 0 (no blur) or odd"),
    ("objective.semaim.blur_sigma=0", "objective.semaim.blur_sigma must be > 0"),
    ('objective.semaim.permutation_type="zigzag"', "objective.semaim.permutation_type must be one of"),
    ('objective.semaim.attention_type="mean"', "objective.semaim.attention_type must be one of"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("semaim_digits", [override])


def test_presets():
    base = load_config("semaim_vit_base_800ep")
    o = base.optim
    assert (o.blr, o.warmup_epochs, o.weight_decay, tuple(o.betas), o.clip_grad) == (2e-4, 30, 0.05, (0.9, 0.95), 3.0)
    assert base.objective.resolved_query_depth(base.model.dims[1]) == 12
    digits = load_config("semaim_digits")
    assert digits.model.img_size // digits.model.patch_size == 4
    assert {"semaim_digits", "semaim_vit_base_800ep"} <= {p.stem for p in CONFIG_DIR.glob("semaim*.toml")}


def test_ema_feature_targets_and_teacher_order():
    obj = _objective(predict_feature="ema", use_ema_model=True)
    assert obj.teacher is not None and obj.teacher.model.query_blocks is None
    loss, _ = obj(torch.randn(4, 1, 8, 8), _ctx())
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 4
    before = [p.clone() for p in obj.teacher.model.parameters()]
    with torch.no_grad():
        for p in obj.model.parameters():
            p.add_(0.1)
    obj.after_optimizer_step(_ctx())
    assert any(not torch.equal(a, b) for a, b in zip(before, obj.teacher.model.parameters()))
    assert _objective().teacher is None   # pixel targets with the current model's order: no teacher


def test_evaluate_draws_the_order_beside_the_reconstruction(tmp_path):
    obj = _objective()
    out = obj.evaluate(torch.randn(5, 1, 8, 8), torch.Generator().manual_seed(0))
    assert set(out.metrics) == {"val_loss_rec"} and set(out.pictures) == {"semaim_order"}
    path = tmp_path / "order.png"
    out.pictures["semaim_order"](path)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > im.size[1] / 5 * 4   # five columns: image, order, attention, target, recon


# ------------------------------------------------------------------------------------ the generic objective checks

def test_attn_backend_reaches_both_streams():
    cfg = load_config("semaim_digits", ["model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                                        "model.attn_backend=reference", "objective.semaim.use_ema_model=true"])
    objective = build_objective(cfg)
    attns = [m for m in objective.modules() if isinstance(m, Attention)]
    assert {m.backend for m in attns} == {"reference"}
    assert sum(isinstance(m, CrossAttention) for m in attns) == 2
    assert sum(isinstance(m, QueryBlock) for m in objective.modules()) == 2
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(type(objective).random_encoder(cfg.objective, cfg.model)) == shapes(objective.encoder)


@pytest.mark.slow
def test_two_epochs_resume_two_equals_four(tmp_path):
    from test_objective_units import test_two_epochs_resume_two_equals_four as generic

    generic(tmp_path, "semaim")
