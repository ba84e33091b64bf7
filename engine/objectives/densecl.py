"""DenseCL (Wang et al., CVPR 2021; github.com/WXinlong/DenseCL): MoCo v2 plus a dense, per-location contrast.

Query encoder = backbone + neck; key encoder = a momentum copy (m = 0.999, constant), never trained by gradient.
The neck has a global head (pooled backbone feature -> Linear-ReLU-Linear, 2048 -> 128) and a dense head, the
same MLP applied at every location (the official 1x1 convolutions; a Linear on [B, S, C] is the same map).
Per step, with one view as the query (q) and the other as the key (k), no symmetrisation:

    global: InfoNCE([q . k ; q . queue_g] / tau), label 0                                (B rows)
    dense:  location i of the query is matched to j*(i) = argmax_j cos(backbone_q[i], backbone_k[j]),
            InfoNCE([q_dense[i] . k_dense[j*(i)] ; q_dense[i] . queue_d] / tau), label 0  (B * S rows)
    loss = (1 - lambda) * global + lambda * dense,   lambda = 0.5, tau = 0.2

Matching uses the BACKBONE features (not the projections), many-to-one, without gradient
(``kernels.dense_match``). Both losses are ``kernels.info_nce(..., queue=, in_batch_negatives=False)``: the dense
one has B * S x 65,536 logits at the official shapes, which the Triton path never materialises. After the loss
the normalised keys enter queue_g and, for the dense queue, ONE vector per image: the mean over locations of the
key's dense projection, normalised (the official code pools before enqueueing; it does not store S per image).
The keys are written after the optimizer step, once the backward has read the queue: the op can then keep a
reference to the queue for its backward instead of a copy (32 MB per queue at the official size). With
``train.accum_steps`` > 1 the micro-batches of one step all contrast against the queue as it was at the start of
the step, and their keys enter it in order at the end.

Backbones: a ResNet's locations are its layer4 map ([B, 2048, 7, 7] -> S = 49 for a ResNet-50 at 224 px) and its
global feature the average pool of that map; on a ViT (not official) the locations are the final patch tokens
(after the last LayerNorm) and the global feature the cls token or the mean patch token (``pooling``).

``neck_bn`` (not official, off by default) puts a BatchNorm after both necks' hidden Linear, as MoCo v3's
projector: the digits preset needs it (a small random ViT pools nearly the same feature for every image).

Departures from the official code: no shuffle-BN (it needs several GPUs; a ViT has no BatchNorm and on one
process the key encoder's BatchNorms use the key batch's statistics, the leakage shuffle-BN exists to prevent);
the key encoder's BatchNorm running statistics are copied from the query encoder at each momentum update
(they are never used in training: the key encoder always runs on batch statistics). The momentum update runs
after each optimizer step instead of before each forward: the same sequence of key encoders.
The lambda warm-up (lambda = 0 for the first ``lambda_warmup_steps`` steps, the paper's recipe uses 10,000) is
off by default, as in the official configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt import kernels
from sslpt.engine.config import require
from sslpt.engine.data.views import two_views
from sslpt.engine.ema import EMATeacher
from sslpt.engine.models.backbones import backbone_flops, build_backbone, pool_tokens
from sslpt.engine.models.contrastive import ViewSettings
from sslpt.engine.models.heads import mlp_flops, mlp_head
from sslpt.engine.models.queue import FeatureQueue
from sslpt.engine.models.resnet import ResNet
from sslpt.engine.registry import register

from .base import Objective, StepContext


@dataclass(kw_only=True)
class DenseCLSettings(ViewSettings):
    """Defaults are the official ImageNet 200-epoch recipe (MoCo v2's augmentation, the same for both views)."""
    temperature: float = 0.2
    proj_hidden: int = 2048
    proj_dim: int = 128
    queue_size: int = 65536         # per queue (global and dense); any size >= the global batch (wraps around)
    key_momentum: float = 0.999     # key encoder EMA, constant
    loss_lambda: float = 0.5        # weight of the dense loss
    lambda_warmup_steps: int = 0    # lambda = 0 before this step (micro-step) count; the paper: 10000
    pooling: Literal["cls", "mean"] = "mean"   # ViT only: global feature from the cls or the mean patch token
    neck_bn: bool = False           # not official: BatchNorm after the necks' hidden Linear (MoCo v3's projector
    #                                 layout; the dense head's statistics are over all B x S locations)
    view_crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    blur_prob: tuple[float, float] = (0.5, 0.5)
    solarize_prob: tuple[float, float] = (0.0, 0.0)

    def check(self, cfg) -> None:
        super().check(cfg)
        key = self.key
        require(self.temperature > 0, f"{key('temperature')} must be > 0, got {self.temperature}")
        for name in ("proj_hidden", "proj_dim", "queue_size"):
            require(getattr(self, name) >= 1, f"{key(name)} must be >= 1, got {getattr(self, name)}")
        require(0.0 <= self.key_momentum <= 1.0, f"{key('key_momentum')} must be in [0, 1], got {self.key_momentum}")
        require(0.0 <= self.loss_lambda <= 1.0, f"{key('loss_lambda')} must be in [0, 1], got {self.loss_lambda}")
        require(self.lambda_warmup_steps >= 0,
                f"{key('lambda_warmup_steps')} must be >= 0, got {self.lambda_warmup_steps}")
        require(self.queue_size >= cfg.train.batch_size,
                f"{key('queue_size')} ({self.queue_size}) must be at least train.batch_size ({cfg.train.batch_size})"
                f" times the number of ranks: each step enqueues the keys of the whole global batch")


def _mlp(in_dim: int, hidden: int, out_dim: int, bn: bool) -> nn.Sequential:
    if bn:
        return mlp_head(in_dim, hidden, out_dim, num_layers=2, last_bn=False)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class DenseCLNet(nn.Module):
    """Backbone + DenseCL's neck: ``forward(imgs) -> (locations [B, S, C], global [B, dim], dense [B, S, dim])``,
    the locations being the backbone features used for matching."""

    def __init__(self, settings: DenseCLSettings, model):
        super().__init__()
        self.pooling = settings.pooling
        self.img_size = model.img_size
        self.encoder = build_backbone(model)
        width = self.encoder.embed_dim
        self.global_head = _mlp(width, settings.proj_hidden, settings.proj_dim, settings.neck_bn)
        self.dense_head = _mlp(width, settings.proj_hidden, settings.proj_dim, settings.neck_bn)
        for layer in self.global_head:   # the official neck re-initialises its Linear layers only, not the 1x1 convs
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.encoder, ResNet):
            fmap = self.encoder.feature_maps(imgs, ("layer4",))["layer4"]
            locations, pooled = fmap.flatten(2).transpose(1, 2), fmap.mean(dim=(2, 3))
        else:
            tokens = self.encoder(imgs)
            locations, pooled = tokens[:, 1:], pool_tokens(tokens, self.pooling)
        dense = self.dense_head(locations.flatten(0, 1)).unflatten(0, locations.shape[:2])   # [B*S, C] for BN
        return locations, self.global_head(pooled), dense

    def flops(self) -> float:
        """Forward FLOPs per view (the dense head at every location)."""
        locations = self._locations()
        return backbone_flops(self.encoder, self.img_size) + mlp_flops(self.global_head) \
            + locations * mlp_flops(self.dense_head)

    def _locations(self) -> int:
        if isinstance(self.encoder, ResNet):   # layer4's map: the image size over its stride, rounded up
            return (-(-self.img_size // self.encoder.stage_strides["layer4"])) ** 2
        return self.encoder.num_patches


@register
class DenseCL(Objective):
    name = "densecl"
    Settings = DenseCLSettings
    presets = ("densecl_digits", "densecl_resnet50_200ep", "densecl_vit_small")

    def __init__(self, settings: DenseCLSettings, model):
        super().__init__(settings, model)
        self.views = settings.view_specs()
        self.model = DenseCLNet(settings, model)
        self.teacher = EMATeacher(self.model)   # the key encoder and neck
        self.global_queue = FeatureQueue(settings.proj_dim, settings.queue_size)
        self.dense_queue = FeatureQueue(settings.proj_dim, settings.queue_size)
        # (global keys, pooled dense keys) of the micro-batches since the last optimizer step: written into the
        # queues once the backward that reads the queues is done. Empty whenever a checkpoint is taken.
        self.pending_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.teacher.update(self.settings.key_momentum)
        self.flush_keys()

    @torch.no_grad()
    def flush_keys(self) -> None:
        """Enqueue the keys of the forwards since the last optimizer step, in order."""
        for global_keys, dense_keys in self.pending_keys:
            self.global_queue.enqueue(global_keys)
            self.dense_queue.enqueue(dense_keys)
        self.pending_keys.clear()

    def loss_lambda(self, step: int) -> float:
        return 0.0 if step < self.settings.lambda_warmup_steps else self.settings.loss_lambda

    def contrast(self, q: torch.Tensor, k: torch.Tensor, queue: FeatureQueue) -> torch.Tensor:
        # no copy in fp32 (the queue is only written after the backward, see flush_keys)
        negatives = queue.features.to(q.dtype)
        return kernels.info_nce(q, k, self.settings.temperature, queue=negatives, in_batch_negatives=False)

    def forward(self, imgs: torch.Tensor, ctx: StepContext):
        im_q, im_k = two_views(imgs, ctx.generator, *self.views)
        q_locations, q_global, q_dense = self.model(im_q)
        with torch.no_grad():
            teacher = self.teacher.model
            teacher.train(self.training)   # batch statistics in the key encoder's BatchNorms, as the official one
            k_locations, k_global, k_dense = teacher(im_k)
            match, match_similarity = kernels.dense_match(q_locations, k_locations.to(q_locations.dtype))
            k_matched = k_dense.gather(1, match[..., None].expand(-1, -1, k_dense.shape[-1]))
        global_loss = self.contrast(q_global, k_global, self.global_queue)
        dense_loss = self.contrast(q_dense.flatten(0, 1), k_matched.flatten(0, 1), self.dense_queue)
        lam = self.loss_lambda(ctx.step)
        loss = (1.0 - lam) * global_loss + lam * dense_loss
        with torch.no_grad():
            if self.training:   # one pooled vector per image for the dense queue
                self.pending_keys.append((F.normalize(k_global.float(), dim=1),
                                          F.normalize(k_dense.float().mean(dim=1), dim=1)))
            positive_cos = F.cosine_similarity(q_global.float(), k_global.float(), dim=1).mean()
        return loss, {"loss_global": global_loss.detach(), "loss_dense": dense_loss.detach(),
                      "lambda": torch.tensor(lam, device=loss.device), "positive_cos": positive_cos,
                      "match_similarity": match_similarity.float().mean()}

    def flops_per_image(self) -> float:
        # query: forward + backward (3x); key: forward; both views of every image
        return 4 * self.model.flops()
