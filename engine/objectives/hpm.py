"""HPM, Hard Patches Mining (OBJECTIVES.md section 2).

Per step: the EMA teacher scores every patch of the unmasked image; the mask is made
of the ``K`` patches it expects to be hardest plus random ones (easy-to-hard: K grows
with the epoch); the student reconstructs the masked patches and, with a second
decoder, predicts its own per-patch loss, trained with a pairwise relative objective.

Departures from the official code, all cost-free: the teacher has no reconstruction
decoder (its output was unused) and is not run while K = 0 (the mask is then random).
"""
from __future__ import annotations

import torch

import kernels
from engine.ema import EMATeacher, ema_decay
from engine.models.vit import encoder_flops

from . import register
from .base import StepContext
from .mae import MAE, decoder_flops


def num_hard_patches(num_masked: int, epoch: int, total_epochs: int, alpha_T: float = 0.5) -> int:
    """``int(num_masked * alpha)`` with ``alpha = (epoch + 1) / T * alpha_T``, as ``generate_mask`` does."""
    alpha = (epoch + 1) / total_epochs * alpha_T
    return min(int(num_masked * alpha), num_masked)


def standardized_mse(pred_score: torch.Tensor, true_loss: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's non-relative ablation: MSE to the per-image standardised true losses."""
    t = true_loss.detach().float()
    t = (t - t.mean(dim=1, keepdim=True)) / (t.var(dim=1, keepdim=True, unbiased=True) + eps).sqrt()
    return ((pred_score.float() - t) ** 2).mean()


@register("hpm")
class HPM(MAE):
    loss_predictor = True

    def __init__(self, cfg):
        super().__init__(cfg)
        o = cfg.objective
        self.total_epochs = cfg.train.epochs
        self.alpha_T = o.alpha_T
        self.rec_weight, self.pred_weight = o.rec_weight, o.pred_weight
        self.relative, self.stable = o.relative, o.stable_relative
        self.ema_schedule = (o.ema_decay_start, o.ema_decay_end, o.ema_ramp_epochs)
        self.teacher = EMATeacher(self.model, skip=("decoder",))
        self.decay = o.ema_decay_start
        keep = kernels.masking.num_visible(self.model.num_patches, self.mask_ratio)
        self.num_masked = self.model.num_patches - keep

    def on_epoch_start(self, epoch: int) -> None:
        self.decay = ema_decay(epoch, self.total_epochs, *self.ema_schedule)

    def after_optimizer_step(self, epoch: int) -> None:
        self.teacher.update(self.decay)

    def num_hard(self, epoch: int) -> int:
        return num_hard_patches(self.num_masked, epoch, self.total_epochs, self.alpha_T)

    @torch.no_grad()
    def teacher_scores(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L] the teacher's predicted loss of every patch, on the unmasked image."""
        teacher = self.teacher.model
        return teacher.predict_loss(teacher.decoder_input(teacher.encode(imgs)))

    def masking(self, imgs: torch.Tensor, ctx: StepContext) -> kernels.Masking:
        k = self.num_hard(ctx.epoch)
        if k == 0:
            return super().masking(imgs, ctx)
        return kernels.hard_patch_masking(self.teacher_scores(imgs), self.mask_ratio, k, generator=ctx.generator)

    def prediction_loss(self, score: torch.Tensor, per_patch: torch.Tensor, masking: kernels.Masking):
        ids = masking.ids_masked
        pred_m = torch.gather(score, 1, ids)
        true_m = torch.gather(per_patch.detach(), 1, ids)
        if self.relative:
            return kernels.relative_loss(pred_m, true_m, stable=self.stable)
        return standardized_mse(pred_m, true_m)

    def forward(self, imgs, ctx):
        masking = self.masking(imgs, ctx)
        _, per_patch, rec_loss, h = self.reconstruct(imgs, masking)
        pred_loss = self.prediction_loss(self.model.predict_loss(h), per_patch, masking)
        loss = self.rec_weight * rec_loss + self.pred_weight * pred_loss
        return loss, {"loss_rec": rec_loss.detach(), "loss_pred": pred_loss.detach()}

    def flops_per_image(self) -> float:
        m = self.cfg.model
        width, depth, _ = m.dims
        tokens = m.num_patches + 1
        teacher = encoder_flops(width, depth, m.mlp_ratio, tokens, m.patch_dim, m.num_patches)
        teacher += decoder_flops(self.cfg, tokens)
        return super().flops_per_image() + 3 * decoder_flops(self.cfg, tokens) + teacher

    @torch.no_grad()
    def evaluate(self, imgs, generator):
        """Random mask on held-out images: reconstruction, the teacher's scores and how well
        the student's and the teacher's predicted losses rank the actual ones."""
        from engine.eval import rowwise_spearman

        masking = kernels.random_masking(imgs.shape[0], self.model.num_patches, self.mask_ratio,
                                         generator=generator, device=imgs.device)
        pred, per_patch, loss, h = self.reconstruct(imgs, masking)
        student = self.model.predict_loss(h)
        teacher = self.teacher_scores(imgs)
        ids = masking.ids_masked
        actual = torch.gather(per_patch, 1, ids)
        return {
            "imgs": imgs, "mask": masking.mask, "pred": pred, "true_loss": per_patch, "pred_score": teacher,
            "metrics": {
                "val_loss_rec": float(loss),
                "spearman_student": rowwise_spearman(torch.gather(student, 1, ids).float(), actual),
                "spearman_teacher": rowwise_spearman(torch.gather(teacher, 1, ids).float(), actual),
            },
        }
