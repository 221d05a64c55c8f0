"""Training images on the [-1, 1] scale, gathered a batch at a time from a verified prepared directory.

The pixels stay where they are stored (the prepared directory's shards, SFBD's round sets, online SFBD's bank:
memory-mapped .npy files, `mapped.MappedRows`); an `ImageSet` converts only the rows a batch asks for:
uint8 → x/127.5 - 1, float16 (the noisy copies, float16 denoised sets) → float32. So the process's anonymous
memory does not grow with the dataset, and every DDP rank maps the same files instead of holding a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..prepared.mapped import MappedRows
from ..prepared.reader import PreparedData


class ImageSet(Protocol):
    """A set of N training images: `gather(rows)` → float32 (B, C, H, W) on the [-1, 1] scale."""

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def __len__(self) -> int: ...

    def gather(self, rows: torch.Tensor) -> torch.Tensor: ...


class MappedImages:
    """Images stored on disk (uint8 pixels or float16 on the [-1, 1] scale), converted per batch."""

    def __init__(self, rows: MappedRows) -> None:
        if rows.dtype not in (np.dtype(np.uint8), np.dtype(np.float16)):
            raise ValueError(f"stored images are uint8 or float16, not {rows.dtype}")
        self.rows = rows

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.rows.image_shape

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return from_stored(torch.from_numpy(self.rows.take(rows.cpu().numpy())))


class TensorImages:
    """Images already in memory as a float32 (N, C, H, W) tensor on the [-1, 1] scale (small sets, tests)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows]


class RowSubset:
    """Some rows of an image set: row i of the view is row `keep[i]` of the set (validation's held-back copies
    are left out of what SFBD trains on)."""

    def __init__(self, images: ImageSet, keep: torch.Tensor) -> None:
        self.images, self.keep = images, keep

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.image_shape

    def __len__(self) -> int:
        return len(self.keep)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images.gather(self.keep[rows])


def clean_images(data: PreparedData) -> MappedImages:
    """The clean partition: uint8 shards, gathered as float32 x/127.5 - 1, (N, C, H, W)."""
    return MappedImages(data.clean.pixels)


def noisy_images(data: PreparedData) -> MappedImages:
    """The protected partition as stored: float16 y = x + sigma*eps shards, gathered as float32 (N, C, H, W)."""
    return MappedImages(data.protected.pixels)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → uint8, rounded and clipped (how SFBD's reference code stores denoised images)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def from_stored(images: torch.Tensor) -> torch.Tensor:
    """Images as kept (uint8 pixels, or float16 on the [-1, 1] scale) → float32 [-1, 1]."""
    return from_uint8(images) if images.dtype == torch.uint8 else images.float()


@dataclass
class Source:
    """One set of training images: its loss noise floor (0 = treat as clean) and loss weight."""

    name: str
    images: ImageSet  # N images, gathered as float32 (B, C, H, W)
    floor: float = 0.0  # the images' own noise level, for the ambient loss (0 for clean data)
    weight: float = 1.0  # loss weight of its samples (online SFBD ramps it)


class Mixture:
    """Draws training batches from several sources.

    Each sample's source is drawn with probability `shares` (None: proportional to the sources'
    sizes, i.e. uniform over their union), then an image uniformly within it. A seeded generator
    drives both, and its state is checkpointed, so a resumed run draws the same batches.
    """

    def __init__(self, sources: list[Source], shares: list[float] | None = None) -> None:
        self.sources = [s for s in sources if len(s.images)]
        sizes = [float(len(s.images)) for s in sources]
        chosen = shares if shares is not None else sizes
        probs = [p for p, s in zip(chosen, sources, strict=True) if len(s.images)]
        self.probs = torch.tensor(probs, dtype=torch.float64) / sum(probs)

    def __len__(self) -> int:
        return sum(len(s.images) for s in self.sources)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W), noise floors (B,), loss weights (B,))."""
        which = torch.multinomial(self.probs, size, replacement=True, generator=generator)
        index = torch.randint(2**62, (size,), generator=generator)
        images, floors, weights = [], [], []
        for k, source in enumerate(self.sources):
            rows = index[which == k] % len(source.images)
            images.append(source.images.gather(rows))
            floors.append(torch.full((len(rows),), source.floor))
            weights.append(torch.full((len(rows),), source.weight))
        order = torch.argsort(torch.cat([torch.nonzero(which == k).flatten() for k in range(len(self.sources))]))
        return torch.cat(images)[order], torch.cat(floors)[order], torch.cat(weights)[order]
