"""The reader interface: a metadata table for the selected split, and one decoded image per record."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from ..fileio import NotRegularFileError
from ..fileio import open_regular as open_regular_file
from ..prepared.manifest import MANIFEST_COLUMNS

# Budgets for one source file (policy keys dataset.max_pixels and dataset.max_file_bytes). The pixel
# default is PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 0.18 gigapixels).
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
ESCAPES = "path escapes the dataset root"

# Column names the tool owns; a name a dataset supplies (an image folder's metadata file, CelebA's attribute
# list) may not be one of them, compared without case as DuckDB compares names: the manifest's columns
# (prepared/manifest.py; `record_id` is the reader's own) and every name starting with `_guard` (the rule
# evaluator's internal row number is `_guard_row`). A reader adds its own columns with `own`.
RESERVED_COLUMNS = MANIFEST_COLUMNS
RESERVED_PREFIX = "_guard"


@dataclass(frozen=True)
class SourceSpec:
    """Everything a reader needs; small and picklable so worker processes can open their own reader."""

    format: str
    root: Path | None
    split: str
    resolution: int
    max_pixels: int = DEFAULT_MAX_PIXELS  # an image of more pixels (header size) becomes an error row, undecoded
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger file becomes an error row (or, for a list, an InputError), unread
    shards: str | None = None  # webdataset: a brace pattern of tar shards relative to the root (None: the root's *.tar)
    image_column: str = "image"  # parquet: the column holding the images ({bytes, path} struct or binary)
    channels: int | None = None  # 1: a 3-channel format's images as grey (datasets/grey.py); None: the format's own


# Records per part of a listed dataset (one worker's unit of work in guard prepare; see DatasetReader.parts).
PART_RECORDS = 4096


@dataclass(frozen=True)
class Part:
    """A piece of a dataset that one worker reads on its own, in dataset order (a tar shard, a Parquet file or a
    run of its rows, a run of an image folder's listing). Small and picklable: it names, it does not hold.

    `index` is the part's position in dataset order; `name` is what messages show. `source` (a path relative to
    the root), `start` and `stop` mean what the reader that made the part says: a Parquet file and its row range,
    a listing's row range.
    """

    index: int
    name: str
    source: str = ""
    start: int = 0
    stop: int = 0


def listing_parts(count: int, size: int | None = None) -> list[Part]:
    """A listing of `count` records cut into parts of `size` (default PART_RECORDS) rows (`start`/`stop`: rows)."""
    size = size or PART_RECORDS
    return [Part(i, f"records {start}-{min(start + size, count) - 1}", start=start, stop=min(start + size, count))
            for i, start in enumerate(range(0, count, size))]


@dataclass(frozen=True)
class ListingReport:
    """How a listed reader joined its metadata file(s) to the images (image folders): what a person should check.

    Record ids of the listing: `images_without_row` have null metadata; `rows_without_image` (id -> the file and
    line of the row) are error rows, among them rows whose file_name is unusable and `unreadable_rows` (id -> the
    file, line and why), of which nothing could be read."""

    metadata_files: list[str]  # relative to the root
    rows: int  # metadata rows of the selected split
    images_without_row: list[str]
    rows_without_image: dict[str, str]
    unreadable_rows: dict[str, str]


Loaded = tuple[str, "np.ndarray | ImageDecodeError"]  # a record id and its transformed pixels, or why they cannot be read


class PathEscapeError(ImageDecodeError):
    """A dataset path that is absolute, climbs with `..`, or resolves (through a symlink) outside the root."""


def safe_join(root: Path, *parts: str) -> Path:
    """The resolved path of `parts` under `root`, refused unless it stays inside the resolved root.

    Each part is a relative path from a dataset's own files (a list, a metadata row, a directory scan):
    absolute paths, drive letters, `..` components and NUL bytes are refused outright, and the joined
    path is resolved through every symlink and must still lie under the root's real path. Raises
    PathEscapeError (an ImageDecodeError, so a record becomes an `error` row with the reason).
    """
    for part in parts:  # backslashes count as separators for the check (a list written on Windows)
        readings = (PurePosixPath(part), PurePosixPath(part.replace("\\", "/")))
        if "\0" in part or PureWindowsPath(part).drive or any(r.is_absolute() or ".." in r.parts for r in readings):
            raise PathEscapeError(f"{part}: {ESCAPES}")
    try:
        real_root = root.resolve()
        resolved = real_root.joinpath(*parts).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise PathEscapeError(f"{parts[-1] if parts else root.name}: cannot resolve the path (a symlink loop)") from None
    if not resolved.is_relative_to(real_root):
        raise PathEscapeError(f"{parts[-1] if parts else root.name}: {ESCAPES} (through a symlink)")
    return resolved


def open_regular(path: Path, label: str, error: type[ImageDecodeError] = ImageDecodeError) -> BinaryIO:
    """`path` (already resolved by safe_join) opened for reading, if it is a regular file.

    O_NOFOLLOW: a final component swapped for a symlink after the check is refused rather than followed;
    O_NONBLOCK: a FIFO named like an image does not hang the run (it is refused as not a regular file).
    Raises `error` with "<label>: file not found | cannot open: … | not a regular file".
    """
    try:
        return open_regular_file(path, follow_links=False)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except NotRegularFileError:
        raise error(f"{label}: not a regular file") from None
    except OSError as err:
        raise error(f"{label}: cannot open: {err.strerror or err}") from None


def read_bounded(path: Path, max_bytes: int, setting: str = "dataset.max_file_bytes") -> bytes:
    """The bytes of the regular file `path` (already resolved by safe_join), at most `max_bytes` of them.

    The size is checked with fstat before anything is read (`open_regular` refuses links and devices).
    Raises ImageDecodeError naming the file.
    """
    with open_regular(path, path.name) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ImageDecodeError(f"{path.name}: {size} bytes, above the budget {setting} = {max_bytes}")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise ImageDecodeError(f"{path.name}: more than {setting} = {max_bytes} bytes")
    return data


class DatasetReader(ABC):
    """One on-disk dataset layout. Subclasses set `splits`, `channels` and `color`.

    Two kinds of layout:
    - listed (`listed = True`, the default): `metadata()` is a listing cheap enough to read once in one
      process (a folder scan, an attribute file, CIFAR's batches); `parts()` cuts it into runs of PART_RECORDS
      records, and workers read records with `load`/`read_part`.
    - streamed (`listed = False`: WebDataset shards, Parquet files): the metadata lives next to the images, so
      `parts()` lists the shards/files from their names or footers only, `part_metadata(part)` reads one part's
      rows (run by workers, in parallel), and `read_part` streams the part's images.
    Record ids are unique in the dataset. A problem with one record (a corrupt image, a broken tar member,
    missing bytes) is an ImageDecodeError for that record from `load`/`read_part` (an `error` row in the
    manifest), never an exception out of the reader; a problem with a whole part that names no record (a file that
    is not a tar) is listed by `part_metadata` as one record named after the part, whose read gives the error.
    """

    format: str = ""
    splits: tuple[str, ...] = ("all",)
    channels: int = 3
    color: str = "RGB"
    listed: bool = True

    def __init__(self, spec: SourceSpec) -> None:
        if spec.split not in self.splits:
            raise InputError(
                f"dataset.split: {spec.split!r} is not a split of format {self.format!r}",
                hint=f"choose one of: {', '.join(self.splits)}",
            )
        self.spec = spec

    @property
    def root(self) -> Path:
        assert self.spec.root is not None
        return self.spec.root

    @abstractmethod
    def metadata(self) -> pa.Table:
        """One row per record of the selected split, in dataset order, `record_id` first.

        Listed readers: the listing (sorted by record_id). Streamed readers: the parts' rows concatenated (for
        small datasets and tests; guard prepare reads parts instead)."""

    @abstractmethod
    def load(self, record_id: str) -> np.ndarray:
        """The record's transformed pixels, uint8 (C, H, W); raises ImageDecodeError if unreadable."""

    def parts(self) -> list[Part]:
        """The dataset's parts in order. Listed readers: runs of PART_RECORDS rows of `metadata()`
        (`start`/`stop` are row numbers of the listing)."""
        return listing_parts(self.metadata().num_rows)

    def part_metadata(self, part: Part) -> pa.Table:
        """The rows of one part, in dataset order, `record_id` first (its columns may differ between parts: the
        caller unifies them). Listed readers: a slice of `metadata()`."""
        return self.metadata().slice(part.start, part.stop - part.start)

    def read_part(self, part: Part, record_ids: Sequence[str]) -> Iterator[Loaded]:
        """Each of `record_ids` (records of `part`, in dataset order) once, in any order, with its transformed
        pixels or the ImageDecodeError saying why it cannot be read. Streamed readers read the part once."""
        yield from self.load_many(record_ids)

    def load_many(self, record_ids: Sequence[str]) -> Iterator[Loaded]:
        """Each of `record_ids` once, in any order, as `read_part` (random access: the audit's originals).
        Streamed readers group the ids by part and read each part once."""
        for record_id in record_ids:
            try:
                yield record_id, self.load(record_id)
            except ImageDecodeError as err:
                yield record_id, err

    def listing_report(self) -> ListingReport | None:
        """How the metadata file(s) met the images, for a layout that joins them by name (None: nothing joined)."""
        return None

    def require_file(self, relative: str) -> Path:
        """The resolved path of one of the layout's own files; InputError if missing or outside the root."""
        try:
            path = safe_join(self.root, relative)
        except PathEscapeError as err:
            reason = str(err).removeprefix(f"{relative}: ")
            raise InputError(f"{self.format} dataset: {self.root / relative}: {reason}",
                             hint="copy the file into the dataset root, or point the root at the real folder") from None
        if not path.is_file():
            raise InputError(f"{self.format} dataset: missing {self.root / relative}", hint=self.layout_hint())
        return path

    def read_file(self, path: Path) -> bytes:
        """A whole layout file (list, batch, metadata) within the byte budget; InputError otherwise."""
        try:
            return read_bounded(path, self.spec.max_file_bytes)
        except ImageDecodeError as err:
            raise InputError(f"{self.format} dataset: {path}: {str(err).removeprefix(path.name + ': ')}",
                             hint="raise dataset.max_file_bytes in the policy if the file is genuine") from None

    def require_root(self) -> None:
        if not self.root.is_dir():
            raise InputError(f"{self.format} dataset: root {self.root} is not a directory", hint=self.layout_hint())

    def layout_hint(self) -> str:
        return "set dataset.root in the policy or pass --data-root"


def check_reserved(columns: list[str], source: str, own: tuple[str, ...] = ()) -> None:
    """InputError naming `source` if a column a dataset supplies clashes with the tool's or the reader's `own`
    columns, or with another of its columns (names are compared without case)."""
    reserved = {name.lower() for name in (*RESERVED_COLUMNS, *own)}
    clashes = [name for name in columns if name.lower() in reserved or name.lower().startswith(RESERVED_PREFIX)]
    if clashes:
        raise InputError(f"{source}: column(s) {', '.join(map(repr, clashes))} clash with the tool's own columns "
                         f"(reserved: {', '.join(sorted(reserved))}, {RESERVED_PREFIX}*)",
                         hint="rename them in the dataset's metadata")
    folded = [name.lower() for name in columns]
    repeated = sorted({name for name in columns if folded.count(name.lower()) > 1})
    if repeated:
        raise InputError(f"{source}: column(s) {', '.join(map(repr, repeated))} appear more than once "
                         "(names are compared without case)", hint="rename them in the dataset's metadata")
