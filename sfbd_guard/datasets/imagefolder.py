"""A folder of images (recursive; jpg/png/webp) with an optional metadata.parquet, metadata.jsonl or metadata.csv.

The metadata file has a `file_name` column (path relative to the root) and any other columns, exposed
as they are. `record_id` is the relative path. An image with no metadata row gets null metadata; a
metadata row whose file is missing is kept, and becomes an `error` row when curation tries to read it.
So does a `file_name` that is absolute or climbs with `..`, and an image that is a symlink leading
outside the root: nothing outside the root is ever read. The scan does not enter symlinked directories.
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


def _normalise(name: str) -> str:
    return str(PurePosixPath(name.replace("\\", "/")))


class ImageFolderReader(DatasetReader):
    format = "imagefolder"

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

    def _metadata_file(self) -> pa.Table | None:
        import duckdb

        for name in METADATA_FILES:
            if not (self.root / name).is_file():
                continue
            path = self.require_file(name)  # refuses a metadata file that is a symlink out of the root
            size = path.stat().st_size
            if size > self.spec.max_file_bytes:
                raise InputError(f"{path}: {size} bytes, above the budget dataset.max_file_bytes = {self.spec.max_file_bytes}",
                                 hint="raise dataset.max_file_bytes in the policy if the file is genuine")
            reader = {".parquet": "read_parquet(?)", ".jsonl": "read_json(?, format = 'newline_delimited')"}.get(
                path.suffix, "read_csv(?)")  # .jsonl: the Hugging Face image-folder convention
            try:
                table: pa.Table = duckdb.connect().sql(f"SELECT * FROM {reader}", params=[str(path)]).to_arrow_table()
            except duckdb.Error as err:
                raise InputError(f"{path}: cannot read: {str(err).splitlines()[0]}") from None
            if "file_name" not in table.column_names:
                raise InputError(f"{path}: needs a file_name column (path of the image relative to the root)")
            check_reserved(table.column_names, str(path))
            return table
        return None

    def metadata(self) -> pa.Table:
        self.require_root()
        files = self._image_files()
        extra = self._metadata_file()
        if extra is None:
            return pa.table({"record_id": pa.array(files, pa.string())})
        names = [_normalise(str(v)) for v in extra.column("file_name").to_pylist()]  # `..`/absolute: error rows at load
        if len(set(names)) != len(names):
            raise InputError(f"{self.root}: metadata lists some file_name more than once")
        extra = extra.drop_columns(["record_id"]) if "record_id" in extra.column_names else extra
        extra = extra.append_column("record_id", pa.array(names, pa.string()))
        listed = set(names)
        unlisted = pa.table({"record_id": pa.array([f for f in files if f not in listed], pa.string())})
        return pa.concat_tables([extra, unlisted], promote_options="default").select(
            ["record_id"] + [c for c in extra.column_names if c != "record_id"]
        ).sort_by("record_id")

    def load(self, record_id: str) -> np.ndarray:
        path = safe_join(self.root, record_id)  # PathEscapeError (an error row) for `..`, absolute or symlink-out
        return to_chw(load_square(path, self.spec.resolution,
                                  max_pixels=self.spec.max_pixels, max_file_bytes=self.spec.max_file_bytes))
