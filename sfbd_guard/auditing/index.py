"""Nearest protected neighbours with FAISS: exact inner product on unit vectors, batched queries.

Up to `search.exact_limit` references the search is exact brute force (`faiss.knn`, the kernel of
`IndexFlatIP`, without copying the reference vectors into an index), one reference shard at a time
(`search.shard_size` references each; embedding/knn.py merges the shards' top-k into exactly the single search's,
ties by reference row). Beyond it an IVF index only
proposes `search.candidates` ids per query; their similarities are then recomputed exactly from the
stored vectors, so every reported similarity (and every verdict) is exact for the ids it names. The
pixel-space distances of the relative L2 score are exact too (`faiss.knn` with the L2 metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..embedding.knn import Shards, knn
from .config import SearchSpec

IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per list


@dataclass
class Neighbours:
    """Per query: k reference rows (-1 when there are fewer) and their similarity or distance."""

    rows: np.ndarray  # int64 (N, k)
    scores: np.ndarray  # float32 (N, k); similarity descending (inner product) or distance ascending (L2)


def _faiss() -> Any:
    import faiss

    return faiss


class InnerProductIndex:
    """Exact (or IVF-proposed, exactly re-ranked) inner-product search over fixed reference vectors."""

    def __init__(self, vectors: np.ndarray | Shards, spec: SearchSpec, ivf: Any | None = None) -> None:
        faiss = _faiss()
        if spec.threads:
            faiss.omp_set_num_threads(spec.threads)
        self.shards = vectors if isinstance(vectors, Shards) else Shards.of_array(vectors, spec.shard_size)
        self.spec = spec
        self.approximate = len(self.shards) > spec.exact_limit
        if self.approximate:  # the IVF candidates are re-ranked from every vector: all of them in memory
            self.vectors = self.shards.load_all()
            self.index = ivf if ivf is not None else build_ivf(self.vectors)
            self.index.nprobe = spec.nprobe
        else:
            self.index = None

    @property
    def kind(self) -> str:
        if self.approximate:
            return (f"IVF{self.index.nlist},Flat candidates ({self.spec.candidates}, nprobe {self.spec.nprobe}) "
                    "+ exact re-rank")
        count = len(self.shards.counts)
        return "flat inner product (exact, faiss.knn)" + (f" in {count} shards" if count > 1 else "")

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        k = min(k, len(self.shards))
        if not self.approximate:
            found, sims = knn(queries, self.shards, k, metric="ip", batch=self.spec.batch)
            return Neighbours(found, sims)
        rows, scores = [], []
        for start in range(0, len(queries), self.spec.batch):
            batch = np.ascontiguousarray(queries[start : start + self.spec.batch], dtype=np.float32)
            found, sims = self._rerank(batch, k)
            rows.append(found)
            scores.append(sims)
        if not rows:
            return Neighbours(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        return Neighbours(np.concatenate(rows).astype(np.int64), np.concatenate(scores).astype(np.float32))

    def _rerank(self, batch: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of the IVF candidates, top-k of them."""
        _, candidates = self.index.search(batch, max(k, self.spec.candidates))
        safe = np.where(candidates >= 0, candidates, 0)
        sims = np.einsum("qd,qcd->qc", batch, self.vectors[safe])
        sims = np.where(candidates >= 0, sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows = np.take_along_axis(candidates, order, 1)
        return rows, np.take_along_axis(sims, order, 1).astype(np.float32)


def build_ivf(vectors: np.ndarray, seed: int = 0) -> Any:
    """An IVF-Flat inner-product index with about 4·sqrt(N) lists, trained on (a sample of) the vectors."""
    faiss = _faiss()
    n, dim = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors
    if n > 256 * nlist:
        sample = vectors[np.random.default_rng(seed).choice(n, 256 * nlist, replace=False)]
    index.train(np.ascontiguousarray(sample))
    index.add(vectors)
    return index


def l2_neighbours(references: np.ndarray | Shards, queries: np.ndarray, k: int, batch: int) -> Neighbours:
    """Exact k nearest references by RMS pixel distance sqrt(mean((a - b)^2)), ascending (shard by shard)."""
    shards = references if isinstance(references, Shards) else Shards.of_array(references)
    found, squared = knn(queries, shards, k, metric="l2", batch=batch)  # FAISS gives squared L2
    return Neighbours(found, np.sqrt(np.maximum(squared, 0) / max(1, shards.dim)).astype(np.float32))


def merge_variants(found: list[Neighbours], k: int) -> tuple[Neighbours, np.ndarray]:
    """Top-k over the searches of several variants of each query (a reference keeps its best score), and per query
    the index of the variant whose top-1 won (the first on ties, so the identity when it is first)."""
    rows = np.concatenate([f.rows for f in found], axis=1)
    sims = np.concatenate([f.scores for f in found], axis=1).astype(np.float64)
    sims = np.where(rows >= 0, sims, -np.inf)
    order = np.lexsort((-sims, rows), axis=1)  # by row id, best score first within an id
    rows, sims = np.take_along_axis(rows, order, 1), np.take_along_axis(sims, order, 1)
    repeat = np.zeros_like(rows, dtype=bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    sims = np.where(repeat, -np.inf, sims)
    best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    rows, sims = np.take_along_axis(rows, best, 1), np.take_along_axis(sims, best, 1)
    rows = np.where(np.isfinite(sims), rows, -1)
    tops = np.stack([np.where(f.rows[:, 0] >= 0, f.scores[:, 0], -np.inf) for f in found], axis=1) if len(rows) else None
    winner = np.argmax(tops, axis=1) if tops is not None else np.zeros(0, np.int64)
    return Neighbours(rows, np.where(np.isfinite(sims), sims, np.nan).astype(np.float32)), winner


def merge_mirrored(plain: Neighbours, mirrored: Neighbours, k: int) -> tuple[Neighbours, np.ndarray]:
    """Top-k over both orientations (a reference keeps its better score) and whether the mirror won top-1."""
    merged, winner = merge_variants([plain, mirrored], k)
    return merged, winner == 1
