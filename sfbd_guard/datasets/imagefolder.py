"""A folder of images (recursive; jpg/png/webp) with an optional metadata.parquet, metadata.jsonl or metadata.csv.

The metadata file has a `file_name` column (path relative to the root) and any other columns, exposed
as they are. `record_id` is the relative path. An image with no metadata row gets null metadata; a
metadata row whose file is missing is kept, and becomes an `error` row when curation tries to read it.
So does a `file_name` that is absolute or climbs with `..`, and an image that is a symlink leading
outside the root: nothing outside the root is ever read. The scan does not enter symlinked directories.

Splits: with `train/`, `validation/` or `test/` folders under the root, a named split reads only its folder
(record ids stay relative to the root) and a `split` column names each record's folder (null outside them);
each split folder may hold its own metadata file, whose file_name is relative to that folder (the Hugging Face
layout). Labels: when no metadata gives `label` and every image sits in a folder under its split folder (or under
the root), `label` is that class folder's name.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .base import DatasetReader, check_reserved, safe_join
from .transforms import load_square, to_chw

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
METADATA_FILES = ("metadata.parquet", "metadata.jsonl", "metadata.csv")  # the first one present is read
SPLIT_FOLDERS = ("train", "validation", "test")


def _normalise(name: str) -> str:
    return str(PurePosixPath(name.replace("\\", "/")))


class ImageFolderReader(DatasetReader):
    format = "imagefolder"
    splits = ("all", *SPLIT_FOLDERS)

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

    def _metadata_file(self, folder: str = "") -> pa.Table | None:
        """The first metadata file in `folder` (the root, or a split folder), its file_name made relative to the root."""
        import duckdb

        for name in METADATA_FILES:
            relative = f"{folder}/{name}" if folder else name
            if not (self.root / relative).is_file():
                continue
            path = self.require_file(relative)  # refuses a metadata file that is a symlink out of the root
            size = path.stat().st_size
            if size > self.spec.max_file_bytes:
                raise InputError(f"{path}: {size} bytes, above the budget dataset.max_file_bytes = {self.spec.max_file_bytes}",
                                 hint="raise dataset.max_file_bytes in the policy if the file is genuine")
            reader = {".parquet": "read_parquet(?)", ".jsonl": "read_json(?, format = 'newline_delimited')"}.get(
                path.suffix, "read_csv(?)")  # .jsonl: the Hugging Face image-folder convention
            try:
                # one thread: about a third less peak memory for a large metadata.jsonl, at no cost here
                con = duckdb.connect(config={"threads": 1})
                table: pa.Table = con.sql(f"SELECT * FROM {reader}", params=[str(path)]).to_arrow_table()
            except duckdb.Error as err:
                raise InputError(f"{path}: cannot read: {str(err).splitlines()[0]}") from None
            if "file_name" not in table.column_names:
                raise InputError(f"{path}: needs a file_name column (path of the image relative to its folder)")
            check_reserved(table.column_names, str(path))
            names = [_normalise(f"{folder}/{v}" if folder else str(v)) for v in table.column("file_name").to_pylist()]
            return table.append_column("_guard_name", pa.array(names, pa.string()))
        return None

    def metadata(self) -> pa.Table:
        self.require_root()
        every = self._image_files()
        folders = self._split_folders()
        split = self.spec.split
        if split != "all" and not folders:
            raise InputError(f"dataset.split: {split!r}: {self.root} has no train/, validation/ or test/ folder",
                             hint="use split: all, or put the images in split folders")
        selected = [name for name in folders if split in ("all", name)]
        files = every if split == "all" else [f for f in every if f.startswith(f"{split}/")]
        found = [t for t in [self._metadata_file()] + [self._metadata_file(name) for name in selected] if t is not None]
        if found:
            extra = pa.concat_tables(found, promote_options="permissive")
            if split != "all":
                keep = [str(n).startswith(f"{split}/") for n in extra.column("_guard_name").to_pylist()]
                extra = extra.filter(pa.array(keep, pa.bool_()))
            names = [str(v) for v in extra.column("_guard_name").to_pylist()]  # `..`/absolute: error rows at load
            if len(set(names)) != len(names):
                raise InputError(f"{self.root}: metadata lists some file_name more than once")
            extra = extra.drop_columns([c for c in ("record_id", "_guard_name") if c in extra.column_names])
            extra = extra.append_column("record_id", pa.array(names, pa.string()))
            listed = set(names)
            unlisted = pa.table({"record_id": pa.array([f for f in files if f not in listed], pa.string())})
            table = pa.concat_tables([extra, unlisted], promote_options="default").select(
                ["record_id"] + [c for c in extra.column_names if c != "record_id"]
            ).sort_by("record_id")
        else:
            table = pa.table({"record_id": pa.array(files, pa.string())})
        return self._folder_columns(table, every, folders)

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
        path = safe_join(self.root, record_id)  # PathEscapeError (an error row) for `..`, absolute or symlink-out
        return to_chw(load_square(path, self.spec.resolution,
                                  max_pixels=self.spec.max_pixels, max_file_bytes=self.spec.max_file_bytes))
