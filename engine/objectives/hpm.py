"""HPM, Hard Patches Mining (Wang et al., CVPR 2023; github.com/Haochen-Wang409/HPM).

Per step: the EMA teacher scores every patch of the unmasked image; the mask is made of the ``K`` patches it
expects to be hardest plus random ones (easy-to-hard: K grows with the epoch); the student reconstructs the
masked patches and, with a second decoder, predicts its own per-patch loss, trained with a pairwise relative
objective. docs/methods/hpm.md has the details and where this departs from the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sslpt import kernels
from sslpt.engine.config import require
from sslpt.engine.ema import EMATeacher, ema_decay
from sslpt.engine import viz
from sslpt.engine.eval import rowwise_spearman, spearman_per_row
from sslpt.engine.models.vit import encoder_flops
from sslpt.engine.registry import register

from .base import EvalOutput, StepContext
from .mae import MAE, MAESettings, decoder_flops


@dataclass(kw_only=True)
class HPMSettings(MAESettings):
    alpha_T: float = 0.5            # final fraction of the masked set chosen as hard patches
    alpha_ramp: float = 1.0         # fraction of the run over which K ramps up to alpha_T (1: official; 0: no ramp)
    rec_weight: float = 1.0
    pred_weight: float = 1.0
    relative: bool = True           # False: the paper's ablation, MSE to per-image standardised losses
    stable_relative: bool = True    # False: the official log(sigmoid + 1e-6) form
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_epochs: int = 100      # shortened to the run's length for runs under 100 epochs
    ema_schedule: Literal["epoch", "step"] = "epoch"   # the decay moves once per epoch (official) or every step
    tie_break: Literal["random", "position"] = "random"   # among equally-scored patches (position: lower first)

    def check(self, cfg) -> None:
        super().check(cfg)
        key = self.key
        require(0.0 <= self.alpha_T <= 1.0, f"{key('alpha_T')} must be in [0, 1], got {self.alpha_T}")
        require(0.0 <= self.alpha_ramp <= 1.0, f"{key('alpha_ramp')} must be in [0, 1], got {self.alpha_ramp}")
        require(self.rec_weight >= 0 and self.pred_weight >= 0,
                f"{key('rec_weight')} and {key('pred_weight')} must be >= 0")
        for name in ("ema_decay_start", "ema_decay_end"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{key(name)} must be in [0, 1), got {value}")
        require(self.ema_ramp_epochs >= 0, f"{key('ema_ramp_epochs')} must be >= 0, got {self.ema_ramp_epochs}")


def num_hard_patches(num_masked: int, epoch: int, total_epochs: int, alpha_T: float = 0.5,
                     ramp: float = 1.0) -> int:
    """``int(num_masked * alpha)`` with ``alpha = (epoch + 1) / T * alpha_T``, as the official mask generator.

    ``ramp < 1`` reaches ``alpha_T`` after that fraction of the run and stays there; ``ramp = 0`` uses
    ``alpha_T`` from the first epoch (no easy-to-hard curriculum)."""
    alpha = alpha_T if ramp == 0 else min((epoch + 1) / (total_epochs * ramp), 1.0) * alpha_T
    return min(int(num_masked * alpha), num_masked)


def standardized_mse(pred_score: torch.Tensor, true_loss: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's non-relative ablation: MSE to the per-image standardised true losses."""
    t = true_loss.detach().float()
    t = (t - t.mean(dim=1, keepdim=True)) / (t.var(dim=1, keepdim=True, unbiased=True) + eps).sqrt()
    return ((pred_score.float() - t) ** 2).mean()


