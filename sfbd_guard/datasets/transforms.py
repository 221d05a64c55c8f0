"""Image decoding and the deterministic transforms shared by `guard prepare` and `guard audit`.

PIL does the decoding and resampling (torchvision's transforms call into PIL for PIL images, and
importing torch in every curation worker would cost seconds and a gigabyte each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError

Image.MAX_IMAGE_PIXELS = 32_000 * 32_000  # refuse decompression bombs beyond ~1 gigapixel


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully, as RGB; any failure becomes ImageDecodeError with the reason."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path.name}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode {path.name}: {err}") from None


def center_crop(image: Image.Image, size: int | None = None) -> Image.Image:
    """The central size × size square (the largest square when size is None)."""
    width, height = image.size
    side = min(width, height) if size is None else size
    if side > min(width, height):
        raise ImageDecodeError(f"image {width}×{height} is smaller than the {side}×{side} crop")
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def resize_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize a square image: Lanczos when shrinking (antialiased), bicubic when enlarging."""
    if image.size == (resolution, resolution):
        return image
    shrinking = image.size[0] > resolution
    method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return image.resize((resolution, resolution), method)


def to_chw(image: Image.Image) -> np.ndarray:
    """PIL image → uint8 (C, H, W), C order."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))
