"""MOKD (Song et al., CVPR 2023; github.com/skyoux/mokd): multi-mode online knowledge distillation.

A ResNet and a ViT train together, each as DINO does (a student and its EMA teacher on 2 global + n local
crops, multi-crop order [g1 | g2 | l1 .. ln]), and each also learns from the other. Per model, two heads:
the DINO head on the global feature (prototypes of unit norm for the CNN's student, trained norms for the
ViT's) and a T-head (engine/models/mokd_heads.py) on the spatial features (the CNN: a 1x1 conv of layer4 to the
ViT's width; the ViT: its patch tokens). With DINO(s, t) the multi-crop cross-entropy of DINO (centred
teacher, each term its own centre) and CE the row-by-row cross-entropy without centre, the CNN's loss is

    L_c = DINO(s_c.head, t_c.head) + DINO(s_c.T, t_c.T)
          + lambda_c [ DINO(s_c.head, t_v.head) + CE(s_c.T(local crops), t_v.search(q_c)) ]

and the ViT's the mirror image with lambda_v. The feature search: the student's query for each local crop
(the CNN: its T-head's pooled 1x1-conv map; the ViT: its cls token, or with ``vit_pooling = "mean"`` the mean
of its patch tokens, which then also feeds its DINO head), detached, is prepended to the *other*
model's teacher T-head input built from global crop 1 of the same image; after the blocks the query token is
dropped and the rest pooled and projected: that distribution is the target for the student's T-head on the
local crop. Every cross-entropy (8 per step, over K prototypes) goes through
``kernels.prototype_cross_entropy`` without forming the logits. L_c reaches only the CNN's parameters and L_v
only the ViT's (teachers and queries carry no gradient), so the one backward of L_c + L_v gives exactly the
gradients of the official two backward passes; each model has its own optimizer and EMA update.

Configuration: ``[model]`` is the ViT (the official ViT-S/16); ``objective.mokd.cnn_arch`` / ``cnn_stem`` the
ResNet. ``[optim]`` configures the ViT's optimizer and schedule (the official: AdamW, lr 3e-4 x bs/256 ->
1e-5, weight decay cosine 0.04 -> 0.4, warm-up 10 epochs). The CNN's optimizer is momentum SGD (``cnn_*``:
lr 0.1 x bs/256 -> 0.0048, constant weight decay 1e-4, the same warm-up); its T-head follows the ViT's lr
and weight decay, every T-head parameter decayed, as the official groups it. The trainer sets the scheduled
lr / weight decay of ``[optim]`` on every group; ``before_optimizer_step`` then sets the CNN's backbone and
head groups to their own schedule (engine.optim.lr_at with the cnn_* values), so the update uses them.
See docs/methods/mokd.md for the defaults and where this departs from the official code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from sslpt import kernels
from sslpt.engine.config import require, require_probability, require_range, require_vit
from sslpt.engine.data.views import ViewAugment, multi_crop
from sslpt.engine.distributed import negatives_group
from sslpt.engine.ema import EMATeacher, cosine_momentum
from sslpt.engine.models.backbones import backbone_flops, build_backbone, pool_tokens
from sslpt.engine.models.contrastive import ViewSettings
from sslpt.engine.models.dino_head import DINOHead
from sslpt.engine.models.mokd_heads import THead, conv_grid
from sslpt.engine.models.resnet import build_resnet
from sslpt.engine.models.vit import vit_flops
from sslpt.engine.optim import build_optimizer, lr_at
from sslpt.engine.registry import register

from .base import EvalOutput, Objective, StepContext
from .dino import set_drop_path

MODELS = ("cnn", "vit")


@dataclass(kw_only=True)
class MOKDSettings(ViewSettings):
    """Defaults: the official ResNet-50 + ViT-S/16 recipe (2 x 224 + 8 x 96 crops, K = 65,536)."""
    cnn_arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    cnn_stem: Literal["imagenet", "small"] = "imagenet"
    cnn_width: int = 64                 # the ResNet's first-stage width (stages w, 2w, 4w, 8w); 64: torchvision's
    out_dim: int = 65536                # K prototypes, every head
    head_hidden: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_bn: bool = False               # BatchNorm in every DINO head's MLP (DINO's use_bn; the official: off)
    vit_pooling: Literal["cls", "mean"] = "cls"   # the ViT's global feature and query: cls token (official) or
                                                  # the mean of its patch tokens
    thead_depth: int = 3                # T-head blocks; width and heads are the ViT's (384 / 6 for ViT-S)
    drop_path: float = 0.1              # the ViT student's stochastic depth (T-heads: none)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    cnn_warmup_teacher_temp_epochs: int = 50   # the CNN's own two terms
    vit_warmup_teacher_temp_epochs: int = 30   # every other term (the ViT's, both cross terms, both searches)
    # the T-head terms' teacher temperature (own T-head and search, both models), constant; None: the schedules
    # above, as the official code. The T-heads' logits are unbounded (LayerNorm'd input, trained prototype norms:
    # ~10x a DINO head's cosine logits), so a teacher temperature that suits the DINO heads can make them one-hot
    thead_teacher_temp: float | None = None
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996     # cosine to 1 per iteration, both teachers
    freeze_last_layer: int = 1          # epochs without gradient for the four students' prototypes
    lambda_cnn: float = 1.0             # weight of the CNN's cross-model terms
    lambda_vit: float = 0.1             # weight of the ViT's cross-model terms
    cnn_blr: float = 0.1                # CNN lr = cnn_blr * effective batch / 256 (unless cnn_lr)
    cnn_lr: float | None = None
    cnn_min_lr: float = 0.0048
    cnn_weight_decay: float = 1e-4
    cnn_momentum: float = 0.9
    probe_model: Literal["vit", "cnn"] = "vit"   # the student backbone the probe measures and export writes
    view_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.25)
    local_blur_prob: float = 0.5
    local_solarize_prob: float = 0.0

    def check(self, cfg) -> None:
        super().check(cfg)
        key = self.key
        require_vit(cfg, "mokd")
        for name in ("out_dim", "head_hidden", "bottleneck_dim", "head_layers", "thead_depth", "local_size",
                     "local_crops", "cnn_width"):
            require(getattr(self, name) >= 1, f"{key(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "cnn_blr"):
            require(getattr(self, name) > 0, f"{key(name)} must be > 0, got {getattr(self, name)}")
        for name in ("cnn_warmup_teacher_temp_epochs", "vit_warmup_teacher_temp_epochs", "freeze_last_layer",
                     "lambda_cnn", "lambda_vit", "cnn_min_lr", "cnn_weight_decay"):
            require(getattr(self, name) >= 0, f"{key(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("center_momentum", "momentum_teacher", "local_blur_prob", "local_solarize_prob"):
            require_probability(getattr(self, name), key(name))
        require(0 <= self.cnn_momentum < 1, f"{key('cnn_momentum')} must be in [0, 1), got {self.cnn_momentum}")
        require(0 <= self.drop_path < 1, f"{key('drop_path')} must be in [0, 1), got {self.drop_path}")
        require(self.cnn_lr is None or self.cnn_lr > 0, f"{key('cnn_lr')} must be > 0, got {self.cnn_lr}")
        require(self.thead_teacher_temp is None or self.thead_teacher_temp > 0,
                f"{key('thead_teacher_temp')} must be > 0, got {self.thead_teacher_temp}")
        require(cfg.optim.lr is None or self.cnn_lr is not None,
                f"optim.lr sets the ViT's lr absolutely: set {key('cnn_lr')} too (the CNN's lr cannot be scaled "
                f"from cnn_blr without the batch size)")
        require_range(self.local_crop_scale, key("local_crop_scale"))
        require(self.local_size <= cfg.model.img_size,
                f"{key('local_size')}={self.local_size} must be <= model.img_size={cfg.model.img_size}")
        require(self.local_size % cfg.model.patch_size == 0,
                f"{key('local_size')}={self.local_size} must be a multiple of model.patch_size="
                f"{cfg.model.patch_size}")
        require(cfg.train.parallel != "fsdp", "train.parallel='fsdp' shards per transformer block and MOKD trains "
                f"a ResNet ({key('cnn_arch')}) too: use train.parallel='ddp'")

    def local_spec(self) -> ViewAugment:
        global_spec = self.view_specs()[0]
        return ViewAugment(**{**global_spec.__dict__, "crop_scale": tuple(self.local_crop_scale),
                              "blur_prob": self.local_blur_prob, "solarize_prob": self.local_solarize_prob})


def warmed_temperature(epoch: int, start: float, end: float, epochs: int) -> float:
    """The official per-epoch table: linspace(start, end, epochs) (both ends included), then ``end``."""
    if epoch >= epochs:
        return end
    return start if epochs == 1 else start + (end - start) * epoch / (epochs - 1)


def build_cnn_backbone(settings: MOKDSettings, model) -> nn.Module:
    return build_resnet(settings.cnn_arch, in_chans=model.in_chans, stem=settings.cnn_stem, img_size=model.img_size,
                        width=settings.cnn_width)


class MOKDNet(nn.Module):
    """One model of the pair: backbone, DINO head and T-head. ``encode(imgs)`` gives (global feature, T-head
    input tokens with positions, query vector) for one resolution's batch."""

    def __init__(self, encoder: nn.Module, head: DINOHead, thead: THead, pooling: str = "cls"):
        super().__init__()
        self.encoder, self.head, self.thead = encoder, head, thead
        self.is_cnn = thead.reduce is not None
        self.pooling = pooling   # the ViT's global feature and query (cls token, or the patch tokens' mean)

    def encode(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.is_cnn:
            feature_map = self.encoder.feature_maps(imgs, ("layer4",))["layer4"]
            tokens, query = self.thead.embed_map(feature_map)
            return feature_map.mean(dim=(2, 3)), tokens, query
        out = self.encoder(imgs)
        feature = pool_tokens(out, self.pooling)
        return feature, self.thead.embed_tokens(out[:, 1:]), feature

    def last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer, self.thead.last_layer]


