"""Image rows kept on disk: (N, C, H, W) spread over memory-mapped .npy files, gathered a batch at a time.

A prepared directory's partitions, SFBD's round sets and online SFBD's bank are all this: a few `.npy` files
opened with `np.load(mmap_mode=...)` and a per-record (file, row) index held as two small numpy arrays. The
pixels themselves stay in the files (the page cache, shared by every process that maps them), so the
anonymous memory of a process that trains on them does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class MappedRows:
    """Rows of images in their stored dtype, `rows i` being row `row_of[i]` of `arrays[array_of[i]]`."""

    def __init__(self, arrays: Sequence[np.ndarray], array_of: np.ndarray, row_of: np.ndarray,
                 image_shape: tuple[int, int, int], dtype: np.dtype[Any]) -> None:
        if len(array_of) != len(row_of):
            raise ValueError("array_of and row_of must have one entry per row")
        self.arrays = list(arrays)
        self.array_of = np.asarray(array_of, dtype=np.int32)
        self.row_of = np.asarray(row_of, dtype=np.int64)
        self.image_shape = image_shape
        self.dtype = np.dtype(dtype)

    @classmethod
    def contiguous(cls, arrays: Sequence[np.ndarray], image_shape: tuple[int, int, int],
                   dtype: np.dtype[Any]) -> MappedRows:
        """The rows of `arrays` one after the other."""
        sizes = [len(a) for a in arrays]
        array_of = np.repeat(np.arange(len(arrays), dtype=np.int32), sizes)
        row_of = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
        return cls(arrays, array_of, row_of, image_shape, dtype)

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.image_shape)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` (any order, repeats allowed) as a new (len(rows), C, H, W) array of the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.image_shape), self.dtype)
        if not len(rows):
            return out
        which, local = self.array_of[rows], self.row_of[rows]
        if len(self.arrays) == 1:
            out[:] = self.arrays[0][local]
            return out
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.arrays[int(k)][local[mask]]
        return out

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """The rows in order, `size` at a time (the last block may be shorter); one empty block if there are none."""
        if not len(self):
            yield np.empty((0, *self.image_shape), self.dtype)
            return
        for start in range(0, len(self), size):
            yield self.take(np.arange(start, min(start + size, len(self))))
