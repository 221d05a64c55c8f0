"""The reference set: embeddings and pixel-space vectors of the protected originals, cached on disk.

The cache key is sha256 over (prepared fingerprint, embedder identity incl. weights sha256, L2 size,
layout version, shard size): the fingerprint covers the manifest and so every protected record's sha256; any
change rebuilds. A cached entry means the originals were read and hash-verified when it was built,
so a cached run opens no original (except to draw thumbnails of flagged matches). An entry holds the
vectors in shards of `search.shard_size` rows, which the search reads one at a time, so a reference
set larger than the memory can be searched exactly; with the cache off the shards stay in memory.

The cache holds derived data of protected images (for `pixel`, an exact copy of every protected
original at <= 32 px), so it is OFF by default; `--index-cache DIR` (or `cache.enabled: true`) turns
it on, in an owner-only (0700) directory with 0600 files outside the report and the prepared
directory; `--no-index-cache` turns it off whatever the config says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..embedding.embed import Embedder, embed_chunks, l2_vectors
from ..embedding.knn import Shards
from ..errors import InputError
from ..fileio import read_regular
from ..hashing import json_sha256
from .config import AuditConfig
from .index import build_ivf
from .originals import PreparedInfo, iter_protected

CHUNK_BYTES = 64 << 20  # decoded originals per unit of embedding work (one round trip to a Ray actor)
CHUNK_ROWS = 4096
LAYOUT_VERSION = 2  # 2: the vectors in shards of search.shard_size rows (emb-NNNNN.npy, pix-NNNNN.npy)


@dataclass
class Reference:
    embeddings: Shards  # float32 (N, dim) unit vectors, protected manifest order, in shards
    pixels: Shards  # float32 (N, D) [0, 1] pixels at l2.size, for the relative L2 score, in the same shards
    key: str
    status: str  # built | cached | built (cache off)
    built_at: str
    seconds: float
    folder: Path | None = None  # the cache entry, when there is one

    def ivf(self, exact_limit: int) -> Any | None:
        """The IVF candidate index when the reference set is larger than `exact_limit` (cached with the entry)."""
        if len(self.embeddings) <= exact_limit:
            return None
        import faiss

        path = self.folder / "ivf.faiss" if self.folder else None
        if path and path.is_file():
            return faiss.read_index(str(path))
        index = build_ivf(self.embeddings.load_all())
        if path:
            faiss.write_index(index, str(path))
            os.chmod(path, 0o600)
        return index


def l2_size(config: AuditConfig, resolution: int) -> int:
    return min(config.l2.size, resolution)


def cache_key(info: PreparedInfo, embedder: Embedder, size: int, shard_size: int) -> str:
    payload = {"fingerprint": info.fingerprint, "embedder": embedder.identity(), "l2_size": size,
               "layout": LAYOUT_VERSION, "shard_size": shard_size}
    return json_sha256(payload)


def _shard_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"emb-{index:05d}.npy", folder / f"pix-{index:05d}.npy"


def _load(folder: Path, count: int) -> tuple[Shards, Shards, dict[str, Any]] | None:
    """The entry's shards (read lazily, one at a time), if the entry is whole: every file there, right shapes."""
    try:
        meta = json.loads(read_regular(folder / "meta.json", 1 << 20))  # a FIFO: OSError (rebuilt), never waited on
        counts, dims = [int(c) for c in meta["shards"]], (int(meta["dim"]), int(meta["pixel_dim"]))
        for index, rows in enumerate(counts):
            for path, dim in zip(_shard_files(folder, index), dims, strict=True):
                header = np.load(path, mmap_mode="r", allow_pickle=False)
                if header.shape != (rows, dim):
                    return None
                del header
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if sum(counts) != count:
        return None
    paths = [_shard_files(folder, index) for index in range(len(counts))]
    return (Shards.files([p[0] for p in paths], counts, dims[0]), Shards.files([p[1] for p in paths], counts, dims[1]),
            meta)


