"""DINO (Caron et al., 2021; github.com/facebookresearch/dino): self-distillation with no labels, multi-crop.

Per step: 2 global views at the training size and n local views at a smaller size (``multi_crop``, made on the
device from the batch), batched per resolution in crop-major order [g1 | g2 | l1 .. ln]. The student (backbone
-> DINO head) sees every view; the teacher, an EMA of the student, sees the two global views. With the head's
L2-normalised bottleneck h and its weight-normalised prototypes W (K of them):

    teacher p_i = softmax((W_t h^t_i - c) / tau_t),   student log q_v = log_softmax(W_s h^s_v / tau_s)
    loss = mean over images and over the pairs (teacher view i, student view v), v != i, of -sum_k p_i log q_v

computed by ``kernels.prototype_cross_entropy`` from h and W, never forming the [views * B, K] logits. After the
loss the centre follows the batch mean of the raw teacher logits (all ranks): c <- m c + (1 - m) W_t mean(h^t).

Schedules as the official code: tau_t linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
``warmup_teacher_temp_epochs``, stepped per epoch; teacher momentum cosine from ``momentum_teacher`` to 1 per
iteration; lr warmup + cosine and the weight decay cosine (``optim.weight_decay_end``) per iteration; the last
layer's gradient dropped during the first ``freeze_last_layer`` epochs (then the kernel skips computing it at
all, except under torch.distributed, where DDP expects every gradient and it is computed and then dropped);
per-parameter clipping (``optim.clip_mode = "per_param"``).

The backbone is the ViT (cls token or mean of the patch tokens; position embedding resampled for local crops)
or a ResNet (global average pool), by ``model.arch``. Views: the ``ViewSettings`` fields describe the two global
crops (DINO's ``global_crops_scale`` is ``view_crop_scale``; blur 1.0 / 0.1 and solarisation 0 / 0.2 per view);
``local_*`` the local ones (blur 0.5, no solarisation). The crop is bilinear (DINO's is bicubic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from sslpt import kernels
from sslpt.engine.config import require, require_probability, require_range
from sslpt.engine.data.views import ViewAugment, multi_crop
from sslpt.engine.distributed import negatives_group
from sslpt.engine.ema import EMATeacher, cosine_momentum
from sslpt.engine.models.backbones import backbone_flops, build_backbone, global_feature, is_resnet
from sslpt.engine.models.contrastive import ViewSettings
from sslpt.engine.models.dino_head import DINOHead
from sslpt.engine.models.vit import vit_flops
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext


@dataclass(kw_only=True)
class DINOSettings(ViewSettings):
    """Defaults: DINO's ViT-S/16 recipe (2 x 224 global + 8 x 96 local crops, K = 65,536)."""
    out_dim: int = 65536                # K prototypes
    head_hidden: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_bn: bool = False
    norm_last_layer: bool = True        # prototypes of unit norm (g frozen at 1)
    pooling: Literal["cls", "mean"] = "cls"   # ViT feature fed to the head
    drop_path: float = 0.1              # student stochastic depth, linear over the blocks (ViT)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996     # cosine to 1 per iteration
    freeze_last_layer: int = 1          # epochs
    view_crop_scale: tuple[float, float] = (0.4, 1.0)    # the global crops
    local_crops: int = 8
    local_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_blur_prob: float = 0.5
    local_solarize_prob: float = 0.0

    def check(self, cfg) -> None:
        super().check(cfg)
        key = self.key
        for name in ("out_dim", "head_hidden", "bottleneck_dim", "head_layers", "local_size"):
            require(getattr(self, name) >= 1, f"{key(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            require(getattr(self, name) > 0, f"{key(name)} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_teacher_temp_epochs", "freeze_last_layer", "local_crops"):
            require(getattr(self, name) >= 0, f"{key(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("center_momentum", "momentum_teacher", "local_blur_prob", "local_solarize_prob"):
            require_probability(getattr(self, name), key(name))
        require(0 <= self.drop_path < 1, f"{key('drop_path')} must be in [0, 1), got {self.drop_path}")
        require_range(self.local_crop_scale, key("local_crop_scale"))
        require(self.local_size <= cfg.model.img_size,
                f"{key('local_size')}={self.local_size} must be <= model.img_size={cfg.model.img_size}")
        if not is_resnet(cfg.model):
            require(self.local_size % cfg.model.patch_size == 0,
                    f"{key('local_size')}={self.local_size} must be a multiple of model.patch_size="
                    f"{cfg.model.patch_size}")

    def local_spec(self) -> ViewAugment:
        global_spec = self.view_specs()[0]
        return ViewAugment(**{**global_spec.__dict__, "crop_scale": tuple(self.local_crop_scale),
                              "blur_prob": self.local_blur_prob, "solarize_prob": self.local_solarize_prob})


def teacher_temperature(epoch: int, settings: DINOSettings) -> float:
    """DINO's per-epoch table: linspace(warmup, final, warmup_epochs) (both ends included), then the final."""
    warm, final, epochs = settings.warmup_teacher_temp, settings.teacher_temp, settings.warmup_teacher_temp_epochs
    if epoch >= epochs:
        return final
    return warm if epochs == 1 else warm + (final - warm) * epoch / (epochs - 1)


class DINONet(nn.Module):
    """Backbone -> pooled feature -> DINO head; ``bottleneck(views)`` gives the head's unit vectors."""

    def __init__(self, settings: DINOSettings, model):
        super().__init__()
        self.pooling = settings.pooling
        self.encoder = build_backbone(model)
        self.head = DINOHead(self.encoder.embed_dim, settings.out_dim, settings.head_hidden, settings.bottleneck_dim,
                             settings.head_layers, settings.head_bn, settings.norm_last_layer)

    def bottleneck(self, views: list[torch.Tensor]) -> torch.Tensor:
        """[sum of the views' batches, bottleneck_dim]: each list entry is one resolution's batch."""
        features = [global_feature(self.encoder, v, self.pooling) for v in views if v.numel()]
        return self.head.bottleneck(torch.cat(features))


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Linear stochastic depth over a ViT's blocks (0 for the first, ``rate`` for the last), as DINO."""
    blocks = getattr(encoder, "blocks", [])
    for i, block in enumerate(blocks):
        block.drop_path = rate * i / max(len(blocks) - 1, 1)


@register
class DINO(Objective):
    name = "dino"
    Settings = DINOSettings
    presets = ("dino_digits", "dino_vit_small_100ep", "dino_resnet50_100ep")

    def __init__(self, settings: DINOSettings, model):
        super().__init__(settings, model)
        self.global_views = settings.view_specs()
        self.local_view = settings.local_spec()
        self.model = DINONet(settings, model)
        self.teacher = EMATeacher(self.model)
        set_drop_path(self.teacher.model.encoder, 0.0)   # the teacher is never dropped
        set_drop_path(self.model.encoder, settings.drop_path)
        self.register_buffer("center", torch.zeros(settings.out_dim))
        self.temperature = teacher_temperature(0, settings)

    def frozen_last_layer(self, epoch: int) -> bool:
        return epoch < self.settings.freeze_last_layer

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.temperature = teacher_temperature(ctx.epoch, self.settings)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.frozen_last_layer(ctx.epoch):   # DINO's cancel_gradients_last_layer
            for p in self.model.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, ctx: StepContext) -> None:
        momentum = cosine_momentum((ctx.step + 1) / ctx.steps_per_epoch, ctx.epochs, self.settings.momentum_teacher)
        self.teacher.update(momentum)

    def views(self, imgs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(global views [2B, C, H, H], local views [nB, C, h, h]) in crop-major order."""
        s = self.settings
        globals_, locals_ = multi_crop(imgs, generator, self.global_views, imgs.shape[-1], self.local_view,
                                       s.local_crops, s.local_size)
        local = torch.cat(locals_) if locals_ else imgs.new_empty((0, imgs.shape[1], s.local_size, s.local_size))
        return torch.cat(globals_), local

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        s = self.settings
        global_views, local_views = self.views(imgs, ctx.generator)
        student = self.model.bottleneck([global_views, local_views])
        weight = self.model.head.last_layer.weight()
        if self.frozen_last_layer(ctx.epoch) and negatives_group() is None:
            weight = weight.detach()   # no prototype gradient to compute (DDP would expect one: see above)
        with torch.no_grad():
            teacher_net = self.teacher.model
            teacher_net.train(self.training)   # batch statistics in a ResNet teacher's BatchNorms, as DINO's
            teacher = teacher_net.bottleneck([global_views])
            teacher_weight = teacher_net.head.last_layer.weight()
        loss = kernels.prototype_cross_entropy(
            student, teacher.to(student.dtype), weight.to(student.dtype), teacher_weight.to(student.dtype),
            self.center, student_temp=s.student_temp, teacher_temp=self.temperature, num_global=2)
        if self.training:
            with torch.no_grad():   # after the loss, which used the previous centre
                batch_center = kernels.prototype_center(teacher, teacher_weight, group=negatives_group())
                self.center.lerp_(batch_center, 1.0 - s.center_momentum)
        return loss, {"loss_dino": loss.detach(), "teacher_temp": torch.tensor(self.temperature, device=loss.device)}

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> EvalOutput:
        """Collapse monitors on the held-out batch (un-augmented): the teacher's mean per-image entropy and the
        entropy of its batch-mean distribution. Equal: every image gets the same distribution (collapse; near
        log K the uniform one, near 0 every image on one prototype)."""
        teacher = self.teacher.model
        z = teacher.head(global_feature(teacher.encoder, imgs, teacher.pooling)).float()
        p = torch.softmax((z - self.center) / self.temperature, dim=1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1).mean()
        mean_p = p.mean(dim=0)
        mean_entropy = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
        log_k = math.log(self.settings.out_dim)
        return EvalOutput(metrics={"teacher_entropy": float(entropy), "teacher_batch_entropy": float(mean_entropy),
                                   "log_prototypes": log_k},
                          caption=f"teacher entropy {float(entropy):.2f} per image, {float(mean_entropy):.2f} "
                                  f"of the batch mean (log K = {log_k:.2f})")

    def flops_per_image(self) -> float:
        """Student forward + backward on every view, teacher forward on the global views; heads included."""
        s, encoder, img = self.settings, self.model.encoder, self.model_cfg.img_size
        head = self.model.head.flops()
        if is_resnet(self.model_cfg):
            view = lambda size: backbone_flops(encoder, size)  # noqa: E731
        else:
            view = lambda size: vit_flops(encoder, (size // self.model_cfg.patch_size) ** 2 + 1)  # noqa: E731
        student = 2 * (view(img) + head) + s.local_crops * (view(s.local_size) + head)
        teacher = 2 * (view(img) + head)
        return 3 * student + teacher


__all__ = ["DINO", "DINOSettings", "DINONet", "teacher_temperature"]
