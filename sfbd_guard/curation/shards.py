"""Array shards of one partition: N×C×H×W .npy files of at most SHARD_RECORDS rows each.

Shard boundaries depend only on the records, so any worker count gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import save_npy

SHARD_RECORDS = 4096


class ShardWriter:
    """Collects rows in order and writes `<partition>/shard-00000.npy`, ... under `root`."""

    def __init__(self, root: Path, partition: str, dtype: np.dtype) -> None:
        self.root, self.partition, self.dtype = root, partition, dtype
        self.rows: list[np.ndarray] = []
        self.shard = 0
        self.files: dict[str, str] = {}  # relative path → sha256

    @property
    def current_file(self) -> str:
        return f"{self.partition}/shard-{self.shard:05d}.npy"

    def add(self, array: np.ndarray) -> tuple[str, int]:
        """Append one row; returns (relative file, row) where it will be stored."""
        assert array.dtype == self.dtype
        place = (self.current_file, len(self.rows))
        self.rows.append(array)
        if len(self.rows) == SHARD_RECORDS:
            self.flush()
        return place

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.root / self.current_file
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[self.current_file] = save_npy(path, np.stack(self.rows))
        self.rows, self.shard = [], self.shard + 1
