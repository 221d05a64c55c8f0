"""What the streamed readers (WebDataset shards, Parquet files) share: metadata columns and record lookup by part."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError
from .base import RESERVED_COLUMNS, RESERVED_PREFIX, DatasetReader, Loaded, Part, SourceSpec

SOURCE_PREFIX = "source_"  # a dataset column named like one of the tool's own gets this prefix (sha256 → source_sha256)


def rename_reserved(name: str) -> str:
    """`name`, or `source_<name>` when it clashes (without case) with a column the tool owns."""
    folded = name.lower()
    if folded in {n.lower() for n in RESERVED_COLUMNS} or folded.startswith(RESERVED_PREFIX):
        return SOURCE_PREFIX + name
    return name


class RepeatedKey(ValueError):
    """A JSON object giving one key twice: json.loads would silently keep the last value (which one holds?)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook that refuses a key given twice (RepeatedKey, a ValueError, naming it)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise RepeatedKey(repr(key[:60]))
        value[key] = item
    return value


def column_array(values: list[object]) -> pa.Array[Any]:
    """One metadata column's values as an Arrow array; values of mixed types become strings (JSON for non-strings)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def rows_table(record_ids: list[str], rows: list[dict[str, object]]) -> pa.Table:
    """A part's metadata table: `record_id` first, then the rows' columns in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns: dict[str, pa.Array[Any]] = {"record_id": pa.array(record_ids, pa.string())}
    for name in names:
        columns[name] = column_array([row.get(name) for row in rows])
    return pa.table(columns)


def concat_parts(tables: list[pa.Table]) -> pa.Table:
    """Parts' metadata tables as one: missing columns are null, a column whose type differs between parts is text."""
    if not tables:
        return pa.table({"record_id": pa.array([], pa.string())})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    kinds: dict[str, set[pa.DataType]] = {}
    for table in tables:
        for field in table.schema:
            if not pa.types.is_null(field.type):
                kinds.setdefault(field.name, set()).add(field.type)
    mixed = {name for name, found in kinds.items() if len(found) > 1}
    fixed = []
    for table in tables:
        for name in mixed & set(table.column_names):
            values = table.column(name).to_pylist()
            text = [None if v is None else v if isinstance(v, str) else str(v) for v in values]
            table = table.set_column(table.column_names.index(name), name, pa.array(text, pa.string()))
        fixed.append(table)
    return pa.concat_tables(fixed, promote_options="permissive")


class StreamedReader(DatasetReader):
    """A layout whose metadata lives beside the images (listed = False): parts come from names or footers."""

    listed = False

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._parts: list[Part] | None = None  # computed on first use, in the process that uses them

    @abstractmethod
    def list_parts(self) -> list[Part]:
        """The parts, from file names or footers only."""

    @abstractmethod
    def part_of(self, record_id: str, parts: list[Part]) -> Part | None:
        """The part a record id names (None if none)."""

    def parts(self) -> list[Part]:
        if self._parts is None:
            self._parts = self.list_parts()
        return self._parts

    def metadata(self) -> pa.Table:
        return concat_parts([self.part_metadata(part) for part in self.parts()])

    def load(self, record_id: str) -> np.ndarray:
        for _, result in self.load_many([record_id]):
            if isinstance(result, ImageDecodeError):
                raise result
            return result
        raise ImageDecodeError(f"{record_id}: not found")  # pragma: no cover (load_many yields every id)

    def load_many(self, record_ids: Sequence[str]) -> Iterator[Loaded]:
        parts = self.parts()
        grouped: dict[int, list[str]] = {}
        for record_id in dict.fromkeys(record_ids):
            part = self.part_of(record_id, parts)
            if part is None:
                yield record_id, ImageDecodeError(f"{record_id}: no such record in the {self.format} dataset {self.root}")
            else:
                grouped.setdefault(part.index, []).append(record_id)
        for index, ids in sorted(grouped.items()):
            yield from self.read_part(parts[index], ids)
