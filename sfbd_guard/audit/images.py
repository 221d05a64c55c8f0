"""Folders of images to audit (generated samples, or a holdout): listed recursively, brought to the
prepared resolution exactly as `guard prepare` brings a source image there (central square, Lanczos
when shrinking, bicubic when enlarging), so a generated image and an original meet on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets.transforms import load_square, to_chw
from ..errors import ImageDecodeError, InputError

EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class LoadedImages:
    """The images of a folder, in sorted relative-path order; unreadable ones keep their error."""

    names: list[str]  # path relative to the folder, POSIX separators
    sizes: list[tuple[int, int] | None]  # original (width, height); None when unreadable
    pixels: np.ndarray  # uint8 (N_ok, C, H, W) of the readable images, in `names` order
    ok: np.ndarray  # bool (N,): readable
    errors: dict[str, str]  # name -> why it could not be read


def list_images(folder: Path, what: str) -> list[Path]:
    """PNG/JPEG files under `folder` (recursive, sorted); exit 2 when there is none or no folder.

    A folder written by `guard sample` is read through its `samples.json`, which lists the samples
    (so its grid.png, a picture of many samples, is not audited as one).
    """
    if not folder.is_dir():
        raise InputError(f"{what} {folder}: not a directory")
    listing = folder / "samples.json"
    if listing.is_file():
        import json

        names = json.loads(listing.read_text()).get("images", [])
        files = [folder / name for name in names]
        if files:
            return files
    try:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot list: {err.strerror or err}") from None
    if not files:
        raise InputError(f"{what} {folder}: no PNG or JPEG images (searched recursively)",
                         hint="point it at the folder guard sample wrote, or any folder of .png/.jpg files")
    return files


def load_image(path: Path, resolution: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (channels, resolution, resolution) of any PNG/JPEG, and its original (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"cannot decode {path.name}: {err}") from None
    square = load_square(path, resolution)
    if channels == 1:
        square = square.convert("L")
    return to_chw(square), size


def load_folder(folder: Path, resolution: int, channels: int, *, what: str = "--samples") -> LoadedImages:
    """Every image under `folder`; unreadable files are recorded, not fatal, unless none is readable."""
    files = list_images(folder, what)
    names, sizes, arrays, ok, errors = [], [], [], [], {}
    for path in files:
        name = path.relative_to(folder).as_posix()
        names.append(name)
        try:
            pixels, size = load_image(path, resolution, channels)
        except ImageDecodeError as err:
            errors[name] = str(err)
            sizes.append(None)
            ok.append(False)
            continue
        arrays.append(pixels)
        sizes.append(size)
        ok.append(True)
    if not arrays:
        raise InputError(f"{what} {folder}: none of the {len(files)} image file(s) could be read",
                         hint=f"first problem: {next(iter(errors.values()))}")
    return LoadedImages(names, sizes, np.stack(arrays), np.asarray(ok, dtype=bool), errors)
