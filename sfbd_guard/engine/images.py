"""Images out of the engine: PNG files (PIL) and sample grids (torchvision's make_grid)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .data import to_uint8


def _atomic_png(tensor: torch.Tensor, path: Path) -> None:
    """Write a uint8 (C, H, W) tensor as PNG (grayscale for C=1) via a temporary file."""
    from PIL import Image

    array = tensor.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_grid(images: torch.Tensor, path: Path, *, scale: int | None = None) -> Path:
    """A near-square grid of [-1, 1] images as one PNG, upscaled by nearest neighbour (default: to at
    least 64 px per image, so 8 px digits stay visible)."""
    scale = scale if scale is not None else max(1, 64 // images.shape[-1])
    from torchvision.utils import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images).cpu()
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=255)
    if images.shape[1] == 1:
        grid = grid[:1]
    _atomic_png(grid, path)
    return path


def save_pngs(images: torch.Tensor, folder: Path, first_index: int, digits: int) -> list[Path]:
    """One PNG per image, named by zero-padded index."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, pixels in enumerate(to_uint8(images).cpu()):
        path = folder / f"{first_index + offset:0{digits}d}.png"
        _atomic_png(pixels, path)
        paths.append(path)
    return paths
