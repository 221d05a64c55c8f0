"""A folder of images (recursive; jpg/png/webp) with an optional metadata.parquet, metadata.jsonl or metadata.csv.

The metadata file (one per folder: two are refused) has a `file_name` column (path relative to its folder) and any
other columns; it is read row by row with each row's line (metadata_file.py). `record_id` is the image's relative
path. A row meets the image whose name equals its file_name after Unicode NFC normalisation, and nothing else is
folded (case, `./`, spaces): the record keeps the image's own name. An image with no metadata row gets null
metadata; a metadata row that names no image is kept, and becomes an `error` row when curation tries to read it
(`load` reads only an image the scan lists, by its exact name), as does a row whose file_name is not a string or
that cannot be read (record id `<metadata file>:<line>`). `listing_report` says what met nothing;
curation/listing.py stops a prepare when such a row is, or may be, an opt-out. A `file_name` that is absolute or
climbs with `..`, and an image that is a symlink leading outside the root, are error rows too: nothing outside the
root is ever read. The scan does not enter symlinked directories.

Splits: with `train/`, `validation/` or `test/` folders under the root, a named split reads only its folder
(record ids stay relative to the root) and a `split` column names each record's folder (null outside them);
each split folder may hold its own metadata file, whose file_name is relative to that folder (the Hugging Face
layout). Labels: when no metadata gives `label` and every image sits in a folder under its split folder (or under
the root), `label` is that class folder's name.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import DatasetReader, ListingReport, SourceSpec, check_reserved, safe_join
from .metadata_file import METADATA_NAMES, MetadataRows, read_metadata
from .streamed import concat_parts
from .transforms import load_square, to_chw

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
METADATA_ORDER = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # as messages name them
ROW_ID = re.compile(r"(?:[^/]+/)?metadata\.(?:csv|jsonl|parquet):[0-9]+")  # the record id of a row naming no image
SPLIT_FOLDERS = ("train", "validation", "test")


class ImageFolderReader(DatasetReader):
    format = "imagefolder"
    splits = ("all", *SPLIT_FOLDERS)

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._row_errors: dict[str, str] | None = None  # id of a metadata row naming no image -> why (after listing)
        self._report: ListingReport | None = None
        self._listed: dict[Path, frozenset[str]] = {}  # folder -> its entries (load reads scanned names only)

    def layout_hint(self) -> str:
        return ("expected image files under the root, optionally with metadata.csv, metadata.jsonl or metadata.parquet "
                "(column file_name)")

    def _image_files(self) -> list[str]:
        """Relative paths of the image files under the root; symlinked directories are not entered.

        A symlinked file is listed (load() refuses it if it leads outside the root, as an error row).
        """
        root = self.root.resolve()
        found = []
        for folder, _, names in os.walk(root, followlinks=False):
            for name in names:
                path = Path(folder, name)
                if path.suffix.lower() in EXTENSIONS and (path.is_symlink() or path.is_file()):
                    found.append(path.relative_to(root).as_posix())
        return sorted(found)

    def _split_folders(self) -> list[str]:
        """The split folders (train/, validation/, test/) directly under the root; symlinked folders do not count."""
        return [name for name in SPLIT_FOLDERS if (self.root / name).is_dir() and not (self.root / name).is_symlink()]

    def _metadata_rows(self, folder: str = "") -> MetadataRows | None:
        """The metadata file of `folder` (the root, or a split folder); two of them in one folder are refused."""
        # a symlink counts even when it leads nowhere: require_file then says the file is missing (a dangling
        # metadata.csv read as no metadata would drop the opt-outs it lists)
        present = [name for name in METADATA_NAMES
                   if (self.root / folder / name).is_file() or (self.root / folder / name).is_symlink()]
        if len(present) > 1:
            where = self.root / folder if folder else self.root
            raise InputError(f"{where}: both {' and '.join(sorted(present, key=METADATA_ORDER.index))}: keep one",
                             hint="one metadata file per folder; merge the rows into one file")
        if not present:
            return None
        relative = f"{folder}/{present[0]}" if folder else present[0]
        path = self.require_file(relative)  # refuses a metadata file that is a symlink out of the root
        if path.suffix == ".parquet":
            size = path.stat().st_size
            if size > self.spec.max_file_bytes:
                raise InputError(f"{path}: {size} bytes, above the budget dataset.max_file_bytes = "
                                 f"{self.spec.max_file_bytes}", hint="raise dataset.max_file_bytes in the policy if "
                                 "the file is genuine")
            rows = read_metadata(path, None, relative)
        else:
            rows = read_metadata(path, self.read_file(path), relative)
        check_reserved(rows.table.column_names, str(path))
        return rows

    def _listing(self) -> tuple[pa.Table, ListingReport | None]:
        self.require_root()
        every = self._image_files()
        folders = self._split_folders()
        split = self.spec.split
        if split != "all" and not folders:
            raise InputError(f"dataset.split: {split!r}: {self.root} has no train/, validation/ or test/ folder",
                             hint="use split: all, or put the images in split folders")
        selected = [name for name in folders if split in ("all", name)]
        files = every if split == "all" else [f for f in every if f.startswith(f"{split}/")]
        found = [(folder, rows) for folder in ["", *selected] if (rows := self._metadata_rows(folder)) is not None]
        if not found:
            self._row_errors = {}
            return self._folder_columns(pa.table({"record_id": pa.array(files, pa.string())}), every, folders), None
        images = self._by_nfc(every)
        scanned = set(every)
        others = tuple(f"{name}/" for name in folders if name != split)

        def in_split(record_id: str) -> bool:
            """A row of the selected split: under its folder, or naming no image and no other split folder."""
            if split == "all" or record_id.startswith(f"{split}/"):
                return True
            return record_id not in scanned and not record_id.startswith(others)

        tables: list[pa.Table] = []
        named: dict[str, str] = {}  # record id -> the row that names it
        errors: dict[str, str] = {}
        without: dict[str, str] = {}
        unreadable: dict[str, str] = {}
        for folder, rows in found:
            ids: list[str] = []
            keep: list[bool] = []
            for index, name in enumerate(rows.names):
                where = rows.where(index)
                if name is None:
                    record_id = f"{rows.path}:{rows.lines[index]}"
                    errors[record_id] = f"{where}: {rows.problems[index]}"
                    without[record_id] = where
                    if rows.unreadable[index]:
                        unreadable[record_id] = errors[record_id]
                else:
                    full = f"{folder}/{name}" if folder else name
                    record_id = images.get(unicodedata.normalize("NFC", full), full)
                    if record_id not in scanned:
                        without[record_id] = where
                ids.append(record_id)
                keep.append(in_split(record_id))
                if not keep[-1]:
                    without.pop(record_id, None)
                    errors.pop(record_id, None)
                    unreadable.pop(record_id, None)
                    continue
                if record_id in named:
                    raise InputError(f"{named[record_id]} and {where} both name {record_id!r}",
                                     hint="keep one metadata row per image (names are compared in Unicode NFC)")
                named[record_id] = where
            table = rows.table.append_column("record_id", pa.array(ids, pa.string()))
            tables.append(table.filter(pa.array(keep, pa.bool_())))
        extra = concat_parts(tables)
        missing = [f for f in files if f not in named]
        unlisted = pa.table({"record_id": pa.array(missing, pa.string())})
        table = pa.concat_tables([extra, unlisted], promote_options="default")
        table = table.select(["record_id"] + [c for c in table.column_names if c != "record_id"]).sort_by("record_id")
        self._row_errors = errors
        report = ListingReport(metadata_files=[rows.path for _, rows in found], rows=len(named),
                               images_without_row=missing, rows_without_image=without, unreadable_rows=unreadable)
        return self._folder_columns(table, every, folders), report

    def _by_nfc(self, every: list[str]) -> dict[str, str]:
        """Each image's name in Unicode NFC -> its name on disk; two images of one NFC name are refused."""
        images: dict[str, str] = {}
        for name in every:
            key = unicodedata.normalize("NFC", name)
            if key in images:
                raise InputError(f"{self.root}: images {images[key]!r} and {name!r} have the same name in Unicode NFC "
                                 "(metadata rows are matched to images by it)", hint="rename one of them")
            images[key] = name
        return images

    def metadata(self) -> pa.Table:
        table, self._report = self._listing()
        return table

    def listing_report(self) -> ListingReport | None:
        if self._row_errors is None:
            self.metadata()
        return self._report

    @staticmethod
    def _folder_columns(table: pa.Table, every: list[str], folders: list[str]) -> pa.Table:
        """`split` from the split folder and `label` from the class folder, unless the metadata gives them.

        A class folder is the first folder under the split folder (or the root); labels are given only when every
        image of the dataset sits in one."""
        def inner(name: str) -> list[str]:
            parts = name.split("/")
            return parts[1:] if parts[0] in folders and len(parts) > 1 else parts

        ids = [str(v) for v in table.column("record_id").to_pylist()]
        present = {c.lower() for c in table.column_names}
        if folders and "split" not in present:
            table = table.append_column("split", pa.array(
                [name.split("/")[0] if name.split("/")[0] in folders and "/" in name else None for name in ids],
                pa.string()))
        if "label" not in present and every and all(len(inner(name)) > 1 for name in every):
            table = table.append_column("label", pa.array(
                [inner(name)[0] if len(inner(name)) > 1 else None for name in ids], pa.string()))
        return table

    def load(self, record_id: str) -> np.ndarray:
        if ROW_ID.fullmatch(record_id):  # a metadata row that could not be read: why
            if self._row_errors is None:
                try:
                    self.metadata()  # in a worker process: its reader has not listed the folder
                except InputError as err:
                    raise ImageDecodeError(f"{record_id}: {err}") from None
            assert self._row_errors is not None
            raise ImageDecodeError(self._row_errors.get(record_id, f"{record_id}: not a metadata row"))
        path = safe_join(self.root, record_id)  # PathEscapeError (an error row) for `..`, absolute or symlink-out
        self._require_scanned(record_id)
        return to_chw(load_square(path, self.spec.resolution,
                                  max_pixels=self.spec.max_pixels, max_file_bytes=self.spec.max_file_bytes))

    def _require_scanned(self, record_id: str) -> None:
        """Only an image the scan lists is read: its exact name (no case folding, `./` or `//`), an image suffix,
        and no symlinked folder on the way (the scan does not enter them)."""
        parts = record_id.split("/")
        if PurePosixPath(parts[-1]).suffix.lower() not in EXTENSIONS:
            raise ImageDecodeError(f"{record_id}: not an image file ({', '.join(sorted(EXTENSIONS))})")
        folder = self.root.resolve()
        for depth, part in enumerate(parts):
            if part not in self._names(folder):
                raise ImageDecodeError(f"{record_id}: file not found (no image has exactly this name)")
            folder = folder / part
            if depth < len(parts) - 1 and (folder.is_symlink() or not folder.is_dir()):
                raise ImageDecodeError(f"{record_id}: file not found (a symlinked folder is not scanned)")

    def _names(self, folder: Path) -> frozenset[str]:
        if folder not in self._listed:
            try:
                self._listed[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._listed[folder] = frozenset()
        return self._listed[folder]
