"""Training images as tensors on the [-1, 1] scale, built only from a verified prepared directory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..prepared import PreparedData


def clean_images(data: PreparedData) -> torch.Tensor:
    """The clean partition: uint8 → float32 x/127.5 - 1, (N, C, H, W)."""
    return from_uint8(torch.from_numpy(np.asarray(data.clean.pixels)))


def noisy_images(data: PreparedData) -> torch.Tensor:
    """The protected partition as stored: float16 y = x + sigma*eps, as float32 (N, C, H, W)."""
    return torch.from_numpy(np.asarray(data.protected.pixels, dtype=np.float32))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → uint8, rounded and clipped (how SFBD's reference code stores denoised images)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def from_stored(images: torch.Tensor) -> torch.Tensor:
    """Denoised images as kept (uint8 pixels, or float16 on the [-1, 1] scale) → float32 [-1, 1]."""
    return from_uint8(images) if images.dtype == torch.uint8 else images.float()


@dataclass
class Source:
    """One set of training images: its loss noise floor (0 = treat as clean) and loss weight."""

    name: str
    images: torch.Tensor  # (N, C, H, W) float32
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
            images.append(source.images[rows])
            floors.append(torch.full((len(rows),), source.floor))
            weights.append(torch.full((len(rows),), source.weight))
        order = torch.argsort(torch.cat([torch.nonzero(which == k).flatten() for k in range(len(self.sources))]))
        return torch.cat(images)[order], torch.cat(floors)[order], torch.cat(weights)[order]
