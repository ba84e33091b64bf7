"""The training loop: one readable ``train_step``, per-iteration lr, bf16/fp16/fp32, DDP or FSDP2 under
torchrun, a non-finite guard without host syncs, DCP checkpoints that resume exactly (mid-epoch too),
evaluation pictures and a final linear probe."""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from sslpt import kernels
from sslpt.engine import faults, viz
from sslpt.engine.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, read_commit,
                               resolve_checkpoint, save_checkpoint, select_checkpoint, verify)
from sslpt.engine.config import Config, ConfigError, to_toml
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.data.loader import derive_seed
from sslpt.engine.distributed import (DTensor, ShardAwareGradScaler, barrier, broadcast_object, gradient_sync,
                                configure_process, init_distributed, local_tensor, parallelize, resolve_device,
                                shutdown)
from sslpt.engine.curves import plot_runs
from sslpt.engine.ema import rebind_teachers
from sslpt.engine.eval import fit_linear_classifier
from sslpt.engine.loggers import Loggers
from sslpt.engine.models.heads import sync_batchnorm_if_distributed
from sslpt.engine.objectives import EvalOutput, StepContext, build_objective
from sslpt.engine.optim import base_lr, clip_grad_per_param_, lr_at, set_lr, set_weight_decay, weight_decay_at
from sslpt.engine.probe import run_probe
from sslpt.engine.progress import PEAK_TFLOPS, MetricWindow, Progress, format_duration, peak_tflops, progress_fields
from sslpt.engine.run_dir import RunDirError, RunLock, check_run_name, no_space, write_atomic
from sslpt.engine.run_dir import new_run_dir as create_run_dir

