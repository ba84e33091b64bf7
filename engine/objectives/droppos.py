"""DropPos (Wang et al., NeurIPS 2023; github.com/Haochen-Wang409/DropPos): reconstruct dropped positions.

Per step: MAE's random mask keeps a quarter of the patches; a second, independent mask drops the position
embedding of most of the visible ones (a learnable ``mask_pos_token`` stands in for it); the encoder runs on
the visible tokens and a light decoder without any position embedding classifies, for every visible token,
which of the L grid positions it came from. The loss is a cross-entropy against a Gaussian-smoothed one-hot
target, on the tokens whose position was dropped, optionally weighted by how similar each patch is to the cls
token (attentive reconstruction). docs/methods/droppos.md has the details and where this departs from the
official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine import viz
from sslpt.engine.config import ObjectiveSettings, require, require_vit
from sslpt.engine.models.mae import DecoderStack
from sslpt.engine.models.vit import build_vit, encoder_flops, init_mae_weights, sincos_pos_embed
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext
from .mae import decoder_flops


@dataclass(kw_only=True)
class DropPosSettings(ObjectiveSettings):
    mask_ratio: float = 0.75            # MAE's patch mask
    pos_mask_ratio: float = 0.75        # fraction of the visible tokens whose position is dropped
    mask_token_type: Literal["param", "zeros", "wrong_pos"] = "param"   # what replaces a dropped position
    sigma: float = 1.0                  # position smoothing at epoch 0, in grid cells (0: one-hot targets)
    sigma_decay: bool = True            # sigma decays linearly per epoch to 0 at the end of the run
    official_smoothing: bool = False    # the official targets: a patch_size-wide grid, column-normalised
    attn_guide: bool = True             # weight each token's loss by its cls similarity (official script: on)
    attn_source: Literal["full", "visible"] = "full"   # full: a no-grad encoder pass on the whole image
    attn_temperature: float = 0.1
    multi_task: bool = False            # add MAE's pixel decoder: loss = pos_weight * L_pos + L_mae
    pos_weight: float = 0.05            # used with multi_task only
    norm_pix: bool = True               # multi_task's pixel targets standardised per patch (official default)

    def check(self, cfg) -> None:
        require_vit(cfg, self.name)
        m, key = cfg.model, self.key
        require(0.0 <= self.mask_ratio < 1.0, f"{key('mask_ratio')} must be in [0, 1), got {self.mask_ratio}")
        require(0.0 <= self.pos_mask_ratio < 1.0,
                f"{key('pos_mask_ratio')} must be in [0, 1), got {self.pos_mask_ratio}")
        visible = kernels.masking.num_visible(m.num_patches, self.mask_ratio)
        require(visible >= 1, f"{key('mask_ratio')}={self.mask_ratio} leaves no visible patch of {m.num_patches}")
        require(num_dropped(visible, self.pos_mask_ratio) >= 1,
                f"{key('pos_mask_ratio')}={self.pos_mask_ratio} drops no position of the {visible} visible tokens: "
                f"nothing to predict")
        require(self.sigma >= 0, f"{key('sigma')} must be >= 0, got {self.sigma}")
        require(self.attn_temperature > 0, f"{key('attn_temperature')} must be > 0, got {self.attn_temperature}")
        require(self.pos_weight >= 0, f"{key('pos_weight')} must be >= 0, got {self.pos_weight}")
        grid = m.img_size // m.patch_size
        require(not self.official_smoothing or (m.img_size // grid) >= grid,
                f"{key('official_smoothing')} builds the official {m.img_size // grid}-wide grid, narrower than the "
                f"true {grid}x{grid} grid: it only reproduces the official targets when patch_size >= grid "
                f"(e.g. 224/16)")
        require(not (self.multi_task and self.norm_pix) or m.patch_dim >= 2,
                f"{key('norm_pix')} needs at least 2 values per patch (model.patch_size**2 * in_chans)")


def num_dropped(visible: int, pos_mask_ratio: float) -> int:
    """Visible tokens whose position is dropped: those the second random mask removes."""
    return visible - kernels.masking.num_visible(visible, pos_mask_ratio)


def sigma_at(sigma: float, decay: bool, epoch: int, epochs: int) -> float:
    """The official schedule: ``sigma * (1 - epoch / epochs)``, stepped once per epoch."""
    return sigma * (1.0 - epoch / epochs) if decay else sigma


def smoothing_matrix(grid: int, sigma: float, official: bool = False, width: int | None = None) -> torch.Tensor:
    """[L, L] float64 soft targets, L = grid**2: row i is the target of a token whose true position is i,
    ``exp(-|p_i - p_j|^2 / sigma^2)`` over the positions j of the grid, normalised to sum to 1 (sigma = 0:
    the identity).

    ``official=True`` reproduces the official code's targets instead: positions laid out on a ``width``-wide
    grid (the official ``input_size // token_size``, i.e. the patch size for 224/16: 16 columns for 14 of the
    grid), a ``width**2`` matrix divided by its row sums broadcast along the last axis (so its *columns* sum
    to 1), of which the first L rows and columns are used.
    """
    size = grid * grid
    if sigma == 0:
        return torch.eye(size, dtype=torch.float64)
    w = width if official else grid
    if official and (w is None or w * w < size):
        raise ValueError(f"the official grid must have at least {size} cells, got width {w}")
    idx = torch.arange(w * w)
    coords = torch.stack([idx // w, idx % w], dim=1).double()
    weight = torch.exp(-torch.cdist(coords, coords).square() / sigma ** 2)
    if official:
        return (weight / weight.sum(-1))[:size, :size]
    return weight / weight.sum(-1, keepdim=True)


def soft_target_cross_entropy(logits: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                              targets: torch.Tensor) -> torch.Tensor:
    """``sum(weight * CE(logits, targets[positions])) / sum(weight)``: logits [B, K, L], positions [B, K] (the
    true position of each token), weight [B, K] (0 where the position was not dropped), targets [L, L]. Plain
    PyTorch in at least fp32 (docs/methods/droppos.md has the measurement that says it need not be fused)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_prob = F.log_softmax(logits.to(dtype), dim=-1)
    soft = F.embedding(positions, targets.to(dtype))
    ce = -(soft * log_prob).sum(-1)
    weight = weight.to(dtype)
    return (ce * weight).sum() / weight.sum()


