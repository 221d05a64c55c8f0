"""Array shards of one partition: N×C×H×W .npy files of at most SHARD_RECORDS rows each.

Each worker writes the shards of its own part straight to disk, row block by row block, so no process holds
more than a block of pixels; the parent then names the files `<partition>/shard-00000.npy`, ... in part order.
Shard boundaries depend only on the records, so any worker count gives the same files.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..hashing import sha256_file

SHARD_RECORDS = 4096
READ_BLOCK = 1 << 20


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy (format 1.0) header of a C-order array of `dtype` and `shape`, as numpy writes it."""

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@dataclass(frozen=True)
class ShardFile:
    """A shard a worker wrote: its temporary name (relative to the staging folder), rows and sha256."""

    temp: str
    partition: str
    rows: int
    sha256: str


@dataclass
class PartShardWriter:
    """Appends row blocks of one partition of one part to `<partition>/.part-<part>-<k>.npy` files under `root`.

    A file is opened with the header of a full shard and its final header (same length: only the row count
    changes) is written when it is closed, so rows go to disk as they come.
    """

    root: Path
    partition: str
    dtype: np.dtype
    part: int
    shard_records: int = SHARD_RECORDS
    written: list[ShardFile] = field(default_factory=list)
    _handle: BinaryIO | None = None
    _rows: int = 0
    _shape: tuple[int, ...] = ()

    def _temp_name(self) -> str:
        return f"{self.partition}/.part-{self.part:06d}-{len(self.written):03d}.npy"

    def add(self, rows: np.ndarray) -> list[tuple[str, int]]:
        """Append a block (N×C×H×W); returns (temporary file, row) for each row, in order."""
        assert rows.dtype == self.dtype
        places: list[tuple[str, int]] = []
        while len(rows):
            if self._handle is None:
                self._shape = tuple(rows.shape[1:])
                path = self.root / self._temp_name()
                path.parent.mkdir(parents=True, exist_ok=True)
                self._handle, self._rows = open(path, "xb"), 0  # noqa: SIM115 (closed by _close or discard)
                self._handle.write(npy_header(self.dtype, (self.shard_records, *self._shape)))
            taken = np.ascontiguousarray(rows[: self.shard_records - self._rows])
            assert self._handle is not None
            self._handle.write(taken.data.cast("B"))
            name = self._temp_name()
            places += [(name, row) for row in range(self._rows, self._rows + len(taken))]
            self._rows += len(taken)
            rows = rows[len(taken):]
            if self._rows == self.shard_records:
                self._close()
        return places

    def _close(self) -> None:
        handle = self._handle
        assert handle is not None
        name = self._temp_name()
        header = npy_header(self.dtype, (self._rows, *self._shape))
        full = npy_header(self.dtype, (self.shard_records, *self._shape))
        path = self.root / name
        if len(header) == len(full):
            handle.seek(0)
            handle.write(header)
            handle.close()
        else:  # a shorter count crossed numpy's 64-byte header alignment: rewrite the file behind a new header
            handle.close()
            data_start = len(full)
            rewritten = path.with_name(path.name + ".tmp")
            with open(path, "rb") as source, open(rewritten, "xb") as target:
                source.seek(data_start)
                target.write(header)
                while block := source.read(READ_BLOCK):
                    target.write(block)
            os.replace(rewritten, path)
        self.written.append(ShardFile(name, self.partition, self._rows, sha256_file(path)))
        self._handle, self._rows = None, 0

    def close(self) -> list[ShardFile]:
        """Finish the open file, if any; the files written, in order."""
        if self._handle is not None:
            self._close()
        return self.written

    def discard(self) -> None:
        """Close and delete everything written (the part failed)."""
        if self._handle is not None:
            self._handle.close()
            (self.root / self._temp_name()).unlink(missing_ok=True)
            self._handle = None
        for shard in self.written:
            (self.root / shard.temp).unlink(missing_ok=True)