__all__ = ["Trainer", "RunResult", "pretrain", "train_step_optimizer", "autocast", "step_generator",
           "resolve_device", "peak_tflops", "PEAK_TFLOPS"]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def step_generator(seed: int, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one step, a function of (seed, epoch, step, rank) alone, so a
    resumed run draws exactly the masks the uninterrupted run would have."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, epoch, step, rank, 1))


def new_run_dir(cfg: Config) -> Path:
    """out_dir/run_name exactly (so a restarted job finds its checkpoints; never outside out_dir), else a new
    timestamped folder, created exclusively (two runs started at once never get the same one)."""
    if cfg.train.run_name:
        if (why := check_run_name(cfg.train.run_name)) is not None:
            raise ConfigError(f"train.run_name={cfg.train.run_name!r} {why}: it must name a folder inside "
                              f"train.out_dir; use --run-dir for a folder elsewhere")
        return Path(cfg.train.out_dir) / cfg.train.run_name
    name = f"{cfg.objective.name}-{cfg.data.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return create_run_dir(cfg.train.out_dir, name)


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A 0-dim float flag on the device: 1 if any gradient holds inf/NaN (GradScaler's own check, scale 1).
    Sharded gradients are checked locally and the flag all-reduced, so every rank decides alike."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = grads[0].device
    found = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(local_tensor(g))
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    if isinstance(grads[0], DTensor):
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return found


def train_step_optimizer(optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer],
                         scaler: torch.amp.GradScaler, clip_grad: float | None,
                         clip_mode: str = "global") -> torch.Tensor:
    """Clip and apply the updates unless a gradient is non-finite; returns the 0-dim "skipped" flag.

    All optimizers skip together: one non-finite gradient anywhere skips every update of the step. The
    decision stays on the device, as GradScaler's does for fp16 overflows: the fused AdamW reads ``found_inf``
    and leaves parameters and optimizer state (step count included) untouched when it is set. Clipping is per
    optimizer (each one's parameters are a model of its own).
    """
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    if scaler.is_enabled():
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        found = sum(sum(scaler._found_inf_per_device(o).values()) for o in optimizers).clamp(max=1)
    else:
        found = torch.stack([nonfinite_gradients(o) for o in optimizers]).amax()
    if clip_grad is not None:
        for optimizer in optimizers:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if clip_mode == "per_param":   # DINO-style: each parameter's gradient norm clipped on its own
                clip_grad_per_param_(params, clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
    for optimizer in optimizers:
        if scaler.is_enabled():
            scaler.step(optimizer)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf, optimizer.grad_scale = found, None
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        elif not bool(found):   # an optimizer without on-device skipping (not fused): one host sync
            optimizer.step()
    if scaler.is_enabled():
        scaler.update()
    return found


@dataclass
class RunResult:
    run_dir: Path
    final_loss: float
    probe: dict | None
    is_main: bool = True
    skipped_images: int = 0     # undecodable or oversized images replaced, all epochs and ranks


class Trainer:
    """``resume``: False (fresh; refuses a run folder that holds checkpoints), True (the newest complete
    checkpoint, which must exist), "auto" (the newest if any, else fresh) or a checkpoint folder."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool | str | Path = False,
                 show_progress: bool = True):
        self.cfg = cfg
        t = cfg.train
        kernels.set_backend(t.backend)
        self.dist = init_distributed(t.parallel, t.device, t.dist_timeout_s)
        self.lock: RunLock | None = None
        try:
            self._setup(resume, run_dir, show_progress)
        except BaseException:
            self.release()
            shutdown(self.dist)
            raise

    def release(self) -> None:
        """Give the run folder back (its lock file); the run is over."""
        if self.lock is not None:
            self.lock.release()

    def _setup(self, resume, run_dir: Path | None, show_progress: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = self.dist.device
        configure_process(t, self.device)
        main = self.dist.is_main
        chosen = self._claim_run_dir(run_dir) if main else None
        chosen = broadcast_object(chosen, self.dist)
        if isinstance(chosen, BaseException):
            raise chosen if main else RunDirError(str(chosen))
        self.run_dir = Path(chosen)
        resume_from = self._checkpoint_to_resume(resume)
        m, d = cfg.model, cfg.data
        world = self.dist.world_size
        try:
            self.data = build_train_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                         crop_scale=d.crop_scale, hflip=d.hflip, val_fraction=d.val_fraction,
                                         batch_size=t.batch_size, seed=t.seed, device=self.device,
                                         rank=self.dist.rank, world_size=world, num_workers=d.num_workers,
                                         synthetic_size=d.synthetic_size, max_image_pixels=d.max_image_pixels,
                                         decoder=d.decoder)
        except ValueError as err:   # the data and the config do not fit: a one-line message naming the field
            raise ConfigError(f"data.name={d.name!r}: {err}") from err
        self.skipped_images = 0
        self.save_deferred = False
        torch.manual_seed(t.seed)   # identical initial weights on every rank
        # SyncBatchNorm where ranks train on GPUs together (it has no CPU kernel: on CPU each rank normalises
        # its own batch); students and teachers alike, as the official contrastive codes convert whole models
        objective = build_objective(cfg)
        if t.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.modules()):
            raise ConfigError(f"train.batch_size={t.batch_size}: the {cfg.objective.name} networks of this config "
                              f"have BatchNorm layers, which need at least 2 images per device in training")
        self.objective = sync_batchnorm_if_distributed(objective, self.device.type == "cuda").to(self.device)
        self.model = parallelize(self.objective, t, self.dist)
        rebind_teachers(self.objective)   # the students' tensors may have been replaced (sharded, converted)
        self.lr = base_lr(cfg.optim, t.batch_size * t.accum_steps * world)
        self.optimizers = self.objective.optimizers(cfg.optim, self.lr)
        if not self.optimizers:
            raise ValueError(f"objective {cfg.objective.name!r} returned no optimizer from optimizers()")
        scaler_cls = ShardAwareGradScaler if t.parallel == "fsdp" else torch.amp.GradScaler
        self.scaler = scaler_cls(self.device.type, enabled=t.precision == "fp16")
        self.next_step = 0        # global index of the next micro-step (epoch * steps_per_epoch + step in epoch)
        self.last_save_step = 0
        self.skipped_total = torch.zeros((), device=self.device)
        self.window = MetricWindow(self.device, world, self.objective.flops_per_image())
        self.step_skipped: torch.Tensor | None = None
        if resume_from is not None:
            self._resume(resume_from)
        if main:
            write_atomic(self.run_dir / "config.toml", to_toml(cfg))
        spe = self.data.steps_per_epoch
        self.progress = Progress(t.epochs * spe, enabled=show_progress and main, start_step=self.next_step)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
        self.loggers = Loggers(t.loggers, self.run_dir, cfg.to_dict(), enabled=main)
        if resume_from is not None:   # steps logged after this checkpoint by the dead run are logged again
            self.log({"type": "resume", "checkpoint": resume_from.name, "step": self.next_step,
                      "skipped_checkpoints": {p.name: why for p, why in self.resume_skipped}})
        self.last_loss = float("nan")
        barrier(self.dist)

    # ------------------------------------------------------------------ state
    def _claim_run_dir(self, run_dir: Path | None) -> str | BaseException:
        """Rank 0: create the run folder (exclusively when it is named here) and lock it for this run."""
        try:
            path = Path(run_dir) if run_dir is not None else new_run_dir(self.cfg)
            path.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(path)
            return str(path)
        except (RunDirError, ConfigError) as err:
            return err
        except OSError as err:
            return no_space(err, Path(run_dir or self.cfg.train.out_dir)) or err

    def _checkpoint_to_resume(self, resume) -> Path | None:
        """Rank 0 picks (and verifies) the checkpoint, the others follow; an error stops every rank alike."""
        choice = None
        if self.dist.is_main:
            try:
                choice = self._choose_checkpoint(resume)
            except CheckpointError as err:
                choice = err
        choice = broadcast_object(choice, self.dist)
        if isinstance(choice, BaseException):
            raise CheckpointError(str(choice))
        path, self.resume_skipped = choice
        for skipped, why in self.resume_skipped:
            if self.dist.is_main:
                print(f"warning: skipped checkpoint {skipped.name}: {why}", file=sys.stderr)
        if path is not None and self.resume_skipped and self.dist.is_main:
            print(f"resuming from {path.name}, the newest checkpoint that verifies", file=sys.stderr)
        return path

    def _choose_checkpoint(self, resume) -> tuple[Path | None, list[tuple[Path, str]]]:
        folder = self.run_dir / "checkpoints"
        if resume is False or resume is None:
            newest = latest_checkpoint(self.run_dir)
            if newest is not None:
                raise CheckpointError(
                    f"run folder {self.run_dir} already holds checkpoints (newest: {newest.name}); nothing was "
                    f"overwritten. Continue it with --resume auto (or `python -m sslpt resume {self.run_dir}`), "
                    f"or start a new run in another folder (--run-dir)")
            return None, []
        if resume is True or resume == "auto":
            path, skipped = select_checkpoint(self.run_dir)
            if path is None and skipped:   # asked to resume: never start from scratch over them
                reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
                raise CheckpointError(
                    f"none of the {len(skipped)} checkpoints in {folder} verifies ({reasons}); nothing was loaded "
                    f"and no training was started. Restore a checkpoint from a copy, or start a new run in another "
                    f"folder (--run-dir)")
            if path is None and resume is True:
                raise CheckpointError(f"no complete checkpoint to resume from in {folder}; start the run with "
                                      f"`python -m sslpt pretrain CONFIG --run-dir {self.run_dir}`, or use "
                                      f"--resume auto to start fresh when there is none")
            return path, skipped
        path = resolve_checkpoint(Path(resume))
        if (why := verify(path)) is not None:
            raise CheckpointError(f"checkpoint {path} failed verification: {why}. It was not loaded; choose another "
                                  f"one in {path.parent}, or --resume auto for the newest that verifies")
        return path, []

    def trainer_state(self) -> dict:
        t, spe = self.cfg.train, self.data.steps_per_epoch
        epoch, step_in_epoch = divmod(self.next_step, spe)
        return {"next_step": self.next_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "steps_per_epoch": spe, "world_size": self.dist.world_size, "batch_size": t.batch_size,
                "accum_steps": t.accum_steps, "parallel": t.parallel, "skipped_steps": int(self.skipped_total),
                "consecutive_skips": int(self.window.run), "scaler": self.scaler.state_dict(),
                "saved_at": datetime.now().isoformat(timespec="seconds")}

    def _resume(self, path: Path) -> None:
        saved, t = read_commit(path), self.cfg.train
        here = (self.dist.world_size, t.batch_size, t.accum_steps)
        there = (saved["world_size"], saved["batch_size"], saved["accum_steps"])
        if here != there:
            raise CheckpointError(
                f"checkpoint {path} was written by {there[0]} processes x train.batch_size={there[1]} x "
                f"train.accum_steps={there[2]}; this run has {here[0]} x {here[1]} x {here[2]}. The data order, "
                f"the mid-epoch position and the lr scaling depend on them: resume with the same number of "
                f"processes (torchrun --nnodes/--nproc-per-node) and the same batch settings")
        state = load_checkpoint(path, self.objective, self.optimizers, verified=True)   # rank 0 verified it
        rebind_teachers(self.objective)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.next_step = self.last_save_step = state["next_step"]
        self.skipped_total.fill_(state["skipped_steps"])
        self.window.run.fill_(state["consecutive_skips"])
        self.window.max_run.fill_(state["consecutive_skips"])

    def save(self) -> Path | None:
        """A checkpoint of the state after the last completed step (every rank calls it). Deferred (None) while
        the latest optimizer steps were skipped as non-finite: a run that is diverging must not rotate away the
        checkpoints written before its first skipped step; the save is retried at each later optimizer step."""
        t = self.cfg.train
        if t.nonfinite == "fail":
            self._check_pending_nonfinite()
        streak = self._pending_skips()
        if streak:
            if not self.save_deferred:
                kept = latest_checkpoint(self.run_dir)
                self.log({"type": "checkpoint_deferred", "step": self.next_step, "consecutive_skips": streak,
                          "kept": kept.name if kept else None})
                self.progress.message(f"checkpoint at step {self.next_step} deferred: the last {streak} optimizer "
                                      f"steps were non-finite (kept: {kept.name if kept else 'none yet'})")
            self.save_deferred = True
            return None
        path = save_checkpoint(self.run_dir, self.next_step, self.objective, self.optimizers, self.trainer_state(),
                               keep=t.keep_checkpoints)
        self.last_save_step = self.next_step
        self.save_deferred = False
        return path

    def _pending_skips(self) -> int:
        """Optimizer steps skipped in a row up to now (the same on every rank; one host sync)."""
        run = self.window.run.clone()
        if self.dist.world_size > 1:
            dist.all_reduce(run, op=dist.ReduceOp.MAX)
        return int(run)

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl and the optional loggers. Records count epochs from 1: a train record's
        is the epoch under way, an eval or data record's the epoch just finished (as the picture names)."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            self.loggers.record(record, step=record.get("step", self.next_step))

    # ------------------------------------------------------------------ training
    def train_step(self, imgs: torch.Tensor, ctx: StepContext, update: bool) -> tuple[torch.Tensor, dict]:
        """Forward, backward and (when ``update``) the guarded optimizer step and teacher update.
        ``self.step_skipped`` is then the device flag of a step that was not applied."""
        t = self.cfg.train
        model = getattr(self, "model", self.objective)   # benchmarks call this with the bare objective
        with gradient_sync(model, update):
            with autocast(self.device, t.precision):
                loss, metrics = model(imgs, ctx)
                loss = faults.loss(loss, ctx.step)
            self.scaler.scale(loss / t.accum_steps).backward()
        self.step_skipped = None
        if update:
            self.objective.before_optimizer_step(ctx)
            self.step_skipped = train_step_optimizer(self.optimizers, self.scaler, self.cfg.optim.clip_grad,
                                                     self.cfg.optim.clip_mode)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.objective.after_optimizer_step(ctx)
            faults.after_update(self.objective.parameters(), ctx.step)
        return loss.detach(), metrics

    def train(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        spe = self.data.steps_per_epoch
        start_epoch, start_in_epoch = divmod(self.next_step, spe)
        if start_epoch >= t.epochs:
            self.progress.message(f"nothing to train: the checkpoint already completed all {t.epochs} epochs")
        for epoch in range(start_epoch, t.epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            self.objective.train()
            self.objective.on_epoch_start(self.context(epoch, epoch * spe + first))
            for i, (imgs, _) in enumerate(self.data.batches(epoch, first), start=first):
                step = epoch * spe + i
                lr = lr_at(epoch + i / spe, self.lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, t.epochs)
                for optimizer in self.optimizers:
                    set_lr(optimizer, lr)
                if cfg.optim.weight_decay_end is not None:
                    wd = weight_decay_at(epoch + i / spe, cfg.optim.weight_decay, cfg.optim.weight_decay_end, t.epochs)
                    for optimizer in self.optimizers:
                        set_weight_decay(optimizer, wd)
                ctx = self.context(epoch, step)
                update = (i + 1) % t.accum_steps == 0 or i + 1 == spe
                loss, metrics = self.train_step(imgs, ctx, update)
                self._account(loss, metrics, imgs.shape[0])
                self.next_step = step + 1
                if self.next_step % t.log_every == 0 or i + 1 == spe:
                    self._log_train(epoch)
                if update and i + 1 < spe and (self.save_deferred or self._step_save_due()):
                    self.save()
            self._log_skipped_images(epoch)
            last = epoch + 1 == t.epochs
            # with periodic evaluation, also after the first epoch: the starting point of the curves
            if (t.eval_every and (epoch == 0 or (epoch + 1) % t.eval_every == 0)) or last:
                self.evaluate(epoch)
            if (epoch + 1) % t.save_every == 0 or last or self.save_deferred or self._step_save_due():
                self.save()
        if self.save_deferred:
            kept = latest_checkpoint(self.run_dir)
            self.progress.message(f"the final checkpoint was not written: the last optimizer steps were non-finite; "
                                  f"the newest checkpoint is {kept.name if kept else 'none'}")
        probe = self.probe() if t.probe else None
        barrier(self.dist)   # the ranks leave together: tearing a group down under a peer still using it can abort it
        if self.metrics_file is not None:
            self.metrics_file.close()
        self.loggers.close()
        self.release()
        return RunResult(self.run_dir, self.last_loss, probe, self.dist.is_main, self.skipped_images)

    def _log_skipped_images(self, epoch: int) -> None:
        """Images of this epoch that could not be decoded (or were too large) and were replaced, all ranks."""
        if not self.data.counts_skips:
            return
        count = torch.tensor(float(self.data.skipped_in_epoch(epoch)), device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(count)
        self.skipped_images += int(count)
        self.log({"type": "data", "epoch": epoch + 1, "skipped_images": int(count)})
        if int(count):
            self.progress.message(f"epoch {epoch + 1}: {int(count)} unreadable or oversized images were skipped "
                                  f"(each replaced by an image of its class)")

    def context(self, epoch: int, step: int) -> StepContext:
        t = self.cfg.train
        return StepContext(epoch=epoch, step=step, steps_per_epoch=self.data.steps_per_epoch, epochs=t.epochs,
                           generator=step_generator(t.seed, epoch, step, self.dist.rank, self.device))

    def _step_save_due(self) -> bool:
        every = self.cfg.train.save_every_steps
        return bool(every) and self.next_step // every > self.last_save_step // every

    def _account(self, loss: torch.Tensor, metrics: dict, images: int) -> None:
        skipped, nonfinite = self.step_skipped, None
        if skipped is not None:
            self.skipped_total += skipped
            # fp16 loss scaling skips overflow steps routinely: only a non-finite loss is a fault there
            nonfinite = skipped * (~torch.isfinite(loss)).float() if self.scaler.is_enabled() else skipped
        self.window.add(loss, metrics, images, skipped, nonfinite)

    def _check_pending_nonfinite(self) -> None:
        flag = self.window.nonfinite.clone()
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag):
            self._fail_nonfinite(divmod(self.next_step, self.data.steps_per_epoch)[0])

    def _fail_nonfinite(self, epoch: int) -> None:
        raise FloatingPointError(
            f"non-finite loss or gradients at epoch {epoch} (before step {self.next_step}); the step was not "
            f"applied. {self._resume_advice()}, precision=bf16 or fp32, optim.clip_grad, or train.nonfinite=skip")

    def _resume_advice(self) -> str:
        kept = list_checkpoints(self.run_dir)   # none is written while skipped steps are pending
        if not kept:
            return "No checkpoint was written before it: start again with a lower lr (optim.blr)"
        advice = (f"The last checkpoint before it, {kept[-1].name}, is kept: resume from it with a lower lr, e.g. "
                  f"`python -m sslpt resume {self.run_dir} --set optim.blr={self.cfg.optim.blr / 10:g}`")
        if len(kept) > 1:   # the update that diverged may have been applied (finite) before that checkpoint
            advice += (f" (if that stops again, {kept[-1].name} already holds the diverged weights: add "
                       f"--checkpoint {kept[-2]})")
        return advice

    def _log_train(self, epoch: int) -> None:
        t = self.cfg.train
        record = self.window.flush()   # the one host sync (and all-reduce) of the window
        if t.nonfinite == "fail" and record["nonfinite_steps"]:
            self._fail_nonfinite(epoch)
        if record["max_consecutive_skips"] >= t.max_consecutive_skips:
            raise FloatingPointError(
                f"{record['max_consecutive_skips']} optimizer steps in a row had non-finite gradients and were "
                f"skipped (train.max_consecutive_skips={t.max_consecutive_skips}), last at epoch {epoch} before "
                f"step {self.next_step}. {self._resume_advice()}, precision=bf16 or fp32, or optim.clip_grad")
        record = {"type": "train", "epoch": epoch + 1, "step": self.next_step,
                  "steps_per_epoch": self.data.steps_per_epoch, "lr": self.optimizers[0].param_groups[0]["lr"],
                  **record}
        self.log(record)
        self.progress.update(self.next_step, epoch, t.epochs, progress_fields(record))
        self.last_loss = record["loss"]

    # ------------------------------------------------------------------ evaluation
    def _eager(self):
        """Evaluation and probes run eagerly: compiled blocks are specialised to the training shapes."""
        return torch.compiler.set_stance("force_eager") if self.cfg.train.compile else nullcontext()

    def eval_batch(self) -> torch.Tensor:
        if not hasattr(self, "_eval_imgs"):
            m, d = self.cfg.model, self.cfg.data
            _, _, val_x, val_y = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                                 val_fraction=d.val_fraction, seed=0,
                                                 synthetic_size=d.synthetic_size, max_images=64,
                                                 max_image_pixels=d.max_image_pixels, decoder=d.decoder)
            self._eval_imgs, self._eval_labels = val_x[:64].to(self.device), val_y[:64]
        return self._eval_imgs

    def readout(self):
        """On digits: a classifier of real digits' pixels, fitted once on the train split, that reads the
        reconstructions (``recon_accuracy``: can the reconstruction still be told for its digit?)."""
        if not hasattr(self, "_readout"):
            self._readout = None
            m, d = self.cfg.model, self.cfg.data
            if d.name == "digits":
                train_x, train_y, _, _ = build_eval_data(d.name, img_size=m.img_size, channels=m.in_chans,
                                                         val_fraction=d.val_fraction, seed=0, decoder=d.decoder)
                self._readout = fit_linear_classifier(train_x.flatten(1), train_y)
        return self._readout

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Pictures and metrics on a fixed held-out batch with a fixed random mask (rank 0 writes them;
        under FSDP every rank runs the forward, which gathers the shards)."""
        if not (self.dist.is_main or self.cfg.train.parallel == "fsdp"):
            return {}
        self.objective.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 12345)
        with self._eager(), autocast(self.device, self.cfg.train.precision):
            out: EvalOutput = self.objective.evaluate(self.eval_batch(), generator)
        if not self.dist.is_main:
            return {}
        written = self.save_pictures(out, epoch)
        metrics = dict(out.metrics)
        if out.prediction is not None and self.readout() is not None:
            metrics.update(self.readout_accuracy(out))
        if metrics:
            self.log({"type": "eval", "epoch": epoch + 1, "step": self.next_step, **metrics,
                      "skipped_steps": int(self.skipped_total), "skipped_images": self.skipped_images})
            shown = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items())
            self.progress.message(f"eval after epoch {epoch + 1}: {shown}")
        curves = self.run_dir / "curves.png"
        try:
            written.append(plot_runs([self.run_dir], curves))
        except ValueError:   # nothing logged yet to plot
            pass
        for path in written:
            self.loggers.image(f"pictures/{path.stem.split('_epoch')[0]}", path, step=self.next_step)
        return metrics

    def readout_accuracy(self, out: EvalOutput) -> dict[str, float]:
        """The digit classifier's accuracy on the reconstructions with the visible patches pasted (what the
        reconstruction picture shows in its third column) and, for scale, on the originals."""
        patch = self.cfg.model.patch_size
        recon = viz_reconstruction(out.images, out.prediction, patch, out.prediction_normalized).float()
        pixel_mask = out.mask.bool().reshape(out.mask.shape[0], *(self.cfg.model.img_size // patch,) * 2)
        pixel_mask = pixel_mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]
        pasted = torch.where(pixel_mask, recon, out.images.float())
        labels = self._eval_labels[:len(pasted)]
        read = lambda x: (self.readout()(x.flatten(1)) == labels).float().mean().item()  # noqa: E731
        return {"recon_accuracy": read(pasted), "recon_accuracy_originals": read(out.images)}

    def save_pictures(self, out: EvalOutput, epoch: int) -> list[Path]:
        """Reconstructions where the objective predicts patches; HPM-style panels where it also scores them;
        and whatever further figures the objective hands over. Returns the files written."""
        pictures = self.run_dir / "pictures"
        written = []
        for name, write in out.pictures.items():
            pictures.mkdir(parents=True, exist_ok=True)
            written.append(pictures / f"{name}_epoch{epoch + 1:04d}.png")
            write(written[-1])
        if out.prediction is None:
            return written
        m = self.cfg.model
        imgs, mask = out.images.float().cpu(), out.mask.cpu()
        recon = viz_reconstruction(out.images, out.prediction, m.patch_size, out.prediction_normalized).cpu()
        written.append(viz.save_reconstructions(pictures / f"recon_epoch{epoch + 1:04d}.png", imgs, mask, recon,
                                                m.patch_size, mean=self.data.mean, std=self.data.std))
        if out.patch_scores is not None:
            written.append(viz.save_hpm_panel(
                pictures / f"hpm_epoch{epoch + 1:04d}.png", imgs, mask, out.patch_scores.float().cpu(),
                out.patch_losses.float().cpu(), recon, m.patch_size, mean=self.data.mean, std=self.data.std,
                hard=None if out.hard_mask is None else out.hard_mask.cpu(),
                caption=f"after epoch {epoch + 1}: {out.caption}", row_labels=out.row_notes))
        return written

    def plain_objective(self):
        """The objective as one unsharded, uncompiled module on rank 0 (None elsewhere): for the probe."""
        t = self.cfg.train
        if t.parallel != "fsdp" and not t.compile:
            return self.objective
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        if not self.dist.is_main:
            return None
        plain = build_objective(self.cfg)
        plain.load_state_dict(state)
        return plain.to(self.device)

    def probe(self) -> dict | None:
        objective = self.plain_objective()
        if objective is None:
            return None
        self.progress.message("linear probe: pre-trained vs randomly initialised encoder ...")
        with self._eager():
            probe = run_probe(self.cfg, objective, self.device)
        (self.run_dir / "probe.json").write_text(json.dumps(probe, indent=2))
        self.log({"type": "probe", **probe})
        return probe


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


def pretrain(cfg: Config, *, run_dir: Path | None = None, resume: bool | str | Path = False,
             show_progress: bool = True) -> RunResult:
    started = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir=run_dir, resume=resume, show_progress=show_progress)
        result = trainer.train()
        trainer.progress.message(f"done in {format_duration(time.perf_counter() - started)}")
        return result
    except OSError as err:   # a full disk anywhere (metrics, pictures, probe.json): say so, not an errno
        where = trainer.run_dir if trainer is not None else Path(run_dir or cfg.train.out_dir)
        full = no_space(err, where)
        if full is None:
            raise
        raise full from err
    finally:
        if trainer is not None:
            trainer.release()
            shutdown(trainer.dist)
