"""The training loop: one readable ``train_step``, per-iteration lr, bf16/fp16/fp32, DDP or FSDP2 under
torchrun, a non-finite guard without host syncs, DCP checkpoints that resume exactly (mid-epoch too),
evaluation pictures and a final linear probe."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from sslpt import kernels
from sslpt.engine import viz
from sslpt.engine.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, read_commit,
                               resolve_checkpoint, save_checkpoint)
from sslpt.engine.config import Config, to_toml
from sslpt.engine.data import build_eval_data, build_train_data
from sslpt.engine.data.loader import derive_seed
from sslpt.engine.distributed import (DTensor, ShardAwareGradScaler, barrier, broadcast_object, gradient_sync,
                                init_distributed, local_tensor, parallelize, resolve_device, set_determinism,
                                shutdown)
from sslpt.engine.ema import rebind_teachers
from sslpt.engine.models.heads import sync_batchnorm_if_distributed
from sslpt.engine.objectives import EvalOutput, StepContext, build_objective
from sslpt.engine.optim import base_lr, lr_at, set_lr
from sslpt.engine.probe import run_probe
from sslpt.engine.progress import PEAK_TFLOPS, MetricWindow, Progress, format_duration, peak_tflops, progress_fields

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
    """out_dir/run_name exactly (so a restarted job finds its checkpoints), else a new timestamped folder."""
    if cfg.train.run_name:
        return Path(cfg.train.out_dir) / cfg.train.run_name
    name = f"{cfg.objective.name}-{cfg.data.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(cfg.train.out_dir) / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(cfg.train.out_dir) / f"{name}-{suffix}"
    return path


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
                         scaler: torch.amp.GradScaler, clip_grad: float | None) -> torch.Tensor:
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


class Trainer:
    """``resume``: False (fresh; refuses a run folder that holds checkpoints), True (the newest complete
    checkpoint, which must exist), "auto" (the newest if any, else fresh) or a checkpoint folder."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool | str | Path = False,
                 show_progress: bool = True):
        self.cfg = cfg
        t = cfg.train
        kernels.set_backend(t.backend)
        self.dist = init_distributed(t.parallel, t.device, t.dist_timeout_s)
        try:
            self._setup(resume, run_dir, show_progress)
        except BaseException:
            shutdown(self.dist)
            raise

    def _setup(self, resume, run_dir: Path | None, show_progress: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = self.dist.device
        if self.device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        if t.deterministic:
            set_determinism()
        main = self.dist.is_main
        chosen = str(run_dir if run_dir is not None else new_run_dir(cfg)) if main else None
        self.run_dir = Path(broadcast_object(chosen, self.dist))
        resume_from = self._checkpoint_to_resume(resume)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        m, d = cfg.model, cfg.data
        world = self.dist.world_size
        self.data = build_train_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                     crop_scale=d.crop_scale, hflip=d.hflip, val_fraction=d.val_fraction,
                                     batch_size=t.batch_size, seed=t.seed, device=self.device, rank=self.dist.rank,
                                     world_size=world, num_workers=d.num_workers, synthetic_size=d.synthetic_size)
        torch.manual_seed(t.seed)   # identical initial weights on every rank
        # SyncBatchNorm where ranks train on GPUs together (it has no CPU kernel: on CPU each rank normalises
        # its own batch); students and teachers alike, as the official contrastive codes convert whole models
        objective = build_objective(cfg)
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
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        spe = self.data.steps_per_epoch
        self.progress = Progress(t.epochs * spe, enabled=show_progress and main, start_step=self.next_step)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
        if resume_from is not None:   # steps logged after this checkpoint by the dead run are logged again
            self.log({"type": "resume", "checkpoint": resume_from.name, "step": self.next_step})
        self.last_loss = float("nan")
        barrier(self.dist)

    # ------------------------------------------------------------------ state
    def _checkpoint_to_resume(self, resume) -> Path | None:
        folder = self.run_dir / "checkpoints"
        newest = latest_checkpoint(self.run_dir)
        if resume is False or resume is None:
            if newest is not None:
                raise CheckpointError(
                    f"run folder {self.run_dir} already holds checkpoints (newest: {newest.name}); nothing was "
                    f"overwritten. Continue it with --resume auto (or `python -m sslpt resume {self.run_dir}`), "
                    f"or start a new run in another folder (--run-dir)")
            return None
        if resume is True:
            if newest is None:
                raise CheckpointError(f"no complete checkpoint to resume from in {folder}; start the run with "
                                      f"`python -m sslpt pretrain CONFIG --run-dir {self.run_dir}`, or use "
                                      f"--resume auto to start fresh when there is none")
            return newest
        if resume == "auto":
            return newest
        return resolve_checkpoint(Path(resume))

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
        state = load_checkpoint(path, self.objective, self.optimizers)
        rebind_teachers(self.objective)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.next_step = self.last_save_step = state["next_step"]
        self.skipped_total.fill_(state["skipped_steps"])
        self.window.run.fill_(state["consecutive_skips"])
        self.window.max_run.fill_(state["consecutive_skips"])

    def save(self) -> Path:
        """A checkpoint of the state after the last completed step (every rank calls it)."""
        t = self.cfg.train
        if t.nonfinite == "fail":
            self._check_pending_nonfinite()
        path = save_checkpoint(self.run_dir, self.next_step, self.objective, self.optimizers, self.trainer_state(),
                               keep=t.keep_checkpoints)
        self.last_save_step = self.next_step
        return path

    def log(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    # ------------------------------------------------------------------ training
    def train_step(self, imgs: torch.Tensor, ctx: StepContext, update: bool) -> tuple[torch.Tensor, dict]:
        """Forward, backward and (when ``update``) the guarded optimizer step and teacher update.
        ``self.step_skipped`` is then the device flag of a step that was not applied."""
        t = self.cfg.train
        model = getattr(self, "model", self.objective)   # benchmarks call this with the bare objective
        with gradient_sync(model, update):
            with autocast(self.device, t.precision):
                loss, metrics = model(imgs, ctx)
            self.scaler.scale(loss / t.accum_steps).backward()
        self.step_skipped = None
        if update:
            self.step_skipped = train_step_optimizer(self.optimizers, self.scaler, self.cfg.optim.clip_grad)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.objective.after_optimizer_step(ctx)
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
                ctx = self.context(epoch, step)
                update = (i + 1) % t.accum_steps == 0 or i + 1 == spe
                loss, metrics = self.train_step(imgs, ctx, update)
                self._account(loss, metrics, imgs.shape[0])
                self.next_step = step + 1
                if self.next_step % t.log_every == 0 or i + 1 == spe:
                    self._log_train(epoch)
                if update and i + 1 < spe and self._step_save_due():
                    self.save()
            last = epoch + 1 == t.epochs
            # with periodic evaluation, also after the first epoch: the starting point of the curves
            if (t.eval_every and (epoch == 0 or (epoch + 1) % t.eval_every == 0)) or last:
                self.evaluate(epoch)
            if (epoch + 1) % t.save_every == 0 or last or self._step_save_due():
                self.save()
        probe = self.probe() if t.probe else None
        barrier(self.dist)   # the ranks leave together: tearing a group down under a peer still using it can abort it
        if self.metrics_file is not None:
            self.metrics_file.close()
        return RunResult(self.run_dir, self.last_loss, probe, self.dist.is_main)

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
            f"applied and the last complete checkpoint is kept in {self.run_dir / 'checkpoints'}. Resume from it "
            f"with a lower lr, precision=bf16 or fp32, optim.clip_grad, or train.nonfinite=skip")

    def _log_train(self, epoch: int) -> None:
        t = self.cfg.train
        record = self.window.flush()   # the one host sync (and all-reduce) of the window
        if t.nonfinite == "fail" and record["nonfinite_steps"]:
            self._fail_nonfinite(epoch)
        if record["max_consecutive_skips"] >= t.max_consecutive_skips:
            raise FloatingPointError(
                f"{record['max_consecutive_skips']} optimizer steps in a row had non-finite gradients and were "
                f"skipped (train.max_consecutive_skips={t.max_consecutive_skips}), last at epoch {epoch} before "
                f"step {self.next_step}; the last complete checkpoint is kept in {self.run_dir / 'checkpoints'}. "
                f"Resume from it with a lower lr, precision=bf16 or fp32, or optim.clip_grad")
        record = {"type": "train", "epoch": epoch, "step": self.next_step,
                  "lr": self.optimizers[0].param_groups[0]["lr"], **record}
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
            _, _, val_x, _ = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                                             val_fraction=d.val_fraction, seed=0, synthetic_size=d.synthetic_size,
                                             max_images=64)
            self._eval_imgs = val_x[:64].to(self.device)
        return self._eval_imgs

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
        self.save_pictures(out, epoch)
        metrics = out.metrics
        if not metrics:
            return {}
        self.log({"type": "eval", "epoch": epoch, **metrics})
        self.progress.message(f"eval after epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def save_pictures(self, out: EvalOutput, epoch: int) -> None:
        """Reconstructions where the objective predicts patches; HPM-style panels where it also scores them;
        and whatever further figures the objective hands over."""
        pictures = self.run_dir / "pictures"
        for name, write in out.pictures.items():
            pictures.mkdir(parents=True, exist_ok=True)
            write(pictures / f"{name}_epoch{epoch + 1:04d}.png")
        if out.prediction is None:
            return
        m = self.cfg.model
        imgs, mask = out.images.float().cpu(), out.mask.cpu()
        recon = viz_reconstruction(out.images, out.prediction, m.patch_size, out.prediction_normalized).cpu()
        viz.save_reconstructions(pictures / f"recon_epoch{epoch + 1:04d}.png", imgs, mask, recon, m.patch_size,
                                 mean=self.data.mean, std=self.data.std)
        if out.patch_scores is not None:
            viz.save_hpm_panel(pictures / f"hpm_epoch{epoch + 1:04d}.png", imgs, mask, out.patch_scores.float().cpu(),
                               out.patch_losses.float().cpu(), recon, m.patch_size, mean=self.data.mean,
                               std=self.data.std)

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
    finally:
        if trainer is not None:
            shutdown(trainer.dist)
