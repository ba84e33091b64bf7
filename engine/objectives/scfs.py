"""SCFS (Song et al., "Semantics-Consistent Feature Search for Self-Supervised Visual Representation Learning",
ICCV 2023; github.com/skyoux/scfs): DINO on a ResNet, plus shallow heads on intermediate stages whose local-crop
targets are searched for in the teacher's view of the whole image.

Everything of DINO is inherited (multi-crop views, the backbone -> DINO head student and its EMA teacher, the
prototype loss through ``kernels.prototype_cross_entropy``, the centre, the schedules, the frozen last layer).
On top, for each tapped stage k (layer2, layer3, layer4 by default), student and teacher carry a shallow head
(``engine/models/scfs_heads.py``: a residual bottleneck, average pool, MLP, L2 normalisation to 256-d), and:

    search (teacher side, no gradient), for local crop v of image b:
        q      = normalize(mean over locations of the student's stage-k map of the crop)
        A[y,x] = q . normalize(F[:, y, x])      F: the teacher's stage-k map of global view 1 of image b
        target = teacher head_k(A * F)          (A is a raw cosine map in [-1, 1], no softmax)
    L_k = 0.5 * (CE of the swapped global views, teacher centred with its own centre c_k
                 + CE of each local crop against its searched target, teacher not centred)
    loss = DINO + sum_k L_k

where CE(t, s) = -sum_j softmax(t / tau_t)_j log softmax(s / tau_s)_j over the 256 coordinates of the unit
vectors (no prototypes, so plain torch: the whole term is a [rows, 256] softmax). tau_t is DINO's per-epoch
schedule and tau_s its student temperature; c_k follows the batch mean of the teacher's global outputs of
stage k like DINO's centre (momentum ``center_momentum``, all ranks). Only the first global view is searched.

The student's backbone and shallow heads run once on the global views and once on the local views (their
BatchNorms see each batch separately), the teacher's heads once on the global maps and once on the searched
maps, as in the official code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import RESNET_ARCHS, require
from sslpt.engine.distributed import negatives_group
from sslpt.engine.ema import EMATeacher
from sslpt.engine.models.backbones import build_backbone, is_resnet
from sslpt.engine.models.resnet import STAGES
from sslpt.engine.models.scfs_heads import ShallowHead
from sslpt.engine.registry import register

from .base import EvalOutput, StepContext
from .dino import DINO, DINOSettings

Stage = Literal["layer2", "layer3", "layer4"]


@dataclass(kw_only=True)
class SCFSSettings(DINOSettings):
    """Defaults: SCFS's ResNet-50 recipe (2 x 224 global crops of scale 0.25-1, 8 x 96 local of 0.05-0.25)."""
    shallow_layers: tuple[Stage, ...] = ("layer2", "layer3", "layer4")
    shallow_bottleneck: int = 256       # width of the head's residual bottleneck
    shallow_hidden: int = 2048          # MLP hidden width
    shallow_dim: int = 256              # the unit vectors the shallow losses compare
    drop_path: float = 0.0              # ResNets have no stochastic depth
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 50
    view_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.25)

    def check(self, cfg) -> None:
        require(is_resnet(cfg.model), f"objective 'scfs' searches the feature maps of a ResNet's stages, but "
                f"model.arch={cfg.model.arch!r} is a ViT: choose one of {', '.join(RESNET_ARCHS)}")
        super().check(cfg)
        key = self.key
        layers = list(self.shallow_layers)
        require(bool(layers) and len(set(layers)) == len(layers),
                f"{key('shallow_layers')} must name distinct stages among layer2, layer3, layer4, got {layers}")
        for name in ("shallow_bottleneck", "shallow_hidden", "shallow_dim"):
            require(getattr(self, name) >= 1, f"{key(name)} must be >= 1, got {getattr(self, name)}")
        require(self.local_crops >= 1, f"{key('local_crops')} must be >= 1: the feature search matches local "
                f"crops, got {self.local_crops}")


