"""Small file utilities: atomic writes (temp file + rename) and owner-only folders (JSON reading: contracts/base.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# The digests live in hashing.py.
from .hashing import new_sha256

__all__ = ["atomic_write_bytes", "atomic_write_json", "private_dir", "save_npy"]


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


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) owner-only (0700) for protected-derived data; returns it.

    A directory this call creates is 0700 whatever the umask; an existing one keeps its mode (it may be
    a folder the user chose, such as the current directory), while the files written in it by
    `atomic_write_bytes`/`save_npy` are 0600 anyway (mkstemp).
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
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
