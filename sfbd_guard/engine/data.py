"""Training images as tensors on the [-1, 1] scale, built only from a verified prepared directory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..prepared import PreparedData


def clean_images(data: PreparedData) -> torch.Tensor:
    """The clean partition: uint8 → float32 x/127.5 - 1, (N, C, H, W)."""
    return torch.from_numpy(np.asarray(data.clean.pixels, dtype=np.float32)) / 127.5 - 1.0


def noisy_images(data: PreparedData) -> torch.Tensor:
    """The protected partition as stored: float16 y = x + sigma*eps, as float32 (N, C, H, W)."""
    return torch.from_numpy(np.asarray(data.protected.pixels, dtype=np.float32))


@dataclass
class ImagePool:
    """Images to draw training batches from, with a per-image loss weight.

    Batches are drawn uniformly with replacement by a seeded generator whose state is saved in
    checkpoints, so a resumed run draws the batches the uninterrupted run would have drawn.
    """

    images: torch.Tensor  # (N, C, H, W) float32 in data units
    weights: torch.Tensor  # (N,) loss weight per image

    @classmethod
    def of(cls, *parts: torch.Tensor) -> ImagePool:
        images = torch.cat(parts) if parts else torch.empty(0)
        return cls(images, torch.ones(len(images)))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.images), (size,), generator=generator)
        return self.images[index], self.weights[index]