def within_one_cell(pred: torch.Tensor, true: torch.Tensor, grid: int) -> torch.Tensor:
    """True where the predicted position is the true one or one of its 8 neighbours."""
    return ((pred // grid - true // grid).abs() <= 1) & ((pred % grid - true % grid).abs() <= 1)


class Draw(NamedTuple):
    """One step's random draws: the patch mask, the position mask over the visible tokens (in the order
    of ``masking.ids_keep``) and, for ``wrong_pos``, the visible slot whose position each token gets."""
    masking: kernels.Masking
    pos_masking: kernels.Masking
    pos_source: torch.Tensor | None   # [B, K] slot index (wrong_pos) or None


class DropPosNet(nn.Module):
    """The encoder, the learnable position mask token, the position decoder (no position embedding, no mask
    tokens, Linear to L logits) and, with ``multi_task``, MAE's pixel decoder."""

    def __init__(self, cfg, multi_task: bool):
        super().__init__()
        width = cfg.dims[0]
        self.encoder = build_vit(cfg)
        self.num_patches = self.encoder.num_patches
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_pos_token, std=0.02)
        # the patch embedding without positions goes through embed_visible_patches with a zero table
        self.register_buffer("no_pos", torch.zeros(self.num_patches, width), persistent=False)
        self.decoder_embed = nn.Linear(width, cfg.decoder_dim)
        init_mae_weights(self.decoder_embed)
        self.decoder = DecoderStack(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, self.num_patches,
                                    cfg.mlp_ratio, cfg.attn_backend)
        self.pixel = None
        if multi_task:
            self.pixel = nn.ModuleDict({
                "embed": nn.Linear(width, cfg.decoder_dim),
                "decoder": DecoderStack(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.patch_dim,
                                        cfg.mlp_ratio, cfg.attn_backend)})
            init_mae_weights(self.pixel["embed"])
            self.pixel_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
            nn.init.normal_(self.pixel_mask_token, std=0.02)
            self.register_buffer("pixel_pos_embed", sincos_pos_embed(cfg.decoder_dim, self.encoder.grid))

    def positions_of_visible(self, draw: Draw, fill: torch.Tensor | None) -> torch.Tensor:
        """[B, K, D] what each visible token gets as position: its own sin-cos embedding where kept, ``fill``
        (the mask token, or zeros) where dropped; with ``fill=None`` (wrong_pos) the embedding of the
        position of ``draw.pos_source``'s slot."""
        ids_keep = draw.masking.ids_keep
        table = self.encoder.pos_embed[:, 1:].expand(ids_keep.shape[0], -1, -1)
        if fill is None:
            return kernels.gather_tokens(table, torch.gather(ids_keep, 1, draw.pos_source))
        kept_slots = draw.pos_masking.ids_keep
        kept = kernels.gather_tokens(table, torch.gather(ids_keep, 1, kept_slots))
        return kernels.scatter_tokens(kept, kept_slots, ids_keep.shape[1], fill)

    def encode(self, imgs: torch.Tensor, draw: Draw, fill: torch.Tensor | None) -> torch.Tensor:
        """[B, 1 + K, D]: the visible patches, embedded without position, plus their (possibly dropped) one."""
        e = self.encoder
        x = kernels.embed_visible_patches(imgs, draw.masking.ids_keep, e.patch_embed.weight, e.patch_embed.bias,
                                          self.no_pos, e.patch_size)
        return e.encode_tokens(x + self.positions_of_visible(draw, fill).to(x.dtype))

    def position_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, K, L]: for every visible token, logits over the L grid positions."""
        return self.decoder(self.decoder_embed(latent))

    def reconstruct_pixels(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """[B, L, patch_dim]: MAE's decoder (mask tokens, fixed sin-cos positions) on the same latent."""
        x = self.pixel["embed"](latent)
        patches = kernels.scatter_tokens(x[:, 1:], ids_keep, self.num_patches, self.pixel_mask_token)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pixel_pos_embed.to(x.dtype)
        return self.pixel["decoder"](x)


