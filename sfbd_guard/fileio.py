"""Small file utilities: atomic writes (temp file + rename), reading only regular files (never a FIFO or a device)
and owner-only report folders (JSON reading: contracts/base.py)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import InputError
from .hashing import new_sha256
from .regular import NotRegularFileError, open_regular, read_regular

__all__ = ["NotRegularFileError", "atomic_write_bytes", "atomic_write_json", "check_report_dir", "open_regular",
           "owner_only_dirs", "read_regular", "report_dir", "save_npy"]


class _HashingWriter:
    """File wrapper that hashes everything written through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = new_sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        return self._handle.write(data)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def check_report_dir(path: Path, option: str) -> None:
    """Refuse (InputError) an existing `path` that is not a folder, or that group or others can open: a report
    of protected-derived data (the audit's page shows protected originals) is written only where its owner
    alone can read it. A missing folder passes (`report_dir` creates it owner-only)."""
    if not path.exists():
        return
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise InputError(f"{option} {path}: not a folder")
    if info.st_mode & 0o077:
        raise InputError(f"{option} {path}: group or others can open this folder (mode {stat.S_IMODE(info.st_mode):04o}); "
                         f"make it owner-only (chmod 700 {path}) or choose a new folder")


def report_dir(path: Path, option: str) -> Path:
    """`path` as a report folder (see `check_report_dir`): created owner-only (0700, also its missing parents,
    whatever the umask) or an existing owner-only folder; returns it."""
    check_report_dir(path, option)
    return owner_only_dirs(path)


def owner_only_dirs(path: Path) -> Path:
    """Create the folder `path` and its missing parents owner-only (0700, whatever the umask); a folder that
    exists keeps its mode. Returns `path`."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def save_npy(path: Path, array: np.ndarray) -> str:
    """Save `array` as .npy atomically and return the sha256 of the file's bytes."""
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle)
            array = np.ascontiguousarray(array)
            np.lib.format.write_array_header_1_0(writer, np.lib.format.header_data_from_array_1_0(array))
            writer.write(array.data.cast("B"))  # array.data is memoryview(array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return writer.digest.hexdigest()
