"""data2vec 2.0 (Baevski, Babu, Hsu and Auli, 2022; github.com/facebookresearch/fairseq, examples/data2vec) for
images: the student predicts, from a few visible patches, the contextualised features an EMA teacher computes
on the whole image.

Per step, for B images and M = ``clones`` masked copies of each ("clone batch"):

1. the images are patch-embedded once (+ fixed sin-cos positions) and repeated M times; each copy gets its own
   inverse block mask (``kernels.inverse_block_masking``: the same number of visible patches in every row) and
   only its visible tokens are gathered (``kernels.gather_tokens``) and encoded, after the extra (cls) token;
2. the decoder gets the encoded visible tokens back at their positions and fresh Gaussian noise
   N(0, ``noise_std``^2) at the masked ones (``kernels.scatter_tokens``), and runs grouped convolutions;
3. the EMA teacher encodes each full image **once** (shared by its M copies); the targets are the FFN outputs
   (before the residual add) of its top ``top_k_layers`` blocks, each instance-normed over the patch tokens,
   averaged, then layer-normed over channels; the cls target is their mean over tokens;
4. loss = mean over masked tokens of sum_c (pred - y)^2 / sqrt(D)
        + ``cls_weight`` * sum over the B*M rows of sum_c (cls - y_cls)^2 / sqrt(D).

The second term is a **sum** over the rows of this forward (the official criterion multiplies the cls loss by
the number of masked tokens and then divides everything by it), so its weight relative to a per-row mean is
``cls_weight * B * M`` per device (2.56 at the official 16 images x 16 clones): reproduced by default
(``cls_reduction = "sum"``); ``"mean"`` takes the per-row mean instead. Under DDP the gradients are averaged over
ranks, which turns the sum into (1 / world size) x the sum over all rows, as in the official code.

The teacher's decay ramps linearly from ``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_end_step`` training
steps, then stays; it is applied after every optimizer step. docs/methods/data2vec2.md has the details.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import ObjectiveSettings, is_resnet, require
from sslpt.engine.ema import EMATeacher
from sslpt.engine.models.data2vec2 import Data2Vec2Model, build_data2vec2_encoder
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext


@dataclass(kw_only=True)
class Data2Vec2Settings(ObjectiveSettings):
    mask_ratio: float = 0.8
    mask_block: int = 3             # side of the square blocks the visible set is grown from
    mask_adjust: float = 0.07       # extra block centres, as a fraction of the patches
    clones: int = 16                # masked copies per image, sharing one teacher pass
    prenet_depth: int = 2           # first blocks that never give targets (the official "context encoder")
    top_k_layers: int = 0           # targets average the FFN outputs of the last k blocks; 0: all but the pre-net
    noise_std: float = 0.01         # decoder input at the masked positions: N(0, noise_std^2), redrawn per step
    decoder_kernel: int = 3
    decoder_groups: int = 16
    loss_beta: float = 0.0          # 0: squared error; > 0: smooth-L1 with this beta
    loss_scale: float = 0.0         # 0: 1 / sqrt(width), the official default
    cls_weight: float = 0.01
    cls_reduction: Literal["sum", "mean"] = "sum"   # sum over rows (official, batch-dependent) or per-row mean
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000   # training steps (optimizer steps with train.accum_steps = 1)

    def check(self, cfg) -> None:
        key, m = self.key, cfg.model
        require(not is_resnet(m), f"data2vec2 trains a ViT: model.arch must be a ViT, got {m.arch!r}")
        width, depth, _ = m.dims
        require(0.0 < self.mask_ratio < 1.0, f"{key('mask_ratio')} must be in (0, 1), got {self.mask_ratio}")
        require(int(m.num_patches * (1 - self.mask_ratio)) >= 1,
                f"{key('mask_ratio')}={self.mask_ratio} leaves no visible patch of {m.num_patches}")
        require(int(m.num_patches * (1 - self.mask_ratio)) < m.num_patches,
                f"{key('mask_ratio')}={self.mask_ratio} masks no patch of {m.num_patches}")
        require(self.mask_block >= 1, f"{key('mask_block')} must be >= 1, got {self.mask_block}")
        require(self.mask_adjust >= 0, f"{key('mask_adjust')} must be >= 0, got {self.mask_adjust}")
        require(self.clones >= 1, f"{key('clones')} must be >= 1, got {self.clones}")
        require(0 <= self.prenet_depth < depth,
                f"{key('prenet_depth')} must be in [0, model.depth={depth}), got {self.prenet_depth}")
        require(0 <= self.top_k_layers <= depth - self.prenet_depth,
                f"{key('top_k_layers')} must be in [0, {depth - self.prenet_depth}] (model.depth - prenet_depth; "
                f"0: all of them), got {self.top_k_layers}")
        require(self.noise_std >= 0, f"{key('noise_std')} must be >= 0, got {self.noise_std}")
        require(self.decoder_kernel >= 1 and self.decoder_kernel % 2 == 1,
                f"{key('decoder_kernel')} must be an odd positive integer, got {self.decoder_kernel}")
        require(self.decoder_groups >= 1 and width % self.decoder_groups == 0
                and m.decoder_dim % self.decoder_groups == 0,
                f"{key('decoder_groups')}={self.decoder_groups} must divide the encoder width {width} and "
                f"model.decoder_dim={m.decoder_dim}")
        require(self.loss_beta >= 0, f"{key('loss_beta')} must be >= 0, got {self.loss_beta}")
        require(self.loss_scale >= 0, f"{key('loss_scale')} must be >= 0 (0: 1/sqrt(width)), got {self.loss_scale}")
        require(self.cls_weight >= 0, f"{key('cls_weight')} must be >= 0, got {self.cls_weight}")
        for name in ("ema_decay", "ema_end_decay"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{key(name)} must be in [0, 1], got {value}")
        require(self.ema_anneal_end_step >= 0,
                f"{key('ema_anneal_end_step')} must be >= 0, got {self.ema_anneal_end_step}")


def data2vec2_decay(updates: int, start: float, end: float, anneal_end: int) -> float:
    """The teacher's decay after ``updates`` optimizer steps: linear from ``start`` to ``end``, then flat."""
    if anneal_end <= 0 or updates >= anneal_end:
        return end
    return start + (end - start) * updates / anneal_end


