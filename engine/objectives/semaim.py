"""SemAIM, semantic-aware autoregressive image modeling (Song et al., AAAI 2024; github.com/skyoux/SemAIM).

Per step: a no-grad forward of the current encoder on the whole image scores each patch by the softmax over
patches of its cosine similarity to the cls token (``attention_type``); the highest-scoring patch is the centre
and patches are predicted in order of grid distance from it (``permutation_type="attention_center"``). The
two-stream model (``engine.models.semaim``) predicts every patch from the patches before it: its Gaussian-blurred,
per-patch normalised pixels (or, with ``predict_feature="ema"``, an EMA teacher's features). docs/methods/semaim.md
has the details and where this departs from the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine import viz
from sslpt.engine.config import ObjectiveSettings, require, require_vit
from sslpt.engine.ema import EMATeacher, ema_decay
from sslpt.engine.models.semaim import SemAIMNet
from sslpt.engine.models.vit import build_vit, encoder_flops, flops_per_token_block
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext

ATTENTION_ORDERS = ("attention_center",)
TIE_BREAK = 1e-3   # the official jitter that orders patches at equal distance from the centre at random


@dataclass(kw_only=True)
class SemAIMSettings(ObjectiveSettings):
    permutation_type: Literal["attention_center", "raster", "stochastic", "center2out"] = "attention_center"
    attention_type: Literal["cls", "gap", "self"] = "cls"   # the score the centre is the argmax of
    query_depth: int | None = None      # query-stream blocks; None: one per encoder block (ViT-B: 12)
    prediction_head: Literal["mlp", "linear"] = "mlp"
    norm_pix: bool = True
    blur_kernel: int = 9                # Gaussian blur of the pixel target (odd side; 0: none)
    blur_sigma: float = 1.0
    predict_feature: Literal["none", "ema"] = "none"   # ema: an EMA teacher's final tokens as targets
    use_ema_model: bool = False         # score the attention order with the EMA teacher, not the current model
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_epochs: int = 100          # shortened to the run's length for runs under 100 epochs

    def check(self, cfg) -> None:
        require_vit(cfg, self.name)
        key, depth = self.key, cfg.model.dims[1]
        query_depth = depth if self.query_depth is None else self.query_depth
        require(1 <= query_depth <= depth and depth % query_depth == 0,
                f"{key('query_depth')}={query_depth} must divide the encoder depth model.depth={depth}")
        require(self.blur_kernel == 0 or (self.blur_kernel > 0 and self.blur_kernel % 2 == 1),
                f"{key('blur_kernel')} must be 0 (no blur) or odd and positive, got {self.blur_kernel}")
        require(self.blur_sigma > 0, f"{key('blur_sigma')} must be > 0, got {self.blur_sigma}")
        require(not self.norm_pix or self.predict_feature != "none" or cfg.model.patch_dim >= 2,
                f"{key('norm_pix')} needs at least 2 values per patch (model.patch_size**2 * in_chans)")
        for name in ("ema_decay_start", "ema_decay_end"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{key(name)} must be in [0, 1), got {value}")
        require(self.ema_ramp_epochs >= 0, f"{key('ema_ramp_epochs')} must be >= 0, got {self.ema_ramp_epochs}")

    def resolved_query_depth(self, depth: int) -> int:
        return depth if self.query_depth is None else self.query_depth


# ------------------------------------------------------------------------------------------------ targets

def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """[size, size] normalised Gaussian centred on the middle pixel, float64."""
    pos = torch.arange(size, dtype=torch.float64) - (size - 1) // 2
    g = torch.exp(-(pos[:, None] ** 2 + pos[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(imgs: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian blur with zero padding (the official ``GaussianConv2d``); ``size`` 0: unchanged."""
    if size == 0:
        return imgs
    channels = imgs.shape[1]
    weight = gaussian_kernel(size, sigma).to(imgs).expand(channels, 1, size, size)
    return F.conv2d(imgs, weight, groups=channels, padding=size // 2)


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, per patch [B, L]) squared distance between L2-normalised prediction and target features."""
    per_patch = (F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).sum(dim=-1)
    return per_patch.mean(), per_patch


# ------------------------------------------------------------------------------------------------ orders

def _grid_coords(grid: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(grid * grid, device=device)
    return idx // grid, idx % grid


def raster_order(batch: int, grid: int, device) -> torch.Tensor:
    """[B, L] snake raster: even rows left to right, odd rows right to left."""
    rows, cols = _grid_coords(grid, device)
    order = rows * grid + torch.where(rows % 2 == 0, cols, grid - 1 - cols)
    return order.float().expand(batch, -1).contiguous()


def center2out_order(batch: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """[B, L] random order within nested squares around the grid centre, inner squares first (sides 2, 6, 10,
    ... while they fit inside the grid; the official ``generate_center_permutation``)."""
    half = grid // 2
    order = torch.rand(batch, grid, grid, generator=generator, device=generator.device)
    for r in range(1, half, 2):
        order[:, half - r:half + r, half - r:half + r] -= 1.0
    return order.reshape(batch, grid * grid)


def attention_center_order(attention: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """[B, L] Euclidean grid distance of each patch from the patch of highest attention, plus a 1e-3 U[0, 1)
    jitter that orders patches at equal distance at random."""
    rows, cols = _grid_coords(grid, attention.device)
    centre = attention.argmax(dim=1)
    dist = ((rows[None] - (centre // grid)[:, None]) ** 2 + (cols[None] - (centre % grid)[:, None]) ** 2).float()
    jitter = torch.rand(attention.shape, generator=generator, device=generator.device)
    return dist.sqrt() + TIE_BREAK * jitter.to(attention.device)


@torch.no_grad()
def attention_map(encoder, imgs: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, L] semantic score of each patch from a plain forward of ``encoder`` on the whole image, in fp32.

    cls / gap: softmax over patches of the cosine similarity of each final patch token to the final cls token /
    the mean patch token. self: the last block's attention of the cls query to each patch, averaged over heads.
    """
    with torch.autocast(imgs.device.type, enabled=False):
        if kind == "self":
            x = encoder.embed(imgs)
            cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
            for block in encoder.blocks[:-1]:
                x = block(x)
            last = encoder.blocks[-1]
            batch, tokens, dim = x.shape
            heads = last.attn.num_heads
            q, k, _ = last.attn.qkv(last.norm1(x)).reshape(batch, tokens, 3, heads, dim // heads).unbind(2)
            scores = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) * (dim // heads) ** -0.5
            return scores.softmax(dim=-1).mean(dim=1)[:, 1:]
        tokens = F.normalize(encoder(imgs), dim=-1)
        ref = tokens[:, 0] if kind == "cls" else F.normalize(tokens[:, 1:].mean(dim=1), dim=-1)
        return (ref[:, None] * tokens[:, 1:]).sum(dim=-1).softmax(dim=1)


# ------------------------------------------------------------------------------------------------ objective

@register
class SemAIM(Objective):
    name = "semaim"
    Settings = SemAIMSettings
    presets = ("semaim_digits", "semaim_vit_base_800ep")

    def __init__(self, settings: SemAIMSettings, model):
        super().__init__(settings, model)
        width, depth, _ = model.dims
        self.grid = model.img_size // model.patch_size
        self.pixel_target = settings.predict_feature == "none"
        out_dim = model.patch_dim if self.pixel_target else width
        self.model = SemAIMNet(model, settings.resolved_query_depth(depth), out_dim,
                               mlp_head=settings.prediction_head == "mlp")
        self.teacher = None
        if settings.predict_feature == "ema" or settings.use_ema_model:
            # the teacher only ever runs the encoder: its query blocks and head are not copied
            self.teacher = EMATeacher(self.model, skip=("query_blocks", "head"))
        self.decay = settings.ema_decay_start

    @classmethod
    def random_encoder(cls, settings, model):
        return build_vit(model)   # what SemAIMNet builds first, without the query stream

    # ------------------------------------------------------------------ schedule
    def on_epoch_start(self, ctx: StepContext) -> None:
        s = self.settings
        self.decay = ema_decay(ctx.epoch, ctx.epochs, s.ema_decay_start, s.ema_decay_end, s.ema_ramp_epochs)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.update(self.decay)

    # ------------------------------------------------------------------ pieces
    def permutation(self, imgs: torch.Tensor, generator: torch.Generator):
        """([B, L] order, smaller first; [B, L] attention map or None)."""
        kind, batch = self.settings.permutation_type, imgs.shape[0]
        if kind == "raster":
            return raster_order(batch, self.grid, imgs.device), None
        if kind == "stochastic":
            return torch.rand(batch, self.grid ** 2, generator=generator, device=generator.device), None
        if kind == "center2out":
            return center2out_order(batch, self.grid, generator), None
        scorer = self.teacher.model if self.settings.use_ema_model else self.model
        attention = attention_map(scorer.encoder, imgs, self.settings.attention_type)
        return attention_center_order(attention, self.grid, generator), attention

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L, out_dim]: blurred pixels per patch, or the EMA teacher's final patch tokens."""
        if not self.pixel_target:
            with torch.no_grad():
                return self.teacher.model.encoder(imgs)[:, 1:].detach()
        return kernels.patchify(self.blurred(imgs), self.model_cfg.patch_size)

    def blurred(self, imgs: torch.Tensor) -> torch.Tensor:
        """The pixel target as an image, computed in the images' dtype (fp32), outside autocast."""
        with torch.autocast(imgs.device.type, enabled=False):
            return gaussian_blur(imgs, self.settings.blur_kernel, self.settings.blur_sigma)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss over every patch, per-patch loss [B, L])."""
        if not self.pixel_target:
            return feature_loss(pred, target)
        every = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        return kernels.patch_loss(pred, target, every, norm_pix=self.settings.norm_pix)

    def step(self, imgs: torch.Tensor, generator: torch.Generator):
        """(loss, per-patch loss, prediction, target, order, attention map)."""
        perm, attention = self.permutation(imgs, generator)
        pred = self.model(imgs, perm)
        target = self.target(imgs)
        loss, per_patch = self.loss(pred, target)
        return loss, per_patch, pred, target, perm, attention

    def forward(self, imgs, ctx):
        loss = self.step(imgs, ctx.generator)[0]
        return loss, {"loss_rec": loss.detach()}

    def flops_per_image(self) -> float:
        """Training FLOPs: content and query streams (forward + backward), the no-grad scoring forward, and the
        teacher's forward for feature targets; attention counted dense (the order mask halves it on average)."""
        m = self.model_cfg
        width, depth, _ = m.dims
        tokens = m.num_patches + 1
        encoder = encoder_flops(width, depth, m.mlp_ratio, tokens, m.patch_dim, m.num_patches)
        query = len(self.model.query_blocks) * tokens * flops_per_token_block(width, m.mlp_ratio, tokens)
        head = sum(2 * p.numel() for n, p in self.model.head.named_parameters() if n.endswith("weight")) * tokens
        total = 3 * (encoder + query + head)
        if self.settings.permutation_type in ATTENTION_ORDERS:
            total += encoder
        if not self.pixel_target:
            total += encoder
        return float(total)

    # ------------------------------------------------------------------ evaluation
    def reconstruction(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches as an image, on the blurred target's per-patch scale where targets are normalised."""
        p = self.model_cfg.patch_size
        pred = pred.float()
        if self.settings.norm_pix:
            target = kernels.patchify(self.blurred(imgs).float(), p)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        return kernels.unpatchify(pred, p, imgs.shape[1])

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        """The loss on held-out images, and a picture of the order beside the reconstruction."""
        loss, per_patch, pred, _, perm, attention = self.step(imgs, generator)
        out = EvalOutput(metrics={"val_loss_rec": float(loss)})
        if self.pixel_target:
            blurred = self.blurred(imgs).float().cpu()
            recon = self.reconstruction(imgs, pred).cpu()
            shown = [t.float().cpu() if t is not None else None for t in (imgs, perm, attention)]
            out.pictures["semaim_order"] = partial(viz.save_order_panel, imgs=shown[0], order=shown[1], recon=recon,
                                                   patch_size=self.model_cfg.patch_size, attention=shown[2],
                                                   target=blurred)
        return out


__all__ = ["SemAIM", "SemAIMSettings", "attention_center_order", "attention_map", "center2out_order",
           "gaussian_blur", "gaussian_kernel", "raster_order"]
