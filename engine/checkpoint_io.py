"""What a checkpoint's bytes are trusted for: digests in COMMIT, and DCP readers that never run pickled code.

Digests: every file a checkpoint writes (each rank's ``.distcp`` shard, ``.metadata``) is hashed (sha256, the
ranks share the work) once written, and its size and digest go into ``COMMIT``. ``verify`` checks them before
anything else reads the folder: a missing, truncated, zero-length or altered file, or a COMMIT that is not
valid JSON, makes the checkpoint unusable, and it is then neither loaded nor counted when old checkpoints are
rotated away. Results are cached per process by the files' (size, mtime), so rotation re-hashes nothing.

Unpickling: DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and small values with
``torch.load(weights_only=False)``, either of which runs whatever code a crafted file names. ``SafeReader``
unpickles ``.metadata`` with an allow-list of the plain types DCP's metadata is made of, and ``SafePlanner``
loads the small values with ``torch.load(weights_only=True)``; tensors are already loaded weights-only by
DCP. The digests detect corruption, not an attacker (who can rewrite COMMIT too): the allow-lists are what
keep a checkpoint from running code.

``GuardedWriter`` is DCP's file writer whose streams count bytes (for fault injection) and remember the
OSError that stopped a write, so a full disk is reported as such instead of as a serializer assertion.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem

from sslpt.engine import faults

COMMIT = "COMMIT"
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------ digests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(COMMIT))


def file_digests(folder: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file in ``folder`` but COMMIT; under torch.distributed each rank
    hashes its share of the files and rank 0 gets them all (every rank must call it)."""
    names = _data_files(folder)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = {name: {"bytes": (Path(folder) / name).stat().st_size, "sha256": _sha256(Path(folder) / name)}
            for name in names[rank::world]}
    if not distributed:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: d for part in parts for name, d in sorted(part.items())}


_verified: dict[str, tuple] = {}


def _signature(folder: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())
                 if p.is_file())


def verify(folder: Path) -> str | None:
    """None if the checkpoint's files match its COMMIT record, else why not (one line). A COMMIT written before
    digests existed (no "files") is accepted as it is."""
    folder = Path(folder)
    try:
        signature = _signature(folder)
    except OSError as err:
        return f"cannot read the folder ({err})"
    if _verified.get(str(folder)) == signature:
        return None
    try:
        record = json.loads((folder / COMMIT).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"its {COMMIT} record is unreadable or not valid JSON ({type(err).__name__}: {err})"
    if not isinstance(record, dict):
        return f"its {COMMIT} record is not a JSON object"
    files = record.get("files")
    if files is None:
        return None   # written before digests were recorded
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, {COMMIT} records {expected['bytes']} (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in {COMMIT} (the file is corrupted)"
    try:
        read_metadata(folder)
    except Exception as err:   # noqa: BLE001 - any failure to parse means the checkpoint is unusable
        return f".metadata cannot be read safely ({type(err).__name__}: {err})"
    _verified[str(folder)] = signature
    return None


# ------------------------------------------------------------------------------------------------ safe reading
def _allowed_torch(name: str):
    obj = getattr(torch, name, None)
    return obj if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None


_ALLOWED_CLASSES = {
    "torch.distributed.checkpoint.metadata": lambda name: (
        obj if isinstance(obj := getattr(dcp_metadata, name, None), type) and obj.__module__ == dcp_metadata.__name__
        else None),
    "torch.distributed.checkpoint.filesystem": lambda name: (
        getattr(dcp.filesystem, name) if name == "_StorageInfo" else None),
    "torch": _allowed_torch,
    "torch.serialization": lambda name: torch.serialization._get_layout if name == "_get_layout" else None,
    "collections": lambda name: __import__("collections").OrderedDict if name == "OrderedDict" else None,
    "builtins": lambda name: {"set": set, "frozenset": frozenset}.get(name),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the plain data classes DCP's metadata holds; any other global (a callable that could run code)
    is refused."""

    def find_class(self, module: str, name: str):
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                                  "PureWindowsPath", "Path"):
            return super().find_class(module, name)
        lookup = _ALLOWED_CLASSES.get(module)
        obj = lookup(name) if lookup else None
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata (refused: loading "
                                         f"it could run code)")
        return obj


def read_metadata(folder: Path) -> dcp_metadata.Metadata:
    with open(Path(folder) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (the trainer JSON, optimizer hyper-parameters) loaded weights-only, then handed on."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        clean = io.BytesIO()
        torch.save(obj, clean)   # re-serialised from plain values: the parent's unrestricted load is harmless
        clean.seek(0)
        super().load_bytes(read_item, clean)


# ------------------------------------------------------------------------------------------------ guarded writing
class _GuardedStream:
    def __init__(self, stream, errors: list):
        self._stream, self._errors = stream, errors

    def write(self, data) -> int:
        try:
            faults.wrote(memoryview(data).nbytes)
            return self._stream.write(data)
        except OSError as err:
            self._errors.append(err)
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _GuardedFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.errors: list[OSError] = []

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            yield _GuardedStream(stream, self.errors) if "w" in mode else stream


class GuardedWriter(dcp.FileSystemWriter):
    """``errors``: the OSErrors that stopped a write (DCP may re-raise them as something else)."""

    def __init__(self, path):
        super().__init__(path)
        self.fs = _GuardedFileSystem()

    @property
    def errors(self) -> list[OSError]:
        return self.fs.errors


def mark_verified(folder: Path) -> None:
    """``folder`` was just written and hashed by this process: ``verify`` need not hash it again."""
    _verified[str(Path(folder))] = _signature(folder)