def search_targets(local_maps: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """The maps the teacher's shallow head reads for the local crops, [n B, C, h, w] in crop-major order.

    ``local_maps`` [n B, C, h', w']: the student's stage maps of the n local crops (row v B + b);
    ``teacher_map`` [B, C, h, w]: the teacher's map of global view 1. Each crop's pooled, normalised feature
    scores every location of its image's teacher map by cosine similarity; the map is weighted by the scores.
    One batched contraction, no loop over crops.
    """
    batch, channels = teacher_map.shape[:2]
    query = F.normalize(local_maps.mean(dim=(2, 3)), dim=1).view(-1, batch, channels)     # [n, B, C]
    attention = torch.einsum("vbc,bchw->vbhw", query, F.normalize(teacher_map, dim=1))   # [n, B, h, w]
    return (attention.unsqueeze(2) * teacher_map).flatten(0, 1)


def soft_cross_entropy(student: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over rows of -sum_j p_j log softmax(student / tau_s)_j, in fp32."""
    return -(teacher_probs * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1).mean()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the training ranks (``x`` itself in one process)."""
    group = negatives_group()
    if group is not None:
        dist.all_reduce(x, group=group)
        x = x / dist.get_world_size(group)
    return x


@register
class SCFS(DINO):
    name = "scfs"
    Settings = SCFSSettings
    presets = ("scfs_digits", "scfs_resnet50_200ep")

    def __init__(self, settings: SCFSSettings, model):
        super().__init__(settings, model)   # DINO's student (ResNet + DINO head), its teacher, the centre
        encoder = self.model.encoder
        self.model.shallow = nn.ModuleDict({
            layer: ShallowHead(encoder.stage_channels(layer), settings.shallow_bottleneck, settings.shallow_hidden,
                               settings.shallow_dim)
            for layer in settings.shallow_layers})
        self.teacher = EMATeacher(self.model)   # again, now that the student has its shallow heads
        self.layers = tuple(settings.shallow_layers)
        self.taps = tuple(name for name in STAGES if name in self.layers or name == "layer4")
        self.register_buffer("shallow_centers", torch.zeros(len(self.layers), settings.shallow_dim))

    @classmethod
    def random_encoder(cls, settings: SCFSSettings, model) -> nn.Module:
        return build_backbone(model)   # the student's ResNet as built, without the heads

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        s, tau_t = self.settings, self.temperature
        global_views, local_views = self.views(imgs, ctx.generator)
        batch = imgs.shape[0]
        student_global = self.model.encoder.feature_maps(global_views, self.taps)
        student_local = self.model.encoder.feature_maps(local_views, self.taps)
        pooled = torch.cat([student_global["layer4"].mean(dim=(2, 3)), student_local["layer4"].mean(dim=(2, 3))])
        student = self.model.head.bottleneck(pooled)
        weight = self.model.head.last_layer.weight()
        if self.frozen_last_layer(ctx.epoch) and negatives_group() is None:
            weight = weight.detach()   # as DINO: no prototype gradient to compute outside DDP
        with torch.no_grad():
            teacher_net = self.teacher.model
            teacher_net.train(self.training)   # batch statistics in the teacher's BatchNorms, as the official code
            teacher_maps = teacher_net.encoder.feature_maps(global_views, self.taps)
            teacher = teacher_net.head.bottleneck(teacher_maps["layer4"].mean(dim=(2, 3)))
            teacher_weight = teacher_net.head.last_layer.weight()
        loss_dino = kernels.prototype_cross_entropy(
            student, teacher.to(student.dtype), weight.to(student.dtype), teacher_weight.to(student.dtype),
            self.center, student_temp=s.student_temp, teacher_temp=tau_t, num_global=2)
        metrics = {"loss_dino": loss_dino.detach(), "teacher_temp": torch.tensor(tau_t, device=loss_dino.device)}

        loss, batch_centers = loss_dino, []
        for i, layer in enumerate(self.layers):
            head = self.model.shallow[layer]
            student_g, student_l = head(student_global[layer]), head(student_local[layer])
            with torch.no_grad():
                teacher_head = teacher_net.shallow[layer]
                teacher_g = teacher_head(teacher_maps[layer]).float()
                searched = search_targets(student_local[layer].detach(), teacher_maps[layer][:batch])
                teacher_l = teacher_head(searched).float()
                probs_g = F.softmax((teacher_g - self.shallow_centers[i]) / tau_t, dim=-1).chunk(2)
                probs_l = F.softmax(teacher_l / tau_t, dim=-1)   # the searched targets are never centred
            s1, s2 = student_g.chunk(2)
            loss_global = 0.5 * (soft_cross_entropy(s2, probs_g[0], s.student_temp)
                                 + soft_cross_entropy(s1, probs_g[1], s.student_temp))
            loss_local = soft_cross_entropy(student_l, probs_l, s.student_temp)
            layer_loss = 0.5 * (loss_global + loss_local)
            loss = loss + layer_loss
            batch_centers.append(teacher_g.mean(dim=0))
            metrics[f"loss_{layer}"] = layer_loss.detach()

        if self.training:
            with torch.no_grad():   # after the losses, which used the previous centres
                batch_center = kernels.prototype_center(teacher, teacher_weight, group=negatives_group())
                self.center.lerp_(batch_center, 1.0 - s.center_momentum)
                shallow = mean_over_ranks(torch.stack(batch_centers))
                self.shallow_centers.lerp_(shallow.to(self.shallow_centers.dtype), 1.0 - s.center_momentum)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> EvalOutput:
        """DINO's collapse monitors, and the teacher entropy of each shallow head (log of its width: uniform)."""
        out = super().evaluate(imgs, generator)
        teacher = self.teacher.model
        maps = teacher.encoder.feature_maps(imgs, self.taps)
        for i, layer in enumerate(self.layers):
            z = teacher.shallow[layer](maps[layer]).float()
            p = F.softmax((z - self.shallow_centers[i]) / self.temperature, dim=1)
            out.metrics[f"teacher_entropy_{layer}"] = float(-(p * p.clamp_min(1e-30).log()).sum(dim=1).mean())
        return out

    def flops_per_image(self) -> float:
        """DINO's, plus the shallow heads: the student's on every view (forward + backward), the teacher's on the
        global views and on the n searched maps (at global-view size)."""
        s, img = self.settings, self.model_cfg.img_size
        strides = self.model.encoder.stage_strides
        shallow = 0.0
        for layer in self.layers:
            head, stride = self.model.shallow[layer], strides[layer]
            global_view = head.flops(math.ceil(img / stride), math.ceil(img / stride))
            local_view = head.flops(math.ceil(s.local_size / stride), math.ceil(s.local_size / stride))
            student = 2 * global_view + s.local_crops * local_view
            teacher = (2 + s.local_crops) * global_view   # the searched maps have the global view's size
            shallow += 3 * student + teacher
        return super().flops_per_image() + shallow


__all__ = ["SCFS", "SCFSSettings", "search_targets", "soft_cross_entropy"]
