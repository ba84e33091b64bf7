"""Fault injection for tests: the faults a long run meets, at a chosen step or byte, without timing luck.

Set ``SSLPT_FAULTS`` (read by every process, so subprocess and torchrun tests can use it) or call
``inject(...)`` in-process; the value is ``name=value`` pairs separated by commas:

- ``nonfinite_loss_at_step=N`` (or ``N-M``, ``N-`` for a range): the loss of those global steps is NaN;
- ``diverge_at_step=N``: after step N's optimizer step every parameter is NaN, as after a destructive update,
  so every later step is non-finite (a run that diverged for good);
- ``disk_full_after_bytes=K``: the engine's file writers (checkpoint shards, COMMIT, config.toml) raise
  ``OSError(ENOSPC)`` once K bytes have been written in this process;
- ``kill_before_commit_at_step=N``: SIGKILL after the checkpoint of step N has its shards but no COMMIT.

Nothing here costs anything when no fault is set (one dict lookup per hook).
"""
from __future__ import annotations

import errno
import os
import signal
from contextlib import contextmanager

ENV = "SSLPT_FAULTS"
KNOWN = ("nonfinite_loss_at_step", "diverge_at_step", "disk_full_after_bytes", "kill_before_commit_at_step")
_active: dict[str, str] | None = None
_written = 0


def _parse(text: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in KNOWN:
            raise ValueError(f"{ENV}: unknown fault {name!r}; known: {', '.join(KNOWN)}")
        faults[name] = value
    return faults


def active() -> dict[str, str]:
    global _active
    if _active is None:
        _active = _parse(os.environ.get(ENV, ""))
    return _active


@contextmanager
def inject(**faults):
    """In-process faults for the duration of the block, e.g. ``inject(disk_full_after_bytes=0)``."""
    global _active, _written
    saved, saved_written = _active, _written
    _active, _written = _parse(",".join(f"{k}={v}" for k, v in faults.items())), 0
    try:
        yield
    finally:
        _active, _written = saved, saved_written


def _in_range(spec: str, step: int) -> bool:
    lo, dash, hi = spec.partition("-")
    if not dash:
        return step == int(lo)
    return int(lo) <= step and (not hi or step <= int(hi))


def loss(value, step: int):
    """The loss, made NaN at the steps ``nonfinite_loss_at_step`` names."""
    spec = active().get("nonfinite_loss_at_step")
    return value * float("nan") if spec and _in_range(spec, step) else value


def after_update(parameters, step: int) -> None:
    """``diverge_at_step``: every parameter becomes NaN after that step's update."""
    spec = active().get("diverge_at_step")
    if spec and int(spec) == step:
        for p in parameters:
            p.data.fill_(float("nan"))


def wrote(num_bytes: int) -> None:
    """Count bytes the engine writes; past ``disk_full_after_bytes`` raise what a full disk raises."""
    global _written
    limit = active().get("disk_full_after_bytes")
    if limit is None:
        return
    if _written + num_bytes > int(limit):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _written += num_bytes


def before_commit(step: int) -> None:
    spec = active().get("kill_before_commit_at_step")
    if spec and int(spec) == step:
        os.kill(os.getpid(), signal.SIGKILL)
