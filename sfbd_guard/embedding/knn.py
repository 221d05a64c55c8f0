"""Exact k nearest neighbours over reference vectors split into shards, searched one shard at a time.

`knn(queries, shards, k)` gives exactly what one exact search over all the references gives: each shard
is searched on its own with FAISS (`faiss.knn`, the kernel of `IndexFlatIP` / `IndexFlatL2`) and the
running top-k is merged with the shard's. Ties are broken by reference row, the lower row first: FAISS
already keeps the lowest rows among equal scores within a shard, so after the merge the k rows are the
ones a single search keeps, listed (score, row) in order. A similarity FAISS computes does not depend on
where the reference sits in its shard, so sharded and single scores are the same floats (tested).

Only one shard is in memory at a time when the shards are files (`Shards.files`), so the memory of a
search is one shard plus the queries' running top-k. The audit's reference index uses it
(auditing/index.py); it is also meant for any other exact search over a large set (near-duplicates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

Metric = Literal["ip", "l2"]


def _faiss() -> Any:
    import faiss

    return faiss


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _read_npy(path: Path) -> np.ndarray:
    array: np.ndarray = np.load(path, allow_pickle=False)
    return array


@dataclass(frozen=True)
class Shards:
    """Reference vectors in row order, as shards that are loaded one at a time (`iter`) or gathered by row."""

    loaders: tuple[Callable[[], np.ndarray], ...]
    counts: tuple[int, ...]
    dim: int

    @classmethod
    def of_array(cls, vectors: np.ndarray, shard_size: int | None = None) -> Shards:
        """Views of an array in memory, `shard_size` rows each (one shard when None)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        size = max(1, shard_size or len(vectors) or 1)
        pieces = [vectors[start : start + size] for start in range(0, len(vectors), size)]
        return cls.of_arrays(pieces, vectors.shape[1] if vectors.ndim == 2 else 0)

    @classmethod
    def of_arrays(cls, pieces: Sequence[np.ndarray], dim: int) -> Shards:
        return cls(tuple(partial(_same, piece) for piece in pieces), tuple(len(p) for p in pieces), dim)

    @classmethod
    def files(cls, paths: Sequence[Path], counts: Sequence[int], dim: int) -> Shards:
        """Shards stored as .npy files, each read when it is searched (and dropped after)."""
        return cls(tuple(partial(_read_npy, path) for path in paths), tuple(counts), dim)

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __iter__(self) -> Iterator[np.ndarray]:
        for load in self.loaders:
            yield np.ascontiguousarray(load(), dtype=np.float32)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of `rows` (row numbers over all shards), in that order."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.dim), np.float32)
        start = 0
        for count, shard in zip(self.counts, self, strict=True):
            inside = (rows >= start) & (rows < start + count)
            out[inside] = shard[rows[inside] - start]
            start += count
        return out

    def load_all(self) -> np.ndarray:
        return np.concatenate(list(self)) if self.loaders else np.zeros((0, self.dim), np.float32)


def knn(queries: np.ndarray, shards: Iterable[np.ndarray], k: int, *, metric: Metric = "ip",
        batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64 (N, k), scores float32 (N, k)) of the k best references over all `shards` (in row order).

    `metric` ip: inner product, descending; l2: squared L2 distance (as FAISS gives it), ascending. Rows are
    numbered over all shards; fewer than k references leave k' = their count columns. Ties: lower row first.
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    worst = -np.inf if metric == "ip" else np.inf
    rows = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), worst, np.float32)
    offset = 0
    for shard in shards:
        shard = np.ascontiguousarray(shard, dtype=np.float32)
        take = min(k, len(shard))
        if take == 0:
            continue
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        for start in range(0, len(queries), batch):
            part = queries[start : start + batch]
            found_scores, found_rows = faiss.knn(part, shard, take, metric=faiss_metric)
            found_rows = np.where(found_rows >= 0, found_rows + offset, -1)
            found_scores = np.where(found_rows >= 0, found_scores, worst)
            merged = _merge(rows[start : start + batch], scores[start : start + batch], found_rows,
                            found_scores.astype(np.float32), k, metric)
            rows[start : start + batch], scores[start : start + batch] = merged
        offset += len(shard)
    count = min(k, offset)
    return rows[:, :count], scores[:, :count]


def _merge(rows_a: np.ndarray, scores_a: np.ndarray, rows_b: np.ndarray, scores_b: np.ndarray, k: int,
           metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two candidate lists per query: by score (best first), then by row (lower first)."""
    rows = np.concatenate([rows_a, rows_b], axis=1)
    scores = np.concatenate([scores_a, scores_b], axis=1)
    primary = -scores if metric == "ip" else scores
    tiebreak = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    order = np.lexsort((tiebreak, primary), axis=1)[:, :k]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
