"""The reference set: embeddings and pixel-space vectors of the protected originals, cached on disk.

The cache key is sha256 over (prepared fingerprint, embedder identity incl. weights sha256, L2 size,
layout version): the fingerprint covers the manifest and so every protected record's sha256; any
change rebuilds. A cached entry means the originals were read and hash-verified when it was built,
so a cached run opens no original (except to draw thumbnails of flagged matches).

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

from ..hashing import json_sha256
from .config import AuditConfig
from .embed import Embedder, embed_batched, l2_vectors
from .index import build_ivf
from .originals import PreparedInfo, iter_protected

LAYOUT_VERSION = 1


@dataclass
class Reference:
    embeddings: np.ndarray  # float32 (N, dim) unit vectors, protected manifest order
    pixels: np.ndarray  # float32 (N, D) [0, 1] pixels at l2.size, for the relative L2 score
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
        index = build_ivf(self.embeddings)
        if path:
            faiss.write_index(index, str(path))
            os.chmod(path, 0o600)
        return index


def l2_size(config: AuditConfig, resolution: int) -> int:
    return min(config.l2.size, resolution)


def cache_key(info: PreparedInfo, embedder: Embedder, size: int) -> str:
    payload = {"fingerprint": info.fingerprint, "embedder": embedder.identity(), "l2_size": size,
               "layout": LAYOUT_VERSION}
    return json_sha256(payload)


def _load(folder: Path, count: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)
        pixels = np.load(folder / "pixels.npy", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if len(embeddings) != count or len(pixels) != count:
        return None
    return embeddings, pixels, meta


def _save(folder: Path, embeddings: np.ndarray, pixels: np.ndarray, meta: dict[str, Any]) -> Path | None:
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder.parent, 0o700)  # the cache directory is the tool's own: owner-only even if it existed
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        np.save(staging / "embeddings.npy", embeddings)
        np.save(staging / "pixels.npy", pixels)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for path in staging.iterdir():
            os.chmod(path, 0o600)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return folder if folder.is_dir() else None  # another run may have written the same entry
    return folder


def build(info: PreparedInfo, embedder: Embedder, config: AuditConfig, data_root: Path | None,
          start_progress: Callable[[int], Callable[[int], None]] | None = None) -> Reference:
    """Read, verify and embed every protected original (or reuse a cache entry with the same key).

    `start_progress(total)` is called only when originals are read, and returns a per-chunk callback.
    """
    started = time.perf_counter()
    size = l2_size(config, info.resolution)
    key = cache_key(info, embedder, size)
    cache = config.cache_dir()
    folder = cache / key if cache else None
    if folder is not None and (hit := _load(folder, len(info.protected_ids))) is not None:
        return Reference(hit[0], hit[1], key, "cached", hit[2].get("built_at", ""), time.perf_counter() - started, folder)
    embedded, pixels = [], []
    progress = start_progress(len(info.protected_ids)) if start_progress else None
    for chunk in iter_protected(info, data_root, chunk=max(config.embedder.batch, 256), progress=progress):
        embedded.append(embed_batched(embedder, chunk, config.embedder.batch))
        pixels.append(l2_vectors(chunk, size))
    built_at = datetime.now(UTC).isoformat(timespec="seconds")
    embeddings, vectors = np.concatenate(embedded), np.concatenate(pixels)
    if folder is not None:
        meta = {"built_at": built_at, "prepared": str(info.root), "fingerprint": info.fingerprint,
                "embedder": embedder.identity(), "l2_size": size, "count": len(embeddings)}
        folder = _save(folder, embeddings, vectors, meta)
    status = "built" if folder is not None else "built (cache off)"
    return Reference(embeddings, vectors, key, status, built_at, time.perf_counter() - started, folder)
