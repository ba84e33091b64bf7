"""End-to-end fine-tuning of a pre-trained ViT with MAE's recipe (``python -m sslpt finetune``).

The classifier is the encoder, a pooling (mean of the patch tokens through a fresh LayerNorm, ``fc_norm``, in
place of the encoder's final norm; or the normalised cls token) and a linear head initialised with std 2e-5.
The position table becomes a trained parameter, as in MAE's fine-tuning. Training: AdamW (0.9, 0.999) with
layer-wise lr decay (the embeddings get ``decay^(depth+1)``, block i ``decay^(depth-i)``, the pooling norm and the
head 1), no weight decay on vectors, cls token and position table, linear drop-path rates rising to
``drop_path`` over the blocks, mixup / cutmix (one pair per batch) on label-smoothed one-hot targets, warmup +
cosine per step, lr = blr * total batch / 256. Top-1 and top-5 on the val split after each ``eval_every`` epochs.

Augmentation, in timm's order: the pre-training crop and flip (``data.crop_scale`` / ``data.hflip``), then
RandAugment (``rand_augment``, timm's string, default ``rand-m9-mstd0.5-inc1``; "" or "none" turns it off) in
[0, 1] pixel space (the batch is un-normalised with the pipeline's mean and std, or for tensor data sets, which
are standardised with scalar statistics, with the map that sends the train set's minimum and maximum to 0 and
1; geometric ops fill with the mean colour), then normalisation, random erasing (``reprob``, default 0.25) and
mixup / cutmix. Both run batched on the device (engine/data/randaugment.py) from a per-step generator.

Machinery shared with pre-training: devices, ``train.precision`` (autocast, fp16 loss scaling), ``train.parallel``
(DDP / FSDP2 under torchrun), the non-finite step guard, DCP checkpoints in ``<out>/checkpoints``. Every random
draw (batch order, crops, RandAugment, erasing, mixup, drop path) is a function of (seed, epoch, step, rank), so
``--resume auto`` continues bit for bit on the CPU.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, require
from sslpt import kernels
from sslpt.engine.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint, select_checkpoint
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.data.loader import TrainData, derive_seed
from sslpt.engine.data.randaugment import FORM, RandAugmentSpec, parse_rand_augment, rand_augment, random_erase
from sslpt.engine.distributed import (ShardAwareGradScaler, configure_process, gradient_sync, init_distributed,
                                      parallelize, shutdown)
from sslpt.engine.linprobe import _data_name, topk_correct
from sslpt.engine.optim import lr_at, set_lr
from sslpt.engine.pretrained import load_encoder
from sslpt.engine.protocols import output_dir, protocol_settings
from sslpt.engine.train import autocast, train_step_optimizer
from sslpt.engine.models.vit import VisionTransformer

PROTOCOL = "MAE fine-tuning: layer-wise lr decay, drop path, mixup/cutmix, label smoothing, warmup + cosine"


@dataclass(kw_only=True)
class FinetuneSettings:
    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 1024          # total over ranks and accumulation steps
    accum_steps: int = 1
    blr: float = 5e-4               # lr = blr * batch_size / 256
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8              # Beta(a, a) concentration; 0 = off
    cutmix: float = 1.0             # 0 = off
    mix_prob: float = 1.0           # probability that a batch is mixed at all
    switch_prob: float = 0.5        # with both on: probability of cutmix rather than mixup
    smoothing: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"   # timm's RandAugment string; "" or "none" = off
    reprob: float = 0.25            # random erasing probability per image; 0 = off
    pool: Literal["avg", "cls"] = "avg"
    clip_grad: float | None = None
    seed: int = 0
    eval_every: int = 1             # epochs between val evaluations (and always the last)
    save_every: int = 1             # epochs between checkpoints (and always the last)

    def check(self) -> None:
        require(self.epochs >= 1, f"finetune.epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1 and self.accum_steps >= 1, "finetune.batch_size and accum_steps must be >= 1")
        require(self.warmup_epochs >= 0, f"finetune.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(0 < self.layer_decay <= 1, f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        require(0 <= self.drop_path < 1, f"finetune.drop_path must be in [0, 1), got {self.drop_path}")
        require(self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup and finetune.cutmix must be >= 0")
        require(0 <= self.mix_prob <= 1 and 0 <= self.switch_prob <= 1, "finetune.mix_prob/switch_prob: [0, 1]")
        require(0 <= self.smoothing < 1, f"finetune.smoothing must be in [0, 1), got {self.smoothing}")
        require(self.pool in ("avg", "cls"), f"finetune.pool must be avg or cls, got {self.pool!r}")
        require(self.eval_every >= 0 and self.save_every >= 1, "finetune.eval_every >= 0, save_every >= 1")
        require(isinstance(self.reprob, (int, float)) and 0 <= self.reprob <= 1,
                f"finetune.reprob must be a probability in [0, 1], got {self.reprob!r}")
        try:
            self.rand_augment_spec
        except (ValueError, AttributeError, TypeError) as err:
            raise ConfigError(f"finetune.rand_augment={self.rand_augment!r} is not a RandAugment string ({err}); "
                              f"expected {FORM}") from None

    @property
    def rand_augment_spec(self) -> RandAugmentSpec | None:
        """The parsed ``rand_augment`` (None: off)."""
        return parse_rand_augment(self.rand_augment)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


# vit_base_100ep: MAE's ViT-B recipe, which HPM's ViT-B fine-tuning also follows (100 epochs). digits: the same
# recipe sized for 1,438 8x8 train images and a 4-block encoder on the CPU, without RandAugment: on 8x8 digits a
# translation by up to 3.6 pixels, a shear or a rotation often changes or erases the class (measured: 10 epochs
# from a random encoder, seed 0, reached 10.9% top-1 with it, chance, and 19.5% without); erasing stays.
PRESETS = {"vit_base_100ep": {},
           "digits": {"epochs": 30, "warmup_epochs": 3, "batch_size": 64, "blr": 2e-3, "layer_decay": 0.75,
                      "drop_path": 0.1, "rand_augment": "none", "reprob": 0.0}}


# settings added after the first release, with the values that checkpoints written without them trained with
_ADDED_SETTINGS = {"rand_augment": "none", "reprob": 0.0}


def settings_differences(saved: dict, current: dict) -> str:
    """The fields where a checkpoint's settings and this run's differ ("" if none), e.g. "reprob: 0.0 -> 0.25"."""
    saved = {**_ADDED_SETTINGS, **saved}
    current = json.loads(json.dumps(current))   # tuples as lists, as the checkpoint stores them
    return ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
                     for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key))


class Classifier(nn.Module):
    """encoder -> pool -> head. Under ``train.parallel`` the encoder's blocks are wrapped as in pre-training."""

    def __init__(self, encoder: VisionTransformer, classes: int, pool: str = "avg", drop_path: float = 0.0):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        pos = encoder._buffers.pop("pos_embed")   # trained while fine-tuning
        encoder.pos_embed = nn.Parameter(pos.detach().clone())
        width = encoder.embed_dim
        if pool == "avg":
            encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(width, classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        depth = len(encoder.blocks)
        for i, block in enumerate(encoder.blocks):
            block.drop_path = drop_path * i / max(depth - 1, 1)

    @property
    def trainable(self) -> nn.Module:
        return self

    def evaluate(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: a method of its own so FSDP gathers the root for it, as for objectives."""
        return self.forward(imgs)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(imgs)
        feature = tokens[:, 1:].mean(dim=1) if self.pool == "avg" else tokens[:, 0]
        return self.head(self.fc_norm(feature))


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale = layer_decay ** (depth + 1 - layer)`` (layer 0: cls token, position table,
    patch embedding; i + 1: block i; depth + 1: everything after the blocks) and no decay on vectors, the cls
    token and the position table."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        short = name.removeprefix("encoder.")
        if short in ("cls_token", "pos_embed") or short.startswith("patch_embed"):
            layer = 0
        elif short.startswith("blocks."):
            layer = int(short.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = not (param.ndim == 1 or short in ("cls_token", "pos_embed"))
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def pixel_stats(data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, C, 1, 1] with normalised = (pixel - mean) / std, pixel in [0, 1]: the pipeline's own
    statistics, or for standardised tensor data sets (no mean/std; digits, synthetic) the map that sends the
    train images' minimum and maximum to 0 and 1 (for digits exactly the 0..16 pixel scale)."""
    if data.mean is not None:
        mean = torch.tensor(data.mean, dtype=torch.float32)
        std = torch.tensor(data.std, dtype=torch.float32)
    else:
        lo, hi = data.imgs.min().item(), data.imgs.max().item()
        scale = 1.0 / max(hi - lo, 1e-12)
        mean = torch.full((data.channels,), -lo * scale)
        std = torch.full((data.channels,), scale)
    return mean.view(1, -1, 1, 1).to(data.device), std.view(1, -1, 1, 1).to(data.device)


def augment_batch(imgs: torch.Tensor, s: FinetuneSettings, mean: torch.Tensor, std: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """RandAugment in pixel space (un-normalised with mean/std, filled with the mean colour), then random
    erasing of the normalised images; a pure function of (imgs, generator state)."""
    spec = s.rand_augment_spec
    if spec is not None:
        pixels = rand_augment(imgs * std + mean, spec, generator, fill=mean.flatten())
        imgs = (pixels - mean) / std
    return random_erase(imgs, s.reprob, generator)


def mix_batch(imgs: torch.Tensor, labels: torch.Tensor, classes: int, s: FinetuneSettings,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets): label smoothing, then with probability ``mix_prob`` mixup or cutmix of the
    batch with its reverse (one coefficient per batch; cutmix's coefficient is the pasted box's true area)."""
    off = s.smoothing / classes
    targets = torch.full((len(labels), classes), off, device=imgs.device)
    targets.scatter_(1, labels[:, None], 1.0 - s.smoothing + off)
    if (s.mixup <= 0 and s.cutmix <= 0) or rng.random() >= s.mix_prob:
        return imgs, targets
    use_cutmix = s.cutmix > 0 and (s.mixup <= 0 or rng.random() < s.switch_prob)
    lam = float(rng.beta(s.cutmix, s.cutmix) if use_cutmix else rng.beta(s.mixup, s.mixup))
    flipped = imgs.flip(0)
    if use_cutmix:
        height, width = imgs.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
        x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
        imgs = imgs.clone()
        imgs[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        imgs = imgs * lam + flipped * (1.0 - lam)
    return imgs, targets * lam + targets.flip(0) * (1.0 - lam)


@torch.no_grad()
def evaluate(model: Classifier, val_x: torch.Tensor, val_y: torch.Tensor, device, precision: str) -> dict:

    was_training = model.training
    model.eval()
    hits, loss = [0, 0], 0.0
    for lo in range(0, len(val_x), 256):
        x, y = val_x[lo:lo + 256].to(device), val_y[lo:lo + 256].to(device)
        with autocast(device, precision):
            logits = model.evaluate(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        hits = [a + b for a, b in zip(hits, topk_correct(logits, y))]
    model.train(was_training)
    return {"top1": hits[0] / len(val_y), "top5": hits[1] / len(val_y), "val_loss": loss / len(val_y)}


class FineTuner:
    """One fine-tuning run; ``resume``: None / False (fresh), "auto" (the newest checkpoint if any) or a path."""

    def __init__(self, cfg, encoder: VisionTransformer, s: FinetuneSettings, out: Path, resume=None,
                 show_progress: bool = True, source: str = ""):

        self.cfg, self.s, self.out, self.source = cfg, s, Path(out), source
        t, m, d = cfg.train, cfg.model, cfg.data
        kernels.set_backend(t.backend)
        self.dist = init_distributed(t.parallel, t.device, t.dist_timeout_s)
        self.device = self.dist.device
        configure_process(t, self.device)
        world = self.dist.world_size
        per_rank, rest = divmod(s.batch_size, world * s.accum_steps)
        require(rest == 0 and per_rank >= 1, f"finetune.batch_size={s.batch_size} must be a multiple of the "
                f"world size ({world}) times finetune.accum_steps ({s.accum_steps})")
        self.data = build_train_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                     crop_scale=d.crop_scale, hflip=d.hflip, val_fraction=d.val_fraction,
                                     batch_size=per_rank, seed=s.seed, device=self.device, rank=self.dist.rank,
                                     world_size=world, num_workers=d.num_workers, synthetic_size=d.synthetic_size,
                                     max_image_pixels=d.max_image_pixels, decoder=d.decoder)
        _, train_y, self.val_x, self.val_y = build_eval_data(
            d.name, path=d.path, img_size=m.img_size, channels=m.in_chans, val_fraction=d.val_fraction, seed=0,
            synthetic_size=d.synthetic_size, max_image_pixels=d.max_image_pixels, max_images=None, decoder=d.decoder)
        self.classes = int(max(train_y.max(), self.val_y.max())) + 1
        self.pixel_mean, self.pixel_std = pixel_stats(self.data)
        torch.manual_seed(s.seed)   # the head's initial weights, the same on every rank
        self.module = Classifier(encoder, self.classes, s.pool, s.drop_path).to(self.device)
        self.model = parallelize(self.module, t, self.dist)
        self.optimizer = torch.optim.AdamW(layer_decay_groups(self.module, s.weight_decay, s.layer_decay),
                                           lr=s.base_lr, betas=tuple(s.betas), fused=True)
        scaler_cls = ShardAwareGradScaler if t.parallel == "fsdp" else torch.amp.GradScaler
        self.scaler = scaler_cls(self.device.type, enabled=t.precision == "fp16")
        self.next_step, self.history = 0, []
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume(resume)
        self.log_file = open(self.out / "metrics.jsonl", "a") if self.dist.is_main else None
        self.show_progress = show_progress and self.dist.is_main

    def _resume(self, resume) -> None:

        if resume == "auto":
            path, _ = select_checkpoint(self.out)
            if path is None:
                return
        else:
            path = resolve_checkpoint(Path(resume))
        state = load_checkpoint(path, self.module, [self.optimizer])
        differences = settings_differences(state.get("settings") or {}, asdict(self.s))
        if differences:
            raise CheckpointError(f"checkpoint {path} was written with other fine-tuning settings ({differences}): "
                                  f"resume with the same --preset and --set values (see {self.out / 'settings.json'})")
        self.next_step, self.history = state["next_step"], state["history"]

    def log(self, record: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def save(self) -> None:

        state = {"next_step": self.next_step, "history": self.history, "settings": asdict(self.s)}
        save_checkpoint(self.out, self.next_step, self.module, [self.optimizer], state, keep=2)

    def train(self) -> dict:

        s, t = self.s, self.cfg.train
        spe = self.data.steps_per_epoch
        started = time.perf_counter()
        if self.dist.is_main:
            (self.out / "settings.json").write_text(json.dumps({"protocol": PROTOCOL, "source": self.source,
                                                                "settings": asdict(s)}, indent=2) + "\n")
        start_epoch, first = divmod(self.next_step, spe)
        for epoch in range(start_epoch, s.epochs):
            self.model.train()
            losses = []
            for i, (imgs, labels) in enumerate(self.data.batches(epoch, first if epoch == start_epoch else 0),
                                               start=first if epoch == start_epoch else 0):
                step = epoch * spe + i
                set_lr(self.optimizer, lr_at(epoch + i / spe, s.base_lr, s.min_lr, s.warmup_epochs, s.epochs))
                rng = np.random.default_rng(derive_seed(s.seed, epoch, step, self.dist.rank, 3))
                torch.manual_seed(derive_seed(s.seed, epoch, step, self.dist.rank, 4))   # drop path
                if s.rand_augment_spec is not None or s.reprob > 0:
                    g = torch.Generator(device=self.device).manual_seed(
                        derive_seed(s.seed, epoch, step, self.dist.rank, 5))
                    imgs = augment_batch(imgs, s, self.pixel_mean, self.pixel_std, g)
                imgs, targets = mix_batch(imgs, labels, self.classes, s, rng)
                update = (i + 1) % s.accum_steps == 0 or i + 1 == spe
                with gradient_sync(self.model, update):
                    with autocast(self.device, t.precision):
                        logits = self.model(imgs)
                    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                    self.scaler.scale(loss / s.accum_steps).backward()
                if update:
                    train_step_optimizer(self.optimizer, self.scaler, s.clip_grad)
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                self.next_step = step + 1
            last = epoch + 1 == s.epochs
            record = {"type": "train", "epoch": epoch, "loss": torch.stack(losses).mean().item(),
                      "lr": self.optimizer.param_groups[-1]["lr"]}
            if (s.eval_every and (epoch + 1) % s.eval_every == 0) or last:
                record.update(evaluate(self.module, self.val_x, self.val_y, self.device, t.precision))
                self.history.append({"epoch": epoch + 1, "top1": record["top1"], "top5": record["top5"]})
            self.log(record)
            if self.show_progress:
                extra = f", top-1 {100 * record['top1']:.1f}%" if "top1" in record else ""
                print(f"fine-tune epoch {epoch + 1}/{s.epochs}: loss {record['loss']:.4f}{extra} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            if (epoch + 1) % s.save_every == 0 or last:
                self.save()
        final = self.history[-1] if self.history else {}
        result = {"protocol": PROTOCOL, "encoder": self.source, "top1": final.get("top1"), "top5": final.get("top5"),
                  "best_top1": max((h["top1"] for h in self.history), default=None), "epochs": s.epochs,
                  "val_images": len(self.val_y), "seconds": round(time.perf_counter() - started, 1),
                  "history": self.history, "settings": asdict(s)}
        if self.dist.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if self.log_file is not None:
            self.log_file.close()
        return result


def run_finetune(args) -> dict:
    """The ``finetune`` command."""

    default = "digits" if _data_name(args) == "digits" else "vit_base_100ep"
    s, overrides = protocol_settings(FinetuneSettings, PRESETS, args.preset, default, args.overrides, "finetune")
    cfg, encoder, what = load_encoder(args.source, overrides, random_init=args.random_init)
    if not isinstance(encoder, VisionTransformer):   # the recipe (layer decay, drop path, pooling) is ViT-only
        raise ConfigError(f"finetune implements MAE's ViT recipe; {args.source} holds a {type(encoder).__name__} "
                          f"(use linprobe, or export it and fine-tune with torchvision/timm)")
    out = output_dir(args, "finetune")
    tuner = FineTuner(cfg, encoder, s, out, resume=args.resume, show_progress=not args.quiet, source=what)
    try:
        result = tuner.train()
    finally:
        shutdown(tuner.dist)
    return {**result, "folder": str(out), "is_main": tuner.dist.is_main}
