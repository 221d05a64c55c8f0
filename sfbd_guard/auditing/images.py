"""Folders of images to audit (generated samples, or a holdout): listed recursively, brought to the
prepared resolution exactly as `guard prepare` brings a source image there (central square, Lanczos
when shrinking, bicubic when enlarging), so a generated image and an original meet on equal terms.

Every image file under the folder is audited. A `samples.json` (written by `guard sample`) may add
files and name the sample grid, but it cannot hide a file: its names must stay inside the folder,
and its grid is left out only when its pixels are exactly the mosaic of the listed samples (so it
shows nothing that is not audited anyway). Images above a pixel or byte budget are not decoded;
they become that sample's error row, like any unreadable file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..datasets.base import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from ..datasets.transforms import decode_square, to_chw
from ..errors import ImageDecodeError, InputError
from ..rundir import SAMPLES_INDEX

EXTENSIONS = (".png", ".jpg", ".jpeg")
LISTING = SAMPLES_INDEX
MAX_LISTING_BYTES = 256 << 20  # a listing of millions of sample names; a larger one is refused unparsed
MAX_PIXELS = DEFAULT_MAX_PIXELS  # as curation: PIL's decompression-bomb limit; larger images are never decoded
MAX_BYTES = DEFAULT_MAX_FILE_BYTES  # no generated sample is this large; bigger files are not read


@dataclass(frozen=True)
class LoadedImages:
    """The images of a folder, in sorted relative-path order; unreadable ones keep their error."""

    names: list[str]  # path relative to the folder, POSIX separators
    sizes: list[tuple[int, int] | None]  # original (width, height); None when unreadable
    pixels: np.ndarray  # uint8 (N_ok, C, H, W) of the readable images, in `names` order
    ok: np.ndarray  # bool (N,): readable
    errors: dict[str, str]  # name -> why it could not be read
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not audited (the verified grid)


def _listing(folder: Path, what: str) -> tuple[list[Path], Path | None]:
    """The files `samples.json` names (each inside `folder`) and its grid; ([], None) without one."""
    from ..contracts.base import load_json

    listing = folder / LISTING
    if not listing.exists() and not listing.is_symlink():
        return [], None
    hint = f"{LISTING} is written by guard sample; fix or remove it (every image in the folder is audited anyway)"
    payload = load_json(listing, hint=hint, limit=MAX_LISTING_BYTES, label=f"{what} {listing}")
    names, grid = payload.get("images", []), payload.get("grid")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{what} {listing}: images must be a list of file names", hint=hint)
    if grid is not None and not isinstance(grid, str):
        raise InputError(f"{what} {listing}: grid must be a file name, got {grid!r}", hint=hint)
    root = folder.resolve()
    files = []
    for name in [*names, *([grid] if grid else [])]:
        relative = Path(name)
        if not name or relative.is_absolute() or ".." in relative.parts or not (root / relative).resolve().is_relative_to(root):
            raise InputError(f"{what} {listing}: {name!r} is not a file inside {folder} (absolute paths, '..' "
                             "and symlinks out of the folder are refused)", hint=hint)
        if not (folder / relative).is_file():
            raise InputError(f"{what} {listing}: lists {name!r}, which is not a file in {folder}", hint=hint)
        files.append(folder / relative)
    return files[: len(names)], (folder / grid if grid else None)


def list_images(folder: Path, what: str) -> list[Path]:
    """Every PNG/JPEG file under `folder` (recursive, sorted), plus any other file `samples.json` lists;
    exit 2 when there is none or no folder, or when `samples.json` is malformed or names a path outside."""
    if not folder.is_dir():
        raise InputError(f"{what} {folder}: not a directory")
    listed, grid = _listing(folder, what)
    try:
        found = {p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()}
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot list: {err.strerror or err}") from None
    files = sorted(found | set(listed) | ({grid} if grid else set()))
    if not files:
        raise InputError(f"{what} {folder}: no PNG or JPEG images (searched recursively)",
                         hint="point it at the folder guard sample wrote, or any folder of .png/.jpg files")
    return files


def _native(path: Path) -> np.ndarray | None:
    """uint8 pixels of a small PNG as stored (H, W) or (H, W, C); None when unreadable or over budget."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.size[0] * image.size[1] > MAX_PIXELS or image.mode not in ("L", "RGB"):
                    return None
                return np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def is_grid_of(grid: Path, samples: list[Path]) -> bool:
    """Whether `grid` is exactly `guard sample`'s grid.png of `samples`: their first 256 images, upscaled
    to at least 64 px by pixel repetition, on a near-square mosaic with a 2-pixel white border."""
    native = [_native(p) for p in samples[:256]]
    images = [i for i in native if i is not None]
    picture = _native(grid)
    if not images or picture is None or len(images) != len(native):
        return False
    first = images[0]
    if any(i.shape != first.shape for i in images) or picture.ndim != first.ndim:
        return False
    scale = max(1, 64 // first.shape[1])
    tiles = [i.repeat(scale, axis=0).repeat(scale, axis=1) for i in images]
    h, w = tiles[0].shape[:2]
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    expected = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, *first.shape[2:]), 255, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = divmod(k, columns)
        expected[y * (h + 2) + 2 : y * (h + 2) + 2 + h, x * (w + 2) + 2 : x * (w + 2) + 2 + w] = tile
    return picture.shape == expected.shape and bool(np.array_equal(picture, expected))


def load_image(path: Path, resolution: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (channels, resolution, resolution) of any PNG/JPEG, and its original (width, height).

    Through the curation's decoder: a file above MAX_BYTES is not read, an image whose header declares
    more than MAX_PIXELS is not decoded, and a final symlink is not followed (ImageDecodeError).
    """
    square, size = decode_square(path, resolution, max_pixels=MAX_PIXELS, max_file_bytes=MAX_BYTES,
                                 settings=("the audit's pixel budget", "the audit's byte budget"))
    if channels == 1:
        square = square.convert("L")
    return to_chw(square), size


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def load_folder(folder: Path, resolution: int, channels: int, *, what: str = "--samples") -> LoadedImages:
    """Every image under `folder`; unreadable files are recorded, not fatal, unless none is readable."""
    files = list_images(folder, what)
    listed, grid = _listing(folder, what)
    skipped: dict[str, str] = {}
    if grid is not None and grid not in listed and is_grid_of(grid, listed):
        files = [f for f in files if f != grid]
        skipped[grid.relative_to(folder).as_posix()] = f"the grid of the samples {LISTING} lists (verified pixel for pixel)"
    names: list[str] = []
    sizes: list[tuple[int, int] | None] = []
    arrays: list[np.ndarray] = []
    ok: list[bool] = []
    errors: dict[str, str] = {}
    for path in files:
        name = path.relative_to(folder).as_posix()
        names.append(name)
        try:
            if not _inside(path, folder):
                raise ImageDecodeError(f"{name}: a symlink that leads outside {what} {folder}; not read")
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
    return LoadedImages(names, sizes, np.stack(arrays), np.asarray(ok, dtype=bool), errors, skipped)
