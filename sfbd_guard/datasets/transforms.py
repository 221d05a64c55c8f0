"""Image decoding and the deterministic transforms shared by `guard prepare` and `guard audit`.

PIL does the decoding and resampling (torchvision's transforms call into PIL for PIL images, and
importing torch in every curation worker would cost seconds and a gigabyte each).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageDecodeError
from .base import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, read_bounded

# PIL's own bomb check runs inside Image.open, before ours; it is set above the largest allowed
# dataset.max_pixels so that the policy's budget decides (open_image turns PIL's check into an error row too).
MAX_PIXELS_LIMIT = 32_000 * 32_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS_LIMIT


def center_box(width: int, height: int, size: int | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central size × size square (the largest square when size is None)."""
    side = min(width, height) if size is None else size
    if side > min(width, height):
        raise ImageDecodeError(f"image {width}×{height} is smaller than the {side}×{side} crop")
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # PIL's JPEG opener also returns the MPO variant cameras write


def open_image(data: bytes, name: str, max_pixels: int, setting: str = "dataset.max_pixels") -> Image.Image:
    """PIL's lazy image of `data` (only the header is read), refused above `max_pixels` before any decoding.

    Only PNG, JPEG, WebP and GIF are identified. PIL's own bomb check (a warning, then an error, above
    Image.MAX_IMAGE_PIXELS) is turned into the same ImageDecodeError, never a warning or a traceback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:  # PIL's message names the in-memory file object, which differs per run
        raise ImageDecodeError(f"cannot decode {name}: not a PNG, JPEG, WebP or GIF image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"cannot decode {name}: more pixels than {setting} = {max_pixels}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(f"cannot decode {name}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageDecodeError(f"cannot decode {name}: {width}×{height} = {width * height} pixels, "
                               f"above the budget {setting} = {max_pixels}")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An 8-bit RGB image of any mode PIL decodes PNG, JPEG, WebP and GIF frames to.

    16-bit and 32-bit grey (I;16, I;16B, I) are scaled by 255/65535 with rounding, not clipped at 255.
    Transparent images (RGBA, LA, palette or grey with a transparent colour) are composited over
    `background` (white). CMYK, YCbCr, bilevel and palette images go through PIL's conversions.
    """
    if image.mode.startswith("I"):  # I;16, I;16L, I;16B, I;16N: 16-bit grey; I: 32-bit holding 16-bit PNG values
        values = np.asarray(image).astype(np.float64).clip(0, 65535)
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB: the caller closes `image`


def load_square(path: Path, resolution: int, crop: int | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Image.Image:
    """`decode_square` without the original size."""
    return decode_square(path, resolution, crop, max_pixels=max_pixels, max_file_bytes=max_file_bytes)[0]


def decode_square(path: Path, resolution: int, crop: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, settings: tuple[str, str] = ("dataset.max_pixels",
                  "dataset.max_file_bytes")) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path`, take the central crop × crop square (largest square if None), resize to resolution;
    also the image's original (width, height). `settings` name the two budgets in error messages.

    The file is refused unread above `max_file_bytes` and undecoded above `max_pixels` (header size).
    `path` should come from `safe_join` (resolved inside the dataset root); a final symlink is not followed.
    An animated image gives its first frame; any mode becomes 8-bit RGB (see `to_rgb`).

    JPEGs are decoded with libjpeg's DCT scaling (1/2, 1/4, 1/8) to the smallest scale that keeps the
    crop at least `resolution` wide, as PIL's thumbnail() does: the same crop and resize, with the
    first halvings done in the DCT domain, 2-3× faster. Against a full-size decode + Lanczos it
    differs by about 41 dB PSNR on 64 px CelebA crops (see benchmarks/README.md, "Curation speed").
    """
    data = read_bounded(path, max_file_bytes, settings[1])  # one read: PIL's many small reads cost as much as decoding
    return decode_bytes_square(data, path.name, resolution, crop, max_pixels=max_pixels, setting=settings[0])


def decode_bytes_square(data: bytes, name: str, resolution: int, crop: int | None = None, *,
                        max_pixels: int = DEFAULT_MAX_PIXELS,
                        setting: str = "dataset.max_pixels") -> tuple[Image.Image, tuple[int, int]]:
    """`decode_square` of image bytes already in memory (a tar member, a Parquet cell) named `name` in messages.

    The caller checks the byte budget before reading the bytes; the pixel budget is checked here, from the header.
    """
    try:
        with open_image(data, name, max_pixels, setting) as image:
            width, height = image.size
            left, top, right, bottom = center_box(width, height, crop)
            need = resolution / (right - left)  # scale at which the crop is exactly `resolution` wide
            if need < 0.5:
                image.draft("RGB", (max(1, math.ceil(width * need)), max(1, math.ceil(height * need))))
            scale = image.size[0] / width
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                rgb = to_rgb(image)
            box = (left * scale, top * scale, right * scale, bottom * scale)
            return resize_square(rgb, resolution, box), (width, height)
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"cannot decode {name}: {err}") from None


def load_bytes(data: bytes, name: str, resolution: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The transformed uint8 (C, H, W) pixels of image bytes, as `to_chw(load_square(...))` gives for a file."""
    return to_chw(decode_bytes_square(data, name, resolution, max_pixels=max_pixels)[0])


def resize_square(image: Image.Image, resolution: int, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Resize a square image (or the square `box` of it): Lanczos when shrinking (antialiased), bicubic when enlarging."""
    box = box or (0, 0, image.size[0], image.size[1])
    if box == (0, 0, resolution, resolution) and image.size == (resolution, resolution):
        return image
    shrinking = box[2] - box[0] > resolution
    method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return image.resize((resolution, resolution), method, box=box)


def to_chw(image: Image.Image) -> np.ndarray:
    """PIL image → uint8 (C, H, W), C order."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))
