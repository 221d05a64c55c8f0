"""Parquet files with an image column, as the Hugging Face datasets library writes them.

The files are every `*.parquet` under the root (recursive, sorted by relative path; symlinked folders are not
entered, a symlinked file leading outside the root is refused). The image column (`dataset.image_column`,
default `image`) is the Hugging Face `{bytes, path}` struct or plain binary. Only the bytes are ever used: the
struct's `path` is a name from the file and is NEVER opened (a row without bytes is an error row).
A part is a run of whole row groups of one file, about PART_RECORDS rows, found from the file's footer.
`record_id` is `<file's relative path>/<row number in the file, 9 digits>`, e.g. `data/train-0000.parquet/000000042`.
Metadata: every other column of the file, none dropped (a column dropped from one file but read from another
would leave that file's records null there, and a null opt-out is no opt-out): scalar columns (booleans, numbers,
text, dates, times, decimals) as they are; list, struct and map values as their JSON text (`[true]`, which a
boolean rule refuses to read: exit 2); binary values of at most 64 bytes as they are, longer ones (a second image
column) as a marker, never their bytes (datasets/streamed.py `rule_column`). When files disagree on a column's type,
numbers widen and other mixes become text, never null (curation/records.py). A name the tool owns (`sha256`,
`error`, `record_id`, …) gets the prefix `source_`. Two columns of one name (also without case, or after that
prefix) are refused as ambiguous; types the rules cannot read are converted without loss when the records are
collected (curation/records.py `portable_type`: float16 → float32, a 256-bit decimal → decimal128 or its text).
A file whose metadata columns cannot be read (a damaged column chunk) stops prepare, naming the file.
Rows are streamed a batch at a time, reading the image column only for pixels and the other columns only for
metadata. A null or corrupt image is an error row; a file that is not Parquet (or
whose footer cannot be read) is one record named after the file, whose read gives the reason.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import PART_RECORDS, Loaded, Part, open_regular, safe_join
from .streamed import StreamedReader, rename_reserved, rows_table, rule_column
from .transforms import load_bytes

ID_DIGITS = 9
BATCH_ROWS = 16  # images decoded per Arrow batch: memory is this many images' bytes, whatever the file's size


class _FileError(ImageDecodeError):
    """The whole file cannot be read (not Parquet, missing, outside the root)."""


class ParquetReader(StreamedReader):
    format = "parquet"
    _files_parts: dict[str, list[Part]] | None = None  # file -> its parts, in row order (made on first use)

    def layout_hint(self) -> str:
        return ("expected *.parquet files under the root with an image column (the Hugging Face {bytes, path} struct "
                "or binary; dataset.image_column, default image)")

    def _files(self) -> list[str]:
        self.require_root()
        root = self.root.resolve()
        found = []
        for folder, _, names in os.walk(root, followlinks=False):
            for name in names:
                path = Path(folder, name)
                if name.endswith(".parquet") and (path.is_symlink() or path.is_file()):
                    found.append(path.relative_to(root).as_posix())
        if not found:
            raise InputError(f"parquet dataset: no *.parquet files under {self.root}", hint=self.layout_hint())
        return sorted(found)

    def _open(self, relative: str) -> Any:
        """pyarrow's ParquetFile of the file (its footer read); _FileError/PathEscapeError if it cannot be."""
        import pyarrow.parquet as pq

        handle = open_regular(safe_join(self.root, relative), relative, _FileError)
        try:
            return pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
        except (pa.ArrowException, OSError, ValueError) as err:
            handle.close()
            raise _FileError(f"{relative}: not a readable Parquet file ({str(err).splitlines()[0][:120]})") from None

    @staticmethod
    def _close(file: Any) -> None:
        file.close(force=True)  # closes the handle _open made

    def list_parts(self) -> list[Part]:
        parts: list[Part] = []
        for relative in self._files():
            try:
                file = self._open(relative)
            except ImageDecodeError:
                parts.append(Part(len(parts), relative, source=relative))  # start == stop == 0: the file is unreadable
                continue
            try:
                meta = file.metadata
                start = count = 0
                for group in range(meta.num_row_groups):
                    count += meta.row_group(group).num_rows
                    if count - start >= PART_RECORDS or group == meta.num_row_groups - 1:
                        if count > start:
                            parts.append(Part(len(parts), f"{relative} rows {start}-{count - 1}", source=relative,
                                              start=start, stop=count))
                        start = count
            finally:
                self._close(file)
        return parts

    def part_of(self, record_id: str, parts: list[Part]) -> Part | None:
        if self._files_parts is None:
            self._files_parts = {}
            for part in parts:
                self._files_parts.setdefault(part.source, []).append(part)
        relative, _, row = record_id.rpartition("/")
        broken = self._files_parts.get(record_id, [])
        if broken and broken[0].start == broken[0].stop == 0:  # the one record of an unreadable file
            return broken[0]
        if not row.isdigit():
            return None
        runs = self._files_parts.get(relative, [])
        found = bisect.bisect_right([part.start for part in runs], int(row)) - 1
        return runs[found] if found >= 0 and runs[found].start <= int(row) < runs[found].stop else None

    @staticmethod
    def _row_groups(file: Any, part: Part) -> list[int]:
        meta = file.metadata
        groups, first = [], 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if part.start <= first < part.stop:
                groups.append(group)
            first += rows
        return groups

    def _image_field(self, file: Any, part: Part) -> pa.Field[Any]:
        schema: pa.Schema = file.schema_arrow
        repeated = sorted({column for column in schema.names if schema.names.count(column) > 1})
        if repeated:  # which one is the image, which one the opt-out? Refused rather than guessed
            raise InputError(f"parquet dataset: {self.root / part.source}: column {repeated[0]!r} appears "
                             f"{schema.names.count(repeated[0])} times (ambiguous metadata)",
                             hint="give every column of the file its own name")
        name = self.spec.image_column
        if name not in schema.names:
            raise InputError(f"parquet dataset: {self.root / part.source}: no image column {name!r} "
                             f"(dataset.image_column); columns are: {', '.join(schema.names[:30])}")
        field: pa.Field[Any] = schema.field(name)
        kind = field.type
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
        if not (binary or struct):
            raise InputError(f"parquet dataset: {self.root / part.source}: column {name!r} is {kind}, not an image "
                             "(a {bytes, path} struct or binary)", hint="set dataset.image_column to the image column")
        return field

    def part_metadata(self, part: Part) -> pa.Table:
        if part.start == part.stop == 0:
            return rows_table([part.source], [{}])
        file = self._open(part.source)
        try:
            image = self._image_field(file, part)
            ids = [f"{part.source}/{row:0{ID_DIGITS}d}" for row in range(part.start, part.stop)]
            keep: list[str] = []
            folded: dict[str, str] = {}
            for field in file.schema_arrow:  # names are compared without case, as SQL does: twins are ambiguous
                if field.name == image.name:
                    continue
                twin = folded.setdefault(rename_reserved(field.name).lower(), field.name)
                if twin != field.name:
                    raise InputError(f"parquet dataset: {self.root / part.source}: columns {twin!r} and {field.name!r} "
                                     "are one name to the rules (compared without case; a name the tool owns gets the "
                                     "prefix source_): ambiguous metadata", hint="give every column of the file its own name")
                keep.append(field.name)
            try:
                table = file.read_row_groups(self._row_groups(file, part), columns=keep, use_threads=False)
            except (pa.ArrowException, OSError) as err:  # null metadata would hide an opt-out: stop instead
                raise InputError(f"parquet dataset: {self.root / part.source}: the metadata columns of rows "
                                 f"{part.start}-{part.stop - 1} cannot be read ({str(err).splitlines()[0][:120]})",
                                 hint="repair or rewrite the file") from None
            columns: dict[str, Any] = {"record_id": pa.array(ids, pa.string())}
            for name in keep:
                columns[rename_reserved(name)] = rule_column(table.column(name))
            return pa.table(columns)
        finally:
            self._close(file)

    def _image_bytes(self, value: object, row: int) -> bytes:
        if isinstance(value, dict):  # the Hugging Face struct: `path` is a name only, never opened
            value = value.get("bytes")
        if value is None:
            raise ImageDecodeError(f"row {row}: no image bytes (a `path` field is never opened)")
        if not isinstance(value, bytes):
            raise ImageDecodeError(f"row {row}: the image is not bytes")
        if len(value) > self.spec.max_file_bytes:
            raise ImageDecodeError(f"row {row}: {len(value)} bytes, above the budget dataset.max_file_bytes = "
                                   f"{self.spec.max_file_bytes}")
        return value

    def _pixels(self, value: object, relative: str, row: int) -> np.ndarray:
        data = self._image_bytes(value, row)
        return load_bytes(data, f"{relative} row {row}", self.spec.resolution, max_pixels=self.spec.max_pixels)

    def read_part(self, part: Part, record_ids: Sequence[str]) -> Iterator[Loaded]:
        if part.start == part.stop == 0:  # a file whose footer could not be read: its one record gives the reason
            try:
                self._close(self._open(part.source))
                reason = ImageDecodeError(f"{part.source}: the file could not be read when it was listed")
            except ImageDecodeError as err:
                reason = err
            for record_id in dict.fromkeys(record_ids):
                yield record_id, reason
            return
        wanted: dict[int, str] = {}
        for record_id in dict.fromkeys(record_ids):
            relative, _, number = record_id.rpartition("/")
            if relative == part.source and number.isdigit() and part.start <= int(number) < part.stop:
                wanted[int(number)] = record_id
            else:
                yield record_id, ImageDecodeError(f"{record_id}: not a row of {part.name}")
        if not wanted:
            return
        try:
            file = self._open(part.source)
        except ImageDecodeError as err:
            for record_id in wanted.values():
                yield record_id, err
            return
        row = part.start
        try:
            image = self._image_field(file, part)
            batches = file.iter_batches(batch_size=BATCH_ROWS, row_groups=self._row_groups(file, part),
                                        columns=[image.name], use_threads=False)
            for batch in batches:
                column = batch.column(0)
                for offset in range(batch.num_rows):
                    record_id = wanted.pop(row + offset, "")
                    if record_id:
                        try:
                            value = column[offset].as_py()
                            yield record_id, self._pixels(value, part.source, row + offset)
                        except ImageDecodeError as err:
                            yield record_id, err
                row += batch.num_rows
                if not wanted:
                    return
        except (pa.ArrowException, OSError) as err:
            reason = ImageDecodeError(f"{part.source}: cannot read rows from {row} on ({str(err).splitlines()[0][:120]})")
            for record_id in wanted.values():
                yield record_id, reason
            wanted.clear()
        finally:
            self._close(file)
        for record_id in wanted.values():
            yield record_id, ImageDecodeError(f"{record_id}: not in {part.source} (did it change since it was listed?)")
