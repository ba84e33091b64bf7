"""Where a run's records go besides metrics.jsonl (always written): TensorBoard and Weights & Biases, each
optional and imported only when named in ``train.loggers``. Rank 0 only.

Numeric fields of each record become scalars tagged ``<type>/<field>`` (``train/loss``, ``eval/spearman_teacher``,
``probe/linear_cls_pretrained``) at the record's step; pictures (reconstructions, HPM panels, curves) are
logged as images at the step of the evaluation that made them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

LOGGERS = ("jsonl", "tensorboard", "wandb")


class LoggerUnavailable(RuntimeError):
    """A logger named in train.loggers cannot be used here; the message says what to install."""


def _scalars(record: dict) -> dict[str, float]:
    kind = record.get("type", "record")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise LoggerUnavailable("train.loggers names 'tensorboard' but the tensorboard package is not "
                                    f"installed ({err}): pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def record(self, record: dict, step: int) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        from PIL import Image

        with Image.open(path) as img:
            self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Offline unless WANDB_MODE says otherwise: a run folder that `wandb sync` uploads later."""

    def __init__(self, run_dir: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError as err:
            raise LoggerUnavailable("train.loggers names 'wandb' but the wandb package is not installed "
                                    f"({err}): pip install wandb") from err
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sslpt"), name=name, config=config,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def record(self, record: dict, step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The optional loggers of a run (metrics.jsonl is written by the trainer itself)."""

    def __init__(self, names, run_dir: Path, config: dict, enabled: bool = True):
        unknown = [n for n in names if n not in LOGGERS]
        if unknown:
            raise ValueError(f"train.loggers: unknown {unknown}; choose from {LOGGERS}")
        self.backends = []
        if not enabled:
            return
        if "tensorboard" in names:
            self.backends.append(TensorBoardLogger(run_dir))
        if "wandb" in names:
            self.backends.append(WandbLogger(run_dir, config, Path(run_dir).name))

    def record(self, record: dict, step: int) -> None:
        for backend in self.backends:
            backend.record(record, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        for backend in self.backends:
            backend.image(tag, path, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
