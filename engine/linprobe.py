"""MAE's linear-probing protocol (``python -m sslpt linprobe``), beside the quick L-BFGS probe of engine/eval.py.

The encoder is frozen. A BatchNorm without affine parameters followed by a linear layer is trained on its cls
token (or the mean of its patch tokens) with LARS: SGD with momentum in which the step of each weight matrix is
rescaled to ``trust_coefficient * ||w|| / ||update||``, so the lr is a relative step size. Warmup + cosine,
no weight decay, lr = blr * batch / 256, head initialised with std 0.01; top-1/top-5 on the val split.

Presets: ``vit_base_90ep`` is the paper's ImageNet run (90 epochs, batch 16,384, blr 0.1, 10 warmup epochs,
random resized crops and flips seen through the encoder every epoch). ``digits`` keeps the epochs, warmup,
optimizer and the paper's absolute lr (6.4 = 0.1 * 16384 / 256; under LARS it is a per-step relative change),
but a batch of 64: digits has 1,438 train images, so the paper's batch would be one step per epoch. Its
features are computed once, without augmentation (``augment = false``), as the images are 8x8.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslpt.engine.config import load_config, require
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.distributed import resolve_device
from sslpt.engine.eval import extract_features
from sslpt.engine.optim import lr_at
from sslpt.engine.pretrained import load_encoder
from sslpt.engine.protocols import output_dir, protocol_settings

PROTOCOL = "MAE linear probe: frozen encoder, BatchNorm (no affine) + linear head, LARS"


@dataclass(kw_only=True)
class LinprobeSettings:
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 16384        # total
    blr: float = 0.1               # lr = blr * batch_size / 256
    lr: float | None = None        # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    pool: Literal["cls", "mean"] = "cls"
    augment: bool = True           # crops + flips through the encoder every epoch; false: features once, plain
    seed: int = 0

    def check(self) -> None:
        require(self.epochs >= 1, f"linprobe.epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"linprobe.batch_size must be >= 1, got {self.batch_size}")
        require(self.warmup_epochs >= 0, f"linprobe.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(self.blr > 0 and (self.lr is None or self.lr > 0), "linprobe.blr and linprobe.lr must be > 0")
        require(0 <= self.momentum < 1, f"linprobe.momentum must be in [0, 1), got {self.momentum}")
        require(self.pool in ("cls", "mean"), f"linprobe.pool must be cls or mean, got {self.pool!r}")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


PRESETS = {"vit_base_90ep": {},
           "digits": {"batch_size": 64, "lr": 6.4, "augment": False}}


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on SGD with momentum. Parameters with more than one dimension get weight
    decay and the trust-ratio rescaling; vectors (biases, norms) take the plain momentum step."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * ratio
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


def probe_head(dim: int, classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


def train_probe(features_for_epoch, val_f: torch.Tensor, val_y: torch.Tensor, classes: int,
                s: LinprobeSettings, log=None) -> dict:
    """Train the BN + linear head. ``features_for_epoch(epoch)`` yields (features [b, D], labels [b]) batches."""

    torch.manual_seed(s.seed)
    head = probe_head(val_f.shape[1], classes)
    optimizer = LARS(head.parameters(), lr=s.base_lr, weight_decay=s.weight_decay, momentum=s.momentum,
                     trust_coefficient=s.trust_coefficient)
    for epoch in range(s.epochs):
        head.train()
        batches = list(features_for_epoch(epoch))
        total = 0.0
        for i, (x, y) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + i / len(batches), s.base_lr, s.min_lr, s.warmup_epochs, s.epochs)
            loss = F.cross_entropy(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        if log is not None:
            log({"type": "train", "epoch": epoch, "loss": total / len(batches)})
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_correct(head(val_f), val_y)
    return {"top1": top1 / len(val_y), "top5": top5 / len(val_y)}


def run_linprobe(args) -> dict:
    """The ``linprobe`` command: the encoder of a run or file, or (``--random-init``) a random one."""

    started = time.perf_counter()
    peek = _data_name(args)
    s, overrides = protocol_settings(LinprobeSettings, PRESETS, args.preset,
                                     "digits" if peek == "digits" else "vit_base_90ep", args.overrides, "linprobe")
    cfg, encoder, what = load_encoder(args.source, overrides, random_init=args.random_init)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = resolve_device(cfg.train.device)
    encoder = encoder.to(device).eval().requires_grad_(False)
    m, d = cfg.model, cfg.data
    _, _, val_x, val_y = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                         val_fraction=d.val_fraction, seed=0, synthetic_size=d.synthetic_size,
                                         max_image_pixels=d.max_image_pixels, decoder=d.decoder)

    def feats(imgs):
        return extract_features(lambda x: encoder.features(x.float(), pool=s.pool), imgs, 256, device)

    val_f = feats(val_x)
    if s.augment:
        data = build_train_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                crop_scale=d.crop_scale, hflip=d.hflip, val_fraction=d.val_fraction,
                                batch_size=s.batch_size, seed=s.seed, device=device, num_workers=d.num_workers,
                                synthetic_size=d.synthetic_size, max_image_pixels=d.max_image_pixels, decoder=d.decoder)

        def features_for_epoch(epoch):
            for imgs, labels in data.batches(epoch):
                yield feats(imgs), labels.cpu()
        classes = int(val_y.max()) + 1
    else:
        train_x, train_y, _, _ = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                                 val_fraction=d.val_fraction, seed=0,
                                                 synthetic_size=d.synthetic_size, max_image_pixels=d.max_image_pixels,
                                                 decoder=d.decoder)
        train_f = feats(train_x)
        classes = int(max(train_y.max(), val_y.max())) + 1

        def features_for_epoch(epoch):
            order = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(s.seed * 100003 + epoch))
            for lo in range(0, max(len(order) - s.batch_size, 0) + 1, s.batch_size):   # full batches only
                idx = order[lo:lo + s.batch_size]
                yield train_f[idx], train_y[idx]
    out = output_dir(args, "linprobe")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "w") as log_file:
        scores = train_probe(features_for_epoch, val_f, val_y, classes, s,
                             log=lambda r: log_file.write(json.dumps(r) + "\n"))
    result = {"protocol": PROTOCOL, "encoder": what, **scores, "val_images": len(val_y), "pool": s.pool,
              "lr": s.base_lr, "seconds": round(time.perf_counter() - started, 1), "settings": asdict(s)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    result["folder"] = str(out)
    return result


def _data_name(args) -> str:
    """The data set the command will use (its own --set, else the run's config), to pick the default preset."""
    for item in args.overrides:
        if item.replace(" ", "").startswith("data.name="):
            return item.split("=", 1)[1].strip().strip("\"'")
    if Path(args.source).is_dir() and (Path(args.source) / "config.toml").is_file():
        return load_config(Path(args.source) / "config.toml").data.name
    return "digits"