def cls_similarity_weights(tokens: torch.Tensor, ids_keep: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """[B, K] attentive-reconstruction weights: softmax over patches of cos(cls, patch) / temperature, restricted
    to the visible patches ``ids_keep`` and renormalised (``ids_keep=None``: ``tokens`` holds only the visible
    ones). Restricting a softmax and renormalising is the softmax of the restricted logits, so that is what is
    computed."""
    tokens = tokens.float() if tokens.dtype in (torch.float16, torch.bfloat16) else tokens
    cos = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)
    if ids_keep is not None:
        cos = torch.gather(cos, 1, ids_keep)
    return torch.softmax(cos / temperature, dim=-1)


@register
class DropPos(Objective):
    name = "droppos"
    Settings = DropPosSettings
    presets = ("droppos_digits", "droppos_vit_base_800ep")

    def __init__(self, settings: DropPosSettings, model):
        super().__init__(settings, model)
        self.net = DropPosNet(model, settings.multi_task)
        self.grid = model.img_size // model.patch_size
        self.num_patches = self.grid ** 2
        self.visible = kernels.masking.num_visible(self.num_patches, settings.mask_ratio)
        self.sigma = settings.sigma
        self._targets: dict = {}

    @property
    def trainable(self) -> nn.Module:
        return self.net

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @classmethod
    def random_encoder(cls, settings, model):
        return build_vit(model)   # what DropPosNet builds first, without its decoders

    def on_epoch_start(self, ctx: StepContext) -> None:
        s = self.settings
        self.sigma = sigma_at(s.sigma, s.sigma_decay, ctx.epoch, ctx.epochs)

    def targets(self, sigma: float, device, dtype) -> torch.Tensor:
        """The [L, L] smoothed targets at ``sigma``, cached per (sigma, device, dtype)."""
        key = (sigma, str(device), dtype)
        if key not in self._targets:
            s = self.settings
            matrix = smoothing_matrix(self.grid, sigma, s.official_smoothing, self.model_cfg.img_size // self.grid)
            self._targets = {key: matrix.to(device=device, dtype=dtype)}   # one sigma per epoch: keep the last
        return self._targets[key]

    def draw(self, imgs: torch.Tensor, generator: torch.Generator) -> Draw:
        batch, device = imgs.shape[0], imgs.device
        masking = kernels.random_masking(batch, self.num_patches, self.settings.mask_ratio, generator=generator,
                                         device=device)
        pos_masking = kernels.random_masking(batch, self.visible, self.settings.pos_mask_ratio, generator=generator,
                                             device=device)
        source = None
        if self.settings.mask_token_type == "wrong_pos":
            # each dropped token takes the position of another dropped token (a random permutation of them)
            dropped = pos_masking.ids_masked
            perm = torch.argsort(torch.rand(dropped.shape, generator=generator, device=device), dim=1)
            source = torch.arange(self.visible, device=device).repeat(batch, 1)
            source.scatter_(1, dropped, torch.gather(dropped, 1, perm))
        return Draw(masking, pos_masking, source)

    def fill(self, like: torch.Tensor) -> torch.Tensor | None:
        kind = self.settings.mask_token_type
        if kind == "param":
            return self.net.mask_pos_token
        return torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device) if kind == "zeros" else None

    @torch.no_grad()
    def guide_weights(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """[B, K] the official attentive weights: the current encoder, without autograd, on the whole image."""
        return cls_similarity_weights(self.net.encoder(imgs), ids_keep, self.settings.attn_temperature)

    def loss_weights(self, imgs: torch.Tensor, draw: Draw, latent: torch.Tensor) -> torch.Tensor:
        dropped = draw.pos_masking.mask
        if not self.settings.attn_guide:
            return dropped.to(latent.dtype)
        if self.settings.attn_source == "full":
            w = self.guide_weights(imgs, draw.masking.ids_keep)
        else:   # the training forward's own (detached) tokens: no extra pass
            w = cls_similarity_weights(latent.detach(), None, self.settings.attn_temperature)
        return dropped.to(w.dtype) * w

    def forward(self, imgs, ctx):
        draw = self.draw(imgs, ctx.generator)
        latent = self.net.encode(imgs, draw, self.fill(self.net.mask_pos_token))
        logits = self.net.position_logits(latent)
        weight = self.loss_weights(imgs, draw, latent)
        sigma = sigma_at(self.settings.sigma, self.settings.sigma_decay, ctx.epoch, ctx.epochs)
        targets = self.targets(sigma, logits.device, torch.promote_types(logits.dtype, torch.float32))
        ids_keep = draw.masking.ids_keep
        loss_pos = soft_target_cross_entropy(logits, ids_keep, weight, targets)
        dropped = draw.pos_masking.mask
        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == ids_keep) & dropped
            accuracy = hit.sum() / dropped.sum()
        metrics = {"loss_pos": loss_pos.detach(), "pos_acc": accuracy}
        if not self.settings.multi_task:
            return loss_pos, metrics
        pred = self.net.reconstruct_pixels(latent, ids_keep)
        target = kernels.patchify(imgs, self.model_cfg.patch_size)
        loss_mae, _ = kernels.patch_loss(pred, target, draw.masking.mask, norm_pix=self.settings.norm_pix)
        metrics["loss_rec"] = loss_mae.detach()
        return self.settings.pos_weight * loss_pos + loss_mae, metrics

    def flops_per_image(self) -> float:
        m, s = self.model_cfg, self.settings
        width, depth, _ = m.dims
        tokens = self.visible + 1
        fwd = encoder_flops(width, depth, m.mlp_ratio, tokens, m.patch_dim, self.visible)
        fwd += decoder_flops(m, tokens) + 2 * tokens * m.decoder_dim * (width + self.num_patches - m.patch_dim)
        total = 3 * fwd
        if s.multi_task:
            total += 3 * (decoder_flops(m, self.num_patches + 1) + 2 * tokens * width * m.decoder_dim)
        if s.attn_guide and s.attn_source == "full":   # forward only
            total += encoder_flops(width, depth, m.mlp_ratio, self.num_patches + 1, m.patch_dim, self.num_patches)
        return total

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        """Position prediction on held-out images with a fixed random draw: top-1 and within-one-cell accuracy
        over the tokens whose position was dropped, their plain (one-hot) cross-entropy, and a picture."""
        draw = self.draw(imgs, generator)
        latent = self.net.encode(imgs, draw, self.fill(self.net.mask_pos_token))
        logits = self.net.position_logits(latent).float()
        ids_keep, dropped = draw.masking.ids_keep, draw.pos_masking.mask
        pred = logits.argmax(dim=-1)
        n = dropped.sum().clamp(min=1)
        eye = torch.eye(self.num_patches, device=logits.device)
        metrics = {
            "val_pos_acc": float(((pred == ids_keep) & dropped).sum() / n),
            "val_pos_acc_within1": float((within_one_cell(pred, ids_keep, self.grid) & dropped).sum() / n),
            "val_pos_ce": float(soft_target_cross_entropy(logits, ids_keep, dropped.float(), eye)),
        }
        out = EvalOutput(metrics=metrics)
        if self.settings.multi_task:
            pixels = self.net.reconstruct_pixels(latent, ids_keep)
            target = kernels.patchify(imgs, self.model_cfg.patch_size)
            loss, per_patch = kernels.patch_loss(pixels, target, draw.masking.mask, norm_pix=self.settings.norm_pix)
            metrics["val_loss_rec"] = float(loss)
            out = EvalOutput(metrics=metrics, images=imgs, mask=draw.masking.mask, prediction=pixels,
                             prediction_normalized=self.settings.norm_pix, patch_losses=per_patch)
        picture = (imgs[:8].float().cpu(), ids_keep[:8].cpu(), dropped[:8].cpu(), pred[:8].cpu())
        out.pictures["positions"] = lambda path: save_position_picture(path, *picture, self.model_cfg.patch_size)
        return out