@register
class HPM(MAE):
    name = "hpm"
    Settings = HPMSettings
    presets = ("hpm_digits", "hpm_vit_base_800ep")
    loss_predictor = True

    def __init__(self, settings: HPMSettings, model):
        super().__init__(settings, model)
        # the teacher never uses the reconstruction decoder: not copying it saves its memory and forward pass
        self.teacher = EMATeacher(self.model, skip=("decoder",))
        self.decay = settings.ema_decay_start
        self.epoch_ctx: StepContext | None = None   # the epoch under way (for the schedule of evaluate)
        keep = kernels.masking.num_visible(self.model.num_patches, self.mask_ratio)
        self.num_masked = self.model.num_patches - keep

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.epoch_ctx = ctx
        s = self.settings
        self.decay = ema_decay(ctx.epoch, ctx.epochs, s.ema_decay_start, s.ema_decay_end, s.ema_ramp_epochs)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        s = self.settings
        if s.ema_schedule == "step":   # the ramp evaluated at this step's fractional epoch
            self.decay = ema_decay(ctx.progress, ctx.epochs, s.ema_decay_start, s.ema_decay_end, s.ema_ramp_epochs)
        self.teacher.update(self.decay)

    def num_hard(self, ctx: StepContext) -> int:
        s = self.settings
        return num_hard_patches(self.num_masked, ctx.epoch, ctx.epochs, s.alpha_T, s.alpha_ramp)

    @torch.no_grad()
    def teacher_scores(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L] the teacher's predicted loss of every patch, on the unmasked image."""
        teacher = self.teacher.model
        return teacher.predict_loss(teacher.decoder_input(teacher.encode(imgs)))

    def masking(self, imgs: torch.Tensor, ctx: StepContext) -> kernels.Masking:
        k = self.num_hard(ctx)
        if k == 0:   # the mask is random: the teacher's scores would not be used
            return super().masking(imgs, ctx)
        return kernels.hard_patch_masking(self.teacher_scores(imgs), self.mask_ratio, k, generator=ctx.generator,
                                          tie_break=self.settings.tie_break)

    def prediction_loss(self, score: torch.Tensor, per_patch: torch.Tensor, masking: kernels.Masking):
        ids = masking.ids_masked
        pred_m = torch.gather(score, 1, ids)
        true_m = torch.gather(per_patch.detach(), 1, ids)
        if self.settings.relative:
            return kernels.relative_loss(pred_m, true_m, stable=self.settings.stable_relative)
        return standardized_mse(pred_m, true_m)

    def forward(self, imgs, ctx):
        masking = self.masking(imgs, ctx)
        _, per_patch, rec_loss, h = self.reconstruct(imgs, masking)
        pred_loss = self.prediction_loss(self.model.predict_loss(h), per_patch, masking)
        loss = self.settings.rec_weight * rec_loss + self.settings.pred_weight * pred_loss
        return loss, {"loss_rec": rec_loss.detach(), "loss_pred": pred_loss.detach()}

    def flops_per_image(self) -> float:
        m = self.model_cfg
        width, depth, _ = m.dims
        tokens = m.num_patches + 1
        teacher = encoder_flops(width, depth, m.mlp_ratio, tokens, m.patch_dim, m.num_patches)
        teacher += decoder_flops(m, tokens)
        return super().flops_per_image() + 3 * decoder_flops(m, tokens) + teacher

    @torch.no_grad()
    def evaluate(self, imgs, generator) -> EvalOutput:
        """Metrics on a random mask (comparable across epochs): reconstruction loss and how well the student's
        and the teacher's predicted losses rank the actual ones. Pictures of the mask HPM chooses at this
        epoch: its hard patches, the teacher's scores, the actual loss on the masked patches, and where hard
        patches fall over the held-out batch."""
        masking = self.eval_masking(imgs, generator)
        _, per_patch, loss, h = self.reconstruct(imgs, masking)
        student = self.model.predict_loss(h)
        teacher = self.teacher_scores(imgs)
        ids = masking.ids_masked
        actual = torch.gather(per_patch, 1, ids)
        k = self.num_hard(self.epoch_ctx) if self.epoch_ctx is not None else 0
        metrics = {
            "val_loss_rec": float(loss),
            "spearman_student": rowwise_spearman(torch.gather(student, 1, ids).float(), actual),
            "spearman_teacher": rowwise_spearman(torch.gather(teacher, 1, ids).float(), actual),
            # near 1: every image's scores look like the batch's mean map, i.e. they mostly encode position
            "teacher_positional_corr": rowwise_spearman(teacher.float(), teacher.float().mean(0).expand_as(teacher)),
            "num_hard": k, "num_masked": self.num_masked, "mask_ratio": self.mask_ratio, "ema_decay": self.decay,
        }
        # the mask this epoch's training draws for these images
        if k:
            chosen = kernels.hard_patch_masking(teacher, self.mask_ratio, k, generator=generator,
                                                tie_break=self.settings.tie_break)
        else:
            chosen = self.eval_masking(imgs, generator)
        pred, per_patch, _, _ = self.reconstruct(imgs, chosen)
        hard = torch.zeros_like(chosen.mask, dtype=torch.bool)
        if k:
            hard.scatter_(1, chosen.ids_shuffle[:, -k:], True)
        masked_ids = chosen.ids_masked
        rho = spearman_per_row(torch.gather(teacher, 1, masked_ids).float(), torch.gather(per_patch, 1, masked_ids))
        caption = (f"K={k} hard of {self.num_masked} masked (mask ratio {self.mask_ratio:g}); Spearman "
                   f"student {metrics['spearman_student']:.2f}, teacher {metrics['spearman_teacher']:.2f}; "
                   f"teacher maps vs their mean {metrics['teacher_positional_corr']:.2f}")
        grid = self.model.encoder.grid
        frequency, mean_score = hard.float().mean(0).cpu(), teacher.float().mean(0).cpu()
        position_caption = f"K={k}, {imgs.shape[0]} images, rho vs mean {metrics['teacher_positional_corr']:.2f}"
        pictures = {"hard_positions": lambda path: viz.save_position_map(path, frequency, mean_score, grid,
                                                                         position_caption)} if k else {}
        return EvalOutput(metrics=metrics, images=imgs, mask=chosen.mask, prediction=pred,
                          prediction_normalized=self.norm_pix, patch_losses=per_patch, patch_scores=teacher,
                          hard_mask=hard, caption=caption, row_notes=[f"rho {r:.2f}" for r in rho.tolist()],
                          pictures=pictures)
