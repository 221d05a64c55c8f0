"""Array shards of one partition: N×C×H×W .npy files of at most SHARD_RECORDS rows each.

Shard boundaries depend only on the records, so any worker count gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import save_npy

SHARD_RECORDS = 4096


class ShardWriter:
    """Collects rows in order and writes `<partition>/shard-00000.npy`, ... under `root`.

    Rows are copied into one preallocated shard-sized buffer, written out when full.
    """

    def __init__(self, root: Path, partition: str, dtype: np.dtype) -> None:
        self.root, self.partition, self.dtype = root, partition, dtype
        self.buffer: np.ndarray | None = None
        self.count = 0  # rows of the current shard in the buffer
        self.shard = 0
        self.files: dict[str, str] = {}  # relative path → sha256

    @property
    def current_file(self) -> str:
        return f"{self.partition}/shard-{self.shard:05d}.npy"

    def add(self, rows: np.ndarray) -> list[tuple[str, int]]:
        """Append a block of rows (N×C×H×W); returns where each will be stored, as (relative file, row)."""
        assert rows.dtype == self.dtype
        places = []
        while len(rows):
            if self.buffer is None:
                self.buffer = np.empty((SHARD_RECORDS, *rows.shape[1:]), self.dtype)
            taken = rows[: SHARD_RECORDS - self.count]
            self.buffer[self.count : self.count + len(taken)] = taken
            places += [(self.current_file, row) for row in range(self.count, self.count + len(taken))]
            self.count += len(taken)
            rows = rows[len(taken) :]
            if self.count == SHARD_RECORDS:
                self.flush()
        return places

    def flush(self) -> None:
        if not self.count:
            return
        assert self.buffer is not None
        path = self.root / self.current_file
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[self.current_file] = save_npy(path, self.buffer[: self.count])
        self.count, self.shard = 0, self.shard + 1