def save_position_picture(path, imgs: torch.Tensor, ids_keep: torch.Tensor, dropped: torch.Tensor,
                          pred: torch.Tensor, patch_size: int):
    """One row per image: the image | the visible patches at their true positions (the ones whose position
    was dropped tinted red) | every visible patch placed where the model predicts it (kept positions at
    their true cell) | the dropped tokens' true cells coloured by the prediction: green exact, yellow one
    cell off, red further (unpredicted cells grey)."""
    n, _, height, width = imgs.shape
    grid = height // patch_size
    (shown,) = viz._displayable(imgs, [], None, None)
    shown = shown.expand(-1, 3, -1, -1)
    cells = shown.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)   # [N, 3, g, g, p, p]
    blank = torch.tensor(viz.MASK_RGB).view(3, 1, 1)
    true_view, pred_view, errors = (torch.empty_like(shown) for _ in range(3))
    colours = {0: (0.1, 0.75, 0.2), 1: (0.95, 0.8, 0.1), 2: (0.85, 0.15, 0.15)}
    for view in (true_view, pred_view, errors):
        view.copy_(blank.expand_as(view[0]).unsqueeze(0).expand_as(view))
    for b in range(n):   # a picture of at most 8 images: plain loops
        for k, pos in enumerate(ids_keep[b].tolist()):
            r, c = divmod(pos, grid)
            patch = cells[b, :, r, c]
            where = pred[b, k].item() if dropped[b, k] else pos
            pr, pc = divmod(where, grid)
            tinted = patch * 0.6 + torch.tensor([0.4, 0.0, 0.0]).view(3, 1, 1) if dropped[b, k] else patch
            true_view[b, :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = tinted
            pred_view[b, :, pr * patch_size:(pr + 1) * patch_size, pc * patch_size:(pc + 1) * patch_size] = patch
            if dropped[b, k]:
                off = max(abs(pr - r), abs(pc - c))
                errors[b, :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = \
                    torch.tensor(colours[min(off, 2)]).view(3, 1, 1)
    columns = [viz._to_rgb_uint8(x) for x in (shown, true_view, pred_view, errors)]
    return viz._save_grid(path, ["image", "visible (red: dropped)", "placed by prediction", "error"], columns)


__all__ = ["DropPos", "DropPosSettings", "smoothing_matrix", "soft_target_cross_entropy", "sigma_at",
           "cls_similarity_weights", "within_one_cell", "save_position_picture"]