def build_pair(settings: MOKDSettings, model) -> nn.ModuleDict:
    """{"cnn": ResNet + DINO head (unit prototypes) + T-head on a 1x1 conv of layer4,
        "vit": ViT + DINO head (trained prototype norms) + T-head on the patch tokens}."""
    s = settings
    vit = build_backbone(model)
    width, _, heads = model.dims
    cnn = build_cnn_backbone(s, model)
    halvings = int(math.log2(cnn.stage_strides["layer4"]))
    nets = {}
    for name, encoder in (("cnn", cnn), ("vit", vit)):
        is_cnn = name == "cnn"
        head = DINOHead(encoder.embed_dim, s.out_dim, s.head_hidden, s.bottleneck_dim, s.head_layers,
                        use_bn=s.head_bn, norm_last_layer=is_cnn)
        grid = conv_grid(model.img_size, halvings) if is_cnn else vit.grid
        thead = THead(width, s.out_dim, grid, s.thead_depth, heads, model.mlp_ratio,
                      in_channels=encoder.embed_dim if is_cnn else None, attn_backend=model.attn_backend)
        nets[name] = MOKDNet(encoder, head, thead, pooling="cls" if is_cnn else s.vit_pooling)
    return nn.ModuleDict(nets)


@register
class MOKD(Objective):
    name = "mokd"
    Settings = MOKDSettings
    presets = ("mokd_digits", "mokd_resnet50_vit_small_100ep")
    width_field = "objective.mokd.cnn_width"   # what export names when it refuses a probed CNN of width != 64

    def __init__(self, settings: MOKDSettings, model):
        super().__init__(settings, model)
        self.global_views = settings.view_specs()
        self.local_view = settings.local_spec()
        self.students = build_pair(settings, model)
        self.teacher_cnn = EMATeacher(self.students["cnn"])
        self.teacher_vit = EMATeacher(self.students["vit"])
        set_drop_path(self.students["vit"].encoder, settings.drop_path)
        # one centre per centred term: <model>_<head>, the cross terms centred on the other teacher's head
        for term in ("cnn_head", "cnn_thead", "cnn_cross", "vit_head", "vit_thead", "vit_cross"):
            self.register_buffer(f"center_{term}", torch.zeros(settings.out_dim))
        self.temperatures = self.temperatures_at(0)
        self._cnn_schedule: tuple[torch.optim.Optimizer, float, float, float] | None = None

    # ------------------------------------------------------------------ what the engine sees
    @property
    def trainable(self) -> nn.Module:
        return self.students

    @property
    def encoder(self) -> nn.Module:
        return self.students[self.settings.probe_model].encoder

    def teacher(self, name: str) -> MOKDNet:
        return (self.teacher_cnn if name == "cnn" else self.teacher_vit).model

    @classmethod
    def random_encoder(cls, settings: MOKDSettings, model) -> nn.Module:
        """Only the probed backbone, built as the objective builds it."""
        return build_cnn_backbone(settings, model) if settings.probe_model == "cnn" else build_backbone(model)

    def optimizers(self, optim_cfg, lr: float) -> list[torch.optim.Optimizer]:
        """[the ViT's ([optim]: AdamW by default), the CNN's (momentum SGD)]. ``lr`` is [optim]'s scaled lr."""
        s = self.settings
        vit = build_optimizer(self.students["vit"], optim_cfg, lr)
        cnn_net = self.students["cnn"]
        decay, no_decay = [], []
        for name, param in cnn_net.named_parameters():
            if not param.requires_grad or name.startswith("thead."):
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        thead = [p for p in cnn_net.thead.parameters() if p.requires_grad]
        cnn = torch.optim.SGD([{"params": decay, "weight_decay": s.cnn_weight_decay},
                               {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
                               {"params": thead, "weight_decay": optim_cfg.weight_decay}],   # the ViT's schedule
                              lr=lr, momentum=s.cnn_momentum, foreach=True)
        cnn_lr = s.cnn_lr if s.cnn_lr is not None else s.cnn_blr * lr / optim_cfg.blr   # lr = blr * batch / 256
        self._cnn_schedule = (cnn, cnn_lr, s.cnn_min_lr, optim_cfg.warmup_epochs)
        return [vit, cnn]

    def cnn_lr(self, ctx: StepContext) -> float:
        _, base, min_lr, warmup = self._cnn_schedule
        return lr_at(ctx.progress, base, min_lr, warmup, ctx.epochs)

    # ------------------------------------------------------------------ schedules and hooks
    def temperatures_at(self, epoch: int) -> dict[str, float]:
        s = self.settings
        cnn = warmed_temperature(epoch, s.warmup_teacher_temp, s.teacher_temp, s.cnn_warmup_teacher_temp_epochs)
        vit = warmed_temperature(epoch, s.warmup_teacher_temp, s.teacher_temp, s.vit_warmup_teacher_temp_epochs)
        return {"cnn": cnn, "vit": vit}

    def frozen_last_layer(self, epoch: int) -> bool:
        return epoch < self.settings.freeze_last_layer

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.temperatures = self.temperatures_at(ctx.epoch)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.frozen_last_layer(ctx.epoch):   # the official cancel_gradients_last_layer, all four students' heads
            for net in self.students.values():
                for layer in net.last_layers():
                    for p in layer.parameters():
                        p.grad = None
        if self._cnn_schedule is not None:   # the CNN backbone's and head's own lr / weight decay
            optimizer, s = self._cnn_schedule[0], self.settings
            lr = self.cnn_lr(ctx)
            for group, wd in zip(optimizer.param_groups[:2], (s.cnn_weight_decay, 0.0)):
                group["lr"], group["weight_decay"] = lr, wd

    def after_optimizer_step(self, ctx: StepContext) -> None:
        momentum = cosine_momentum((ctx.step + 1) / ctx.steps_per_epoch, ctx.epochs, self.settings.momentum_teacher)
        self.teacher_cnn.update(momentum)
        self.teacher_vit.update(momentum)

    # ------------------------------------------------------------------ the step
    def views(self, imgs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(global views [2B, C, H, H], local views [nB, C, h, h]) in crop-major order."""
        s = self.settings
        globals_, locals_ = multi_crop(imgs, generator, self.global_views, imgs.shape[-1], self.local_view,
                                       s.local_crops, s.local_size)
        return torch.cat(globals_), torch.cat(locals_)

    def student_outputs(self, net: MOKDNet, global_views: torch.Tensor, local_views: torch.Tensor) -> dict:
        """The DINO head's bottleneck and the T-head's pooled features on every crop (crop-major), and the
        local crops' queries."""
        features, pooled, query = [], [], None
        for views in (global_views, local_views):
            feature, tokens, query = net.encode(views)
            features.append(feature)
            pooled.append(net.thead.pooled(tokens))
        return {"head": net.head.bottleneck(torch.cat(features)), "t": torch.cat(pooled), "query": query}

    @torch.no_grad()
    def teacher_outputs(self, net: MOKDNet, global_views: torch.Tensor, other_query: torch.Tensor) -> dict:
        """On the two global crops: h, T-head pooled features, and the search targets for the other model's
        local-crop queries (this teacher's global-crop-1 tokens, repeated per local crop)."""
        net.train(self.training)   # batch statistics in the ResNet teacher's BatchNorms, as the official code
        feature, tokens, _ = net.encode(global_views)
        batch = global_views.shape[0] // 2
        crops = other_query.shape[0] // batch
        first = tokens[:batch].repeat(crops, 1, 1)   # row c * B + b: global crop 1 of image b
        return {"head": net.head.bottleneck(feature), "t": net.thead.pooled(tokens),
                "search": net.thead.pooled(first, other_query.detach())}

    def terms(self, imgs: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The 8 loss terms and the two models' totals (``loss_cnn`` reaches only the CNN's parameters,
        ``loss_vit`` only the ViT's). Centres are updated afterwards when training."""
        s = self.settings
        global_views, local_views = self.views(imgs, ctx.generator)
        student = {name: self.student_outputs(self.students[name], global_views, local_views) for name in MODELS}
        other = {"cnn": "vit", "vit": "cnn"}
        teacher = {name: self.teacher_outputs(self.teacher(name), global_views, student[other[name]]["query"])
                   for name in MODELS}
        frozen = self.frozen_last_layer(ctx.epoch) and negatives_group() is None   # see DINO: DDP wants every grad
        weights = {}
        for name in MODELS:
            for head, layer in (("head", self.students[name].head.last_layer),
                                ("t", self.students[name].thead.last_layer)):
                w = layer.weight()
                weights[("s", name, head)] = w.detach() if frozen else w
            weights[("t", name, "head")] = self.teacher(name).head.last_layer.weight().detach()
            weights[("t", name, "t")] = self.teacher(name).thead.last_layer.weight().detach()

        def ce(features, targets, who, head, target_model, center, temp, pairing="cross"):
            dtype = features.dtype
            return kernels.prototype_cross_entropy(
                features, targets.to(dtype), weights[("s", who, head)].to(dtype),
                weights[("t", target_model, head)].to(dtype), center, student_temp=s.student_temp,
                teacher_temp=temp, num_global=2, pairing=pairing)

        out = {}
        temps = self.temperatures
        t_temp = s.thead_teacher_temp
        for name, lam in (("cnn", s.lambda_cnn), ("vit", s.lambda_vit)):
            mine, theirs = student[name], other[name]
            local_rows = mine["t"][global_views.shape[0]:]
            out[f"{name}_head"] = ce(mine["head"], teacher[name]["head"], name, "head", name,
                                     getattr(self, f"center_{name}_head"), temps[name])
            out[f"{name}_thead"] = ce(mine["t"], teacher[name]["t"], name, "t", name,
                                      getattr(self, f"center_{name}_thead"), t_temp or temps[name])
            out[f"{name}_cross"] = ce(mine["head"], teacher[theirs]["head"], name, "head", theirs,
                                      getattr(self, f"center_{name}_cross"), temps["vit"])
            out[f"{name}_search"] = ce(local_rows, teacher[theirs]["search"], name, "t", theirs, None,
                                       t_temp or temps["vit"], "identity")
            out[f"loss_{name}"] = (out[f"{name}_head"] + out[f"{name}_thead"]
                                   + lam * (out[f"{name}_cross"] + out[f"{name}_search"]))
        if self.training:
            self.update_centers(teacher, weights)
        return out

    @torch.no_grad()
    def update_centers(self, teacher: dict, weights: dict) -> None:
        """After the loss, which used the previous centres: c <- m c + (1 - m) W_t mean(teacher rows), all ranks."""
        m = self.settings.center_momentum
        other = {"cnn": "vit", "vit": "cnn"}
        for name in MODELS:
            for term, source, head in (("head", name, "head"), ("thead", name, "t"), ("cross", other[name], "head")):
                batch = kernels.prototype_center(teacher[source][head], weights[("t", source, head)],
                                                 group=negatives_group())
                getattr(self, f"center_{name}_{term}").lerp_(batch, 1.0 - m)

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        out = self.terms(imgs, ctx)
        loss = out["loss_cnn"] + out["loss_vit"]
        metrics = {f"loss_{k}" if not k.startswith("loss_") else k: v.detach() for k, v in out.items()}
        metrics["teacher_temp_cnn"] = torch.tensor(self.temperatures["cnn"], device=loss.device)
        metrics["teacher_temp_vit"] = torch.tensor(self.temperatures["vit"], device=loss.device)
        if self._cnn_schedule is not None:
            metrics["lr_cnn"] = torch.tensor(self.cnn_lr(ctx), device=loss.device)
        return loss, metrics

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor, generator: torch.Generator) -> EvalOutput:
        """Collapse monitors of both teachers' DINO heads (and T-heads: ``<model>_thead_teacher_*``) on the held-out
        batch: the mean per-image entropy (log K: uniform collapse) and the entropy of the batch-mean distribution
        (0: one prototype for all; equal to the per-image one: every image gets the same distribution)."""
        metrics = {}
        for name in MODELS:
            net = self.teacher(name)
            feature, tokens, _ = net.encode(imgs)
            t_logits = net.thead.pooled(tokens) @ net.thead.last_layer.weight().T
            t_temp = self.settings.thead_teacher_temp or self.temperatures[name]
            for head, z, term, temp in (("", net.head(feature), "head", self.temperatures[name]),
                                        ("thead_", t_logits, "thead", t_temp)):
                p = torch.softmax((z.float() - getattr(self, f"center_{name}_{term}")) / temp, dim=1)
                mean_p = p.mean(dim=0)
                metrics[f"{name}_{head}teacher_entropy"] = float(-(p * p.clamp_min(1e-30).log()).sum(dim=1).mean())
                metrics[f"{name}_{head}teacher_batch_entropy"] = float(-(mean_p * mean_p.clamp_min(1e-30).log()).sum())
        metrics["log_prototypes"] = math.log(self.settings.out_dim)
        caption = ", ".join(f"{n} teacher entropy {metrics[f'{n}_teacher_entropy']:.2f} "
                            f"(batch mean {metrics[f'{n}_teacher_batch_entropy']:.2f})" for n in MODELS)
        return EvalOutput(metrics=metrics, caption=f"{caption}, log K = {metrics['log_prototypes']:.2f}")

    def flops_per_image(self) -> float:
        """Students forward + backward on every crop, teachers forward on the global crops plus the searches."""
        s, img = self.settings, self.model_cfg.img_size
        total = 0.0
        for name in MODELS:
            net = self.students[name]
            glob, local = (self.view_flops(net, size) for size in (img, s.local_size))
            search = net.thead.flops(self.grid_tokens(net, img) + 1)
            total += 3 * (2 * glob + s.local_crops * local) + 2 * glob + s.local_crops * search
        return total

    def grid_tokens(self, net: MOKDNet, size: int) -> int:
        """The T-head's input tokens for a crop of ``size`` pixels."""
        if net.is_cnn:
            return conv_grid(size, int(math.log2(net.encoder.stage_strides["layer4"]))) ** 2
        return (size // self.model_cfg.patch_size) ** 2

    def view_flops(self, net: MOKDNet, size: int) -> float:
        """Forward FLOPs of one crop through the backbone and both heads."""
        tokens = self.grid_tokens(net, size)
        backbone = backbone_flops(net.encoder, size) if net.is_cnn else vit_flops(net.encoder, tokens + 1)
        return backbone + net.head.flops() + net.thead.flops(tokens)


__all__ = ["MOKD", "MOKDSettings", "MOKDNet", "build_pair", "warmed_temperature"]