class _ShardSink:
    """Collects embedded chunks into shards of `size` rows: files in a staging folder of the cache (when on),
    else arrays in memory."""

    def __init__(self, size: int, staging: Path | None) -> None:
        self.size, self.staging = size, staging
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows = 0
        self.counts: list[int] = []
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.dims = (0, 0)

    def add(self, embeddings: np.ndarray, pixels: np.ndarray) -> None:
        self.dims = (embeddings.shape[1], pixels.shape[1])
        while len(embeddings):
            take = self.size - self.rows
            self.pending.append((embeddings[:take], pixels[:take]))
            self.rows += len(embeddings[:take])
            embeddings, pixels = embeddings[take:], pixels[take:]
            if self.rows == self.size:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        shard = (np.concatenate([e for e, _ in self.pending]), np.concatenate([p for _, p in self.pending]))
        if self.staging is not None:
            for path, array in zip(_shard_files(self.staging, len(self.counts)), shard, strict=True):
                np.save(path, array)
                os.chmod(path, 0o600)
        else:
            self.kept.append(shard)
        self.counts.append(len(shard[0]))
        self.pending, self.rows = [], 0

    def finish(self) -> None:
        self._flush()

    def in_memory(self) -> tuple[Shards, Shards]:
        self._flush()
        return (Shards.of_arrays([e for e, _ in self.kept], self.dims[0]),
                Shards.of_arrays([p for _, p in self.kept], self.dims[1]))


def _staging(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder.parent, 0o700)  # the cache directory is the tool's own: owner-only even if it existed
    return Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))


def _publish(staging: Path, folder: Path, meta: dict[str, Any]) -> Path | None:
    try:
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.chmod(staging / "meta.json", 0o600)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return folder if folder.is_dir() else None  # another run may have written the same entry
    return folder


def chunk_rows(batch: int, resolution: int, channels: int) -> int:
    """Originals read and embedded per chunk: up to CHUNK_ROWS and CHUNK_BYTES of decoded pixels, whole batches
    (few round trips to Ray actors, bounded memory; the same chunks for both executors, so the same vectors)."""
    rows = min(CHUNK_ROWS, max(1, CHUNK_BYTES // max(1, resolution * resolution * channels)))
    return batch * max(1, -(-rows // batch))


def build(info: PreparedInfo, embedder: Embedder, config: AuditConfig, data_root: Path | None,
          start_progress: Callable[[int], Callable[[int], None]] | None = None) -> Reference:
    """Read, verify and embed every protected original (or reuse a cache entry with the same key), in shards of
    `search.shard_size` references (files of the cache entry when the cache is on, else arrays in memory).

    `start_progress(total)` is called only when originals are read, and returns a per-chunk callback.
    """
    started = time.perf_counter()
    size = l2_size(config, info.resolution)
    key = cache_key(info, embedder, size, config.search.shard_size)
    cache = config.cache_dir()
    folder = cache / key if cache else None
    if folder is not None and (hit := _load(folder, len(info.protected_ids))) is not None:
        return Reference(hit[0], hit[1], key, "cached", hit[2].get("built_at", ""), time.perf_counter() - started, folder)
    progress = start_progress(len(info.protected_ids)) if start_progress else None
    staging = _staging(folder) if folder is not None else None
    try:
        sink = _ShardSink(config.search.shard_size, staging)
        chunks = iter_protected(info, data_root, chunk=chunk_rows(config.embedder.batch, info.resolution, info.channels),
                                progress=progress)
        for chunk, embedded in embed_chunks(embedder, chunks, config.embedder.batch):
            sink.add(embedded, l2_vectors(chunk, size))
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        if folder is not None and staging is not None:
            sink.finish()
            meta = {"built_at": built_at, "prepared": str(info.root), "fingerprint": info.fingerprint,
                    "embedder": embedder.identity(), "l2_size": size, "count": sum(sink.counts),
                    "shards": sink.counts, "dim": sink.dims[0], "pixel_dim": sink.dims[1]}
            published = _publish(staging, folder, meta)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if folder is None:
        embeddings, pixels = sink.in_memory()
        return Reference(embeddings, pixels, key, "built (cache off)", built_at, time.perf_counter() - started, None)
    if published is None or (hit := _load(folder, len(info.protected_ids))) is None:
        raise InputError(f"audit index cache {folder}: the entry could not be written",
                         hint="check the cache directory's space and permissions, or run with --no-index-cache")
    return Reference(hit[0], hit[1], key, "built", built_at, time.perf_counter() - started, folder)
