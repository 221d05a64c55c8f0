"""Embeddings for the nearest-neighbour search: unit vectors whose inner product is the similarity.

`pixel` is weight-free: the image at `size`×`size` (area average), minus its own mean, over its own
standard deviation, L2-normalised, so the inner product of two embeddings is the Pearson correlation
of their pixels: unchanged by brightness and contrast, little changed by JPEG or mild noise. `clip`
(open_clip, local weights only) lives in `clip.py`. Both see images already brought to the prepared
resolution, so every embedder compares like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

Progress = Callable[[int], None]


class Embedder(Protocol):
    """Maps uint8 (N, C, H, W) images to float32 (N, dim) unit vectors (zero for a constant image)."""

    kind: str
    dim: int

    def identity(self) -> dict[str, Any]:
        """What determines the vectors (for the cache key and the report)."""

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (N, dim) embeddings of uint8 (N, C, H, W) images."""


@runtime_checkable
class ParallelEmbedder(Protocol):
    """An embedder that spreads batches over several workers (ray_embed.RayEmbedder), with the same batches and
    so the same vectors as `embed_batched` over `embed` would give."""

    def embed_batched(self, pixels: np.ndarray, batch: int, progress: Progress | None = None) -> np.ndarray:
        """As the module's `embed_batched`."""

    def embed_chunks(self, chunks: Iterable[np.ndarray], batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """As the module's `embed_chunks`."""


def downsample(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) → float32 (N, C, size, size) in [0, 1], by area averaging.

    When H is a multiple of `size` this is an exact block mean; otherwise PIL's BOX filter per channel.
    """
    n, c, h, w = pixels.shape
    if (h, w) == (size, size):
        return pixels.astype(np.float32) / 255.0
    if h % size == 0 and w % size == 0:
        blocks = pixels.reshape(n, c, size, h // size, size, w // size).astype(np.float32)
        means: np.ndarray = blocks.mean(axis=(3, 5)) / 255.0
        return means
    from PIL import Image

    out = np.empty((n, c, size, size), np.float32)
    for i in range(n):
        for j in range(c):
            plane = Image.fromarray(pixels[i, j].astype(np.float32), mode="F")
            out[i, j] = np.asarray(plane.resize((size, size), Image.Resampling.BOX)) / 255.0
    return out


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32 C-contiguous."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 1e-12, norms, 1.0), dtype=np.float32)


def mirror(pixels: np.ndarray) -> np.ndarray:
    """Horizontal flip of uint8 (N, C, H, W) images."""
    return np.ascontiguousarray(pixels[..., ::-1])


def l2_vectors(pixels: np.ndarray, size: int) -> np.ndarray:
    """The pixel-space vectors of the relative L2 score: [0, 1] values at size×size, flattened."""
    return np.ascontiguousarray(downsample(pixels, size).reshape(len(pixels), -1))


class PixelEmbedder:
    """Per-image z-scored, area-downsampled pixels, L2-normalised (cosine = Pearson correlation)."""

    kind = "pixel"

    def __init__(self, *, size: int, channels: int) -> None:
        self.size = size
        self.channels = channels
        self.dim = channels * size * size

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "channels": self.channels, "version": 1}

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        flat = downsample(pixels, self.size).reshape(len(pixels), -1)
        flat = flat - flat.mean(axis=1, keepdims=True)
        return normalize_rows(flat)


def embed_batched(embedder: Embedder, pixels: np.ndarray, batch: int, progress: Progress | None = None) -> np.ndarray:
    """Embed in batches (bounded memory for the CLIP path); `progress(n)` after each batch."""
    if isinstance(embedder, ParallelEmbedder):
        return embedder.embed_batched(pixels, batch, progress)
    parts = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        parts.append(embedder.embed(chunk))
        if progress:
            progress(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def embed_chunks(embedder: Embedder, chunks: Iterable[np.ndarray], batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(chunk, its embeddings) for each chunk, in order, each chunk embedded in batches of `batch` from its start
    (a ParallelEmbedder has several chunks in work at once)."""
    if isinstance(embedder, ParallelEmbedder):
        yield from embedder.embed_chunks(chunks, batch)
        return
    for chunk in chunks:
        yield chunk, embed_batched(embedder, chunk, batch)
