"""The training loop: one readable ``train_step``, per-iteration lr, mixed precision,
epoch checkpoints that resume exactly, evaluation pictures and a final linear probe."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

import kernels
from engine import viz
from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import Config, to_toml
from engine.data import build_eval_data, build_train_data
from engine.data.loader import derive_seed
from engine.objectives import StepContext, build_objective
from engine.optim import base_lr, build_optimizer, lr_at, set_lr
from engine.probe import run_probe
from engine.progress import Progress, format_duration

# dense bf16 tensor-core peaks (TFLOP/s) for MFU; other devices report achieved FLOP/s only
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA GPU is available")
    return device


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def step_generator(seed: int, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one step, a function of (seed, epoch, step, rank) alone, so a
    resumed run draws exactly the masks the uninterrupted run would have."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, epoch, step, rank, 1))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.objective.name}-{cfg.data.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(cfg.train.out_dir) / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(cfg.train.out_dir) / f"{name}-{suffix}"
    return path


@dataclass
class RunResult:
    run_dir: Path
    final_loss: float
    probe: dict | None


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool = False, show_progress: bool = True):
        self.cfg = cfg
        t = cfg.train
        kernels.set_backend(t.backend)
        self.device = resolve_device(t.device)
        if self.device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        torch.manual_seed(t.seed)
        self.run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        m, d = cfg.model, cfg.data
        self.data = build_train_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                     crop_scale=d.crop_scale, hflip=d.hflip, val_fraction=d.val_fraction,
                                     batch_size=t.batch_size, seed=t.seed, device=self.device,
                                     num_workers=d.num_workers, synthetic_size=d.synthetic_size)
        self.objective = build_objective(cfg).to(self.device)
        self.lr = base_lr(cfg.optim, t.batch_size * t.accum_steps)
        self.optimizer = build_optimizer(self.objective.trainable, cfg.optim, self.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.start_epoch = 0
        if resume:
            self._resume()
        (self.run_dir / "config.toml").write_text(to_toml(cfg))
        self.progress = Progress(t.epochs * self.data.steps_per_epoch, enabled=show_progress,
                                 start_step=self.start_epoch * self.data.steps_per_epoch)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int) -> dict:
        return {"epoch": epoch, "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "config": self.cfg.to_dict()}

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint to resume from in {self.run_dir / 'checkpoints'}")
        state = load_checkpoint(path, map_location=self.device)
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        # the checkpoint holds the last *completed* epoch: resume at the next one
        # (the official HPM code adds 1 twice and skips an epoch)
        self.start_epoch = state["epoch"] + 1

    def log(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    # ------------------------------------------------------------------ training
    def train_step(self, imgs: torch.Tensor, ctx: StepContext, update: bool) -> tuple[torch.Tensor, dict]:
        """Forward, backward and (when ``update``) the optimizer step and teacher update."""
        t = self.cfg.train
        with autocast(self.device, t.precision):
            loss, metrics = self.objective(imgs, ctx)
        self.scaler.scale(loss / t.accum_steps).backward()
        if update:
            if self.cfg.optim.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.objective.trainable.parameters(), self.cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.objective.after_optimizer_step(ctx.epoch)
        return loss.detach(), metrics

    def train(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        spe = self.data.steps_per_epoch
        flops = self.objective.flops_per_image()
        peak = peak_tflops(self.device)
        sums: dict[str, torch.Tensor] = {}
        count, last_loss = 0, float("nan")
        window_start, window_images = time.perf_counter(), 0
        if self.start_epoch >= t.epochs:
            self.progress.message(f"nothing to train: the checkpoint already completed all {t.epochs} epochs")
        for epoch in range(self.start_epoch, t.epochs):
            self.objective.train()
            self.objective.on_epoch_start(epoch)
            for i, (imgs, _) in enumerate(self.data.batches(epoch)):
                step = epoch * spe + i
                set_lr(self.optimizer, lr_at(epoch + i / spe, self.lr, cfg.optim.min_lr, cfg.optim.warmup_epochs,
                                             t.epochs))
                ctx = StepContext(epoch, step, step_generator(t.seed, epoch, step, 0, self.device))
                update = (i + 1) % t.accum_steps == 0 or i + 1 == spe
                loss, metrics = self.train_step(imgs, ctx, update)
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.float()
                count += 1
                window_images += imgs.shape[0]
                if (step + 1) % t.log_every == 0 or i + 1 == spe:
                    values = {k: float(v) / count for k, v in sums.items()}   # one host sync per log line
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(
                            f"non-finite loss at epoch {epoch} step {step}: {values}; the last complete checkpoint "
                            f"is kept in {self.run_dir / 'checkpoints'} (lower the lr or use precision=fp32)")
                    elapsed = time.perf_counter() - window_start
                    img_s = window_images / max(elapsed, 1e-9)
                    record = {"type": "train", "epoch": epoch, "step": step + 1,
                              "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": img_s, **values}
                    shown = {"loss": f"{values['loss']:.4f}", "lr": f"{record['lr']:.2e}", "img/s": f"{img_s:.0f}"}
                    if flops:
                        achieved = flops * img_s / 1e12
                        record["tflops"] = achieved
                        if peak:
                            record["mfu"] = achieved / peak
                            shown["MFU"] = f"{100 * record['mfu']:.1f}%"
                    self.log(record)
                    self.progress.update(step + 1, epoch, t.epochs, shown)
                    last_loss = values["loss"]
                    sums, count = {}, 0
                    window_start, window_images = time.perf_counter(), 0
            last = epoch + 1 == t.epochs
            if (t.eval_every and (epoch + 1) % t.eval_every == 0) or last:
                self.evaluate(epoch)
            if (epoch + 1) % t.save_every == 0 or last:
                save_checkpoint(self.run_dir, epoch, self.state_dict(epoch), keep=t.keep_checkpoints)
        probe = None
        if t.probe:
            self.progress.message("linear probe: pre-trained vs randomly initialised encoder ...")
            probe = run_probe(cfg, self.objective.encoder, self.device)
            (self.run_dir / "probe.json").write_text(json.dumps(probe, indent=2))
            self.log({"type": "probe", **probe})
        self.metrics_file.close()
        return RunResult(self.run_dir, last_loss, probe)

    # ------------------------------------------------------------------ evaluation
    def eval_batch(self) -> torch.Tensor:
        if not hasattr(self, "_eval_imgs"):
            m, d = self.cfg.model, self.cfg.data
            _, _, val_x, _ = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                             val_fraction=d.val_fraction, seed=0, synthetic_size=d.synthetic_size,
                                             max_images=64)
            self._eval_imgs = val_x[:64].to(self.device)
        return self._eval_imgs

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Pictures and metrics on a fixed held-out batch with a fixed random mask."""
        self.objective.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 12345)
        with autocast(self.device, self.cfg.train.precision):
            out = self.objective.evaluate(self.eval_batch(), generator)
        if not out:
            return {}
        m = self.cfg.model
        recon = viz_reconstruction(out["imgs"], out["pred"], m.patch_size, self.cfg.objective.norm_pix)
        pictures = self.run_dir / "pictures"
        viz.save_reconstructions(pictures / f"recon_epoch{epoch + 1:04d}.png", out["imgs"].float().cpu(),
                                 out["mask"].cpu(), recon.cpu(), m.patch_size, mean=self.data.mean, std=self.data.std)
        if "pred_score" in out:
            viz.save_hpm_panel(pictures / f"hpm_epoch{epoch + 1:04d}.png", out["imgs"].float().cpu(),
                               out["mask"].cpu(), out["pred_score"].float().cpu(), out["true_loss"].float().cpu(),
                               recon.cpu(), m.patch_size, mean=self.data.mean, std=self.data.std)
        metrics = out["metrics"]
        self.log({"type": "eval", "epoch": epoch, **metrics})
        self.progress.message(f"eval after epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


def viz_reconstruction(imgs: torch.Tensor, pred: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Predicted patches as an image; with norm_pix, undo the per-patch normalisation using the
    target's own statistics (as MAE's visualisation does)."""
    pred = pred.float()
    if norm_pix:
        target = kernels.patchify(imgs.float(), patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    return kernels.unpatchify(pred, patch_size, imgs.shape[1])


def pretrain(cfg: Config, *, run_dir: Path | None = None, resume: bool = False,
             show_progress: bool = True) -> RunResult:
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume, show_progress=show_progress)
    result = trainer.train()
    if show_progress:
        trainer.progress.message(f"done in {format_duration(time.perf_counter() - started)}")
    return result
