"""Run folders: created atomically, owned through a lock file for the run's lifetime, written without torn files.

- ``new_run_dir`` creates ``out_dir/<objective>-<data>-<time>[-N]`` with an exclusive ``mkdir``, so two runs
  started at the same instant never share a folder.
- ``RunLock`` creates ``RUN/run.lock`` with ``O_CREAT | O_EXCL`` and writes the owner's pid, host and start time
  (and torchrun's run id) into it; it is removed when the run ends. A second run on a locked folder is refused
  with the owner's name. A lock whose process is dead (same host), or that a previous attempt of the same
  torchrun job left (same ``TORCHELASTIC_RUN_ID``), is taken over and said so; a lock of another host cannot
  be checked and is never taken over.
- ``write_atomic`` writes a small file through a temporary one and a rename: a full disk leaves the old file
  (or none), never a truncated one.
- ``no_space`` turns ENOSPC/EDQUOT anywhere in an exception chain into ``DiskFullError``, whose message names
  the path and says what to do.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import uuid
from datetime import datetime
from pathlib import Path

from sslpt.engine import faults

LOCK = "run.lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RunDirError(RuntimeError):
    """The run folder cannot be used (locked by another run, outside out_dir, disk full); the message says why."""


class DiskFullError(RunDirError):
    pass


def check_run_name(run_name: str) -> str | None:
    """Why ``run_name`` would leave ``out_dir`` (absolute, or a ``..`` component), else None."""
    path = Path(run_name)
    if path.is_absolute() or run_name.startswith(("/", "\\", "~")):
        return "is an absolute path"
    if any(part == ".." for part in path.parts) or ".." in run_name.replace("\\", "/").split("/"):
        return "has a '..' component"
    return None


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """Create ``out_dir/name`` (or ``name-2``, ``name-3``, ...) exclusively and return it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        path = Path(out_dir) / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds"),
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""), "argv": " ".join(sys.argv)[:300]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by another user
        return True
    return True


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started')})"


class RunLock:
    """``RUN/run.lock`` held by this process; ``release()`` (idempotent) removes it."""

    def __init__(self, run_dir: Path, notify=None):
        self.path = Path(run_dir) / LOCK
        self.owner = _owner()
        self.held = False
        self._acquire(notify or (lambda text: print(text, file=sys.stderr)))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        self.held = True
        return True

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> str | None:
        """Why the lock of ``owner`` may be taken over, or None."""
        here = self.owner
        if here["run_id"] and owner.get("run_id") == here["run_id"]:
            return f"left by an earlier attempt of this torchrun job ({here['run_id']})"
        if owner.get("host") == here["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            return "its process is no longer running"
        return None

    def _acquire(self, notify) -> None:
        for _ in range(3):
            if self._create():
                return
            owner = self._read(self.path)
            why = self._stale(owner)
            if why is None:
                raise RunDirError(
                    f"run folder {self.path.parent} is in use by {describe(owner)} (lock file {self.path}); "
                    f"two runs must not write one folder. Wait for that run, or start this one in another folder "
                    f"(--run-dir or train.run_name); if that run is gone (e.g. its node died), delete {self.path}")
            # take over: move the stale lock aside atomically (only one contender can), then create ours
            aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if self._read(aside) != owner:   # another contender took it over in between: give theirs back
                try:
                    os.link(aside, self.path)
                finally:
                    aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            if self._create():
                notify(f"took over the lock of run folder {self.path.parent} from {describe(owner)}: {why}")
                return
        owner = self._read(self.path)
        raise RunDirError(f"run folder {self.path.parent} is in use by {describe(owner)} (lock file {self.path})")

    def release(self) -> None:
        if self.held and self._read(self.path).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` and a rename (a full disk never leaves a torn file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    try:
        faults.wrote(len(data))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise no_space(err, path.parent) or err


def is_no_space(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
    return False


def no_space(err: BaseException, path: Path) -> DiskFullError | None:
    """A DiskFullError naming ``path`` if ``err`` (or what caused it) is ENOSPC/EDQUOT, else None."""
    if not is_no_space(err):
        return None
    return DiskFullError(f"no space left on {path} (the device or quota is full); free space there or point "
                         f"train.out_dir / --run-dir at a filesystem with room, then resume with --resume auto "
                         f"(the last complete checkpoint is kept)")