def build_targets(ffn_outputs: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """[B, L, D] fp32 targets from the teacher's per-block FFN outputs (each [B, L, D], patch tokens only):
    the last ``top_k``, each instance-normed over tokens (per sample and channel), averaged, then layer-normed
    over channels (no affine, eps 1e-5)."""
    layers = ffn_outputs[-top_k:]
    normed = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in layers]
    y = torch.stack(normed).mean(dim=0)
    return F.layer_norm(y, y.shape[-1:])


def feature_distance(pred: torch.Tensor, target: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """Per row, summed over channels: squared error (beta = 0) or smooth-L1, times ``scale``. [..., D] -> [...]."""
    pred = pred.float()
    if beta == 0:
        per_element = (pred - target) ** 2
    else:
        per_element = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return per_element.sum(dim=-1) * scale


@register
class Data2Vec2(Objective):
    name = "data2vec2"
    Settings = Data2Vec2Settings
    presets = ("data2vec2_digits", "data2vec2_vit_base_150ep")

    def __init__(self, settings: Data2Vec2Settings, model):
        super().__init__(settings, model)
        self.model = Data2Vec2Model(model, settings.prenet_depth, settings.decoder_kernel, settings.decoder_groups)
        # the teacher copies everything but the decoder: patch embedding, cls token, input norm and blocks
        self.teacher = EMATeacher(self.model, skip=("decoder",))
        width = model.dims[0]
        self.scale = settings.loss_scale or 1.0 / math.sqrt(width)
        self.decay = settings.ema_decay

    @classmethod
    def random_encoder(cls, settings, model):
        return build_data2vec2_encoder(model, settings.prenet_depth)

    def masking(self, rows: int, generator: torch.Generator, device) -> kernels.Masking:
        s = self.settings
        return kernels.inverse_block_masking(rows, self.model.encoder.grid, s.mask_ratio, s.mask_block,
                                             s.mask_adjust, generator=generator, device=device)

    @torch.no_grad()
    def teacher_targets(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch targets [B, L, D] fp32, cls targets [B, D]) from one teacher pass over the full images."""
        encoder = self.teacher.model.encoder
        _, ffn_outputs = encoder.encode_tokens(encoder.embed(imgs), return_ffn=True)
        y = build_targets([t[:, 1:] for t in ffn_outputs], self.settings.top_k_layers or len(ffn_outputs))
        return y, y.mean(dim=1)

    def student(self, imgs: torch.Tensor, masking: kernels.Masking, generator: torch.Generator):
        """(predicted features of every position [B*M, L, D], the cls outputs [B*M, D])."""
        encoder, clones = self.model.encoder, self.settings.clones
        tokens = encoder.embed(imgs).repeat_interleave(clones, dim=0)   # embedded once per image
        out = encoder.encode_tokens(kernels.gather_tokens(tokens, masking.ids_keep))
        visible = out[:, 1:]
        rows, num_patches, width = visible.shape[0], encoder.num_patches, visible.shape[-1]
        h = kernels.scatter_tokens(visible, masking.ids_keep, num_patches, visible.new_zeros(width))
        noise = torch.randn(rows, num_patches, width, generator=generator, device=h.device)
        h = h + (noise * self.settings.noise_std).to(h.dtype) * masking.mask.unsqueeze(-1).to(h.dtype)
        return self.model.decoder(h), out[:, 0]

    def losses(self, imgs: torch.Tensor, generator: torch.Generator):
        """(loss, regression loss, cls loss, targets, predictions at the masked positions)."""
        s = self.settings
        batch, clones = imgs.shape[0], s.clones
        masking = self.masking(batch * clones, generator, imgs.device)
        y, y_cls = self.teacher_targets(imgs)
        pred, cls = self.student(imgs, masking, generator)
        ids_masked = masking.ids_masked
        source = torch.arange(batch * clones, device=imgs.device) // clones   # the image each row is a copy of
        target = y[source.unsqueeze(1), ids_masked]                             # [B*M, N_m, D]
        pred_masked = kernels.gather_tokens(pred, ids_masked)
        regression = feature_distance(pred_masked, target, s.loss_beta, self.scale).mean()
        per_row = feature_distance(cls, y_cls[source], s.loss_beta, self.scale)
        cls_loss = per_row.sum() if s.cls_reduction == "sum" else per_row.mean()
        loss = regression + s.cls_weight * cls_loss
        return loss, regression, cls_loss, target, pred_masked

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        loss, regression, cls_loss, _, _ = self.losses(imgs, ctx.generator)
        return loss, {"loss_reg": regression.detach(), "loss_cls": cls_loss.detach(),
                      "ema_decay": torch.tensor(self.decay, device=loss.device)}

    def after_optimizer_step(self, ctx: StepContext) -> None:
        s = self.settings
        self.decay = data2vec2_decay(ctx.step + 1, s.ema_decay, s.ema_end_decay, s.ema_anneal_end_step)
        if self.decay < 1:
            self.teacher.update(self.decay)

    def on_epoch_start(self, ctx: StepContext) -> None:
        s = self.settings   # the decay the next update will use (for the log, and after a resume)
        self.decay = data2vec2_decay(ctx.step, s.ema_decay, s.ema_end_decay, s.ema_anneal_end_step)

    def flops_per_image(self) -> float:
        """Per image: the student on M copies of the visible tokens (forward + backward, the patch embedding
        once), the decoder on M copies, and one teacher forward over all tokens."""
        encoder, decoder, clones = self.model.encoder, self.model.decoder, self.settings.clones
        keep = int(encoder.num_patches * (1 - self.settings.mask_ratio))
        embed = 2 * encoder.num_patches * encoder.patch_embed.weight[0].numel() * encoder.embed_dim
        student = clones * (encoder.flops(keep + 1, 0) + decoder.flops()) + embed
        teacher = encoder.flops(encoder.num_patches + 1, encoder.num_patches)
        return 3 * student + teacher

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        """Losses on held-out images, and the spread of targets and predictions: a collapsed teacher shows as
        ``target_std`` near 0 (the official image recipe never aborts on it)."""
        loss, regression, cls_loss, target, pred = self.losses(imgs, generator)
        return EvalOutput(metrics={
            "val_loss": float(loss), "val_loss_reg": float(regression), "val_loss_cls": float(cls_loss),
            "target_std": float(target.float().std(dim=(0, 1)).mean()),
            "pred_std": float(pred.float().std(dim=(0, 1)).mean()), "ema_decay": self.decay})
