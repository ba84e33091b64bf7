"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, independent of the parallelism, atomic.

Layout: ``<run>/checkpoints/step_00001234/`` holds DCP's files (one ``.distcp`` per rank, ``.metadata``) and
``COMMIT``, a small JSON that rank 0 writes once every rank has finished writing (DCP's writer fsyncs its
files). The folder is written as ``step_00001234.partial/`` and renamed only after ``COMMIT`` exists, so a
crash mid-save, even SIGKILL, leaves earlier checkpoints untouched; only folders with ``COMMIT`` count. The
newest ``keep`` (>= 2) are kept, and the older ones are deleted only after a newer one is complete.

What is saved: the objective's state (students, EMA teachers, buffers) and the optimizer's, both by canonical
parameter names (``get_state_dict``: the same names under FSDP2, DDP, compile or activation checkpointing, so
DCP reshards on load), plus the trainer's position and counters as one JSON string.

Trust: ``COMMIT`` records the size and sha256 of every file; a checkpoint whose files do not match is never
loaded and never counted for rotation, and ``--resume`` falls back to the newest one that verifies.
``.metadata`` and the small values are unpickled through allow-lists (engine/checkpoint_io.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from sslpt.engine import faults
from sslpt.engine.checkpoint_io import (COMMIT, GuardedWriter, SafePlanner, SafeReader, file_digests,
                                        mark_verified, read_metadata, verify)
from sslpt.engine.run_dir import no_space, write_atomic

_NAME = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_(\d+)\.(partial|old)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message says what to do."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load that it assumes one process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMMIT).is_file() and (Path(path) / ".metadata").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_commit(path: Path) -> dict:
    return json.loads((Path(path) / COMMIT).read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def select_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint that verifies or None, [(newer ones skipped, why)])."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def purge(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints that verify (and any newer that do not, to be looked at or replaced);
    delete everything older, and leftovers of saves that died."""
    complete, good = list_checkpoints(run_dir), 0
    for path in reversed(complete):
        if good >= keep:
            shutil.rmtree(path, ignore_errors=True)
        elif verify(path) is None:
            good += 1
    newest = int(_NAME.match(complete[-1].name).group(1)) if complete else -1
    for path in checkpoint_dir(run_dir).iterdir():
        m = _LEFTOVER.match(path.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizers, trainer_state: dict, keep: int) -> Path:
    """Save on every rank (a collective under torchrun); rank 0 commits, renames and purges."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step_{step:08d}"
    partial = folder / f"{final.name}.partial"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)   # left by a run that died while saving this step
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd, "trainer": json.dumps(trainer_state)}
    writer = GuardedWriter(partial)
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=writer, no_dist=not _distributed())
    except (Exception, CheckpointException) as err:   # DCP's CheckpointException is a BaseException
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)   # its space is needed more than its bytes
        full = no_space(writer.errors[0] if writer.errors else err, folder)
        if full is not None:
            raise full from err
        raise
    _barrier()   # every rank's shards are written and fsynced
    digests = file_digests(partial)   # every rank hashes its share
    faults.before_commit(step)
    if _rank() == 0:
        write_atomic(partial / COMMIT, json.dumps({**trainer_state, "files": digests}, indent=1))
        _fsync_dir(partial)
        replaced = None
        if final.exists():   # the same step saved again (resumed from an older one): swap, never delete first
            replaced = folder / f"{final.name}.old"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        _fsync_dir(folder)
        mark_verified(final)
        purge(run_dir, keep)
    _barrier()
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder, or a clear error saying what to do instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist; list the run's checkpoints with "
                              f"`ls {path.parent}` or resume the newest one with --resume auto")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMMIT} or .metadata: the run died while "
                              f"saving it); resume from an older one in {path.parent} or with --resume auto")
    return path


def check_compatible(path: Path, model_state: dict) -> None:
    """Refuse, before loading anything, a checkpoint whose tensors do not match this model's names and shapes."""
    metadata = read_metadata(path)
    saved = {key[len("model."):]: tuple(item.size) for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    current = {key: tuple(t.shape) for key, t in model_state.items()}
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    wrong = [(k, saved[k], current[k]) for k in sorted(current.keys() & saved.keys()) if saved[k] != current[k]]
    if not (missing or unexpected or wrong):
        return
    details = []
    if wrong:
        k, there, here = wrong[0]
        details.append(f"{len(wrong)} tensors differ in shape (e.g. {k}: {list(there)} in the checkpoint, "
                       f"{list(here)} in this model)")
    if missing:
        details.append(f"{len(missing)} tensors of this model are not in it (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} of its tensors are not in this model (e.g. {unexpected[0]})")
    raise CheckpointError(f"checkpoint {path} was written for another model: {'; '.join(details)}. Resume with the "
                          f"config the run was started with (its config.toml, e.g. `python -m sslpt resume "
                          f"RUN_DIR`), or start a new run in another folder (--run-dir)")


def load_checkpoint(path: Path, model: nn.Module, optimizers=None, verified: bool = False) -> dict:
    """Load model (and optimizers') state in place, resharding as needed; returns the trainer state.
    ``optimizers``: one optimizer or a list (their states are keyed by parameter name, so they can be).
    The files are checked against COMMIT first unless the caller has (``verified``)."""
    path = resolve_checkpoint(path)
    if not verified and (reason := verify(path)) is not None:
        raise CheckpointError(f"checkpoint {path} failed verification: {reason}. It was not loaded; use an older "
                              f"checkpoint of {path.parent} (--resume auto picks the newest that verifies)")
    if optimizers is None:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizers)
    check_compatible(path, model_sd)
    state = {"model": model_sd, "trainer": ""}
    if optimizers is not None:
        state["optim"] = optim_sd
    with _single_process_quiet():
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=not _distributed())
    if optimizers is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state["trainer"])
