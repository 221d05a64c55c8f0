"""What the streamed readers (WebDataset shards, Parquet files) share: metadata columns and record lookup by part.

Metadata values a rule cannot read as they are still reach the rules, so that no column a rule could name is ever
dropped (a column dropped from one file and kept in another would leave that file's records null, and an opt-out
null is no opt-out). `rule_column` does it for both readers:

- a nested value (a list, struct or map; a JSON array or object) is its JSON text (`[true]`, `{"v": true}`; a
  map is a list of [key, value] pairs; bytes inside it are `"<N bytes>"`). A boolean rule (`opt_out IS TRUE`,
  `CAST(opt_out AS BOOLEAN)`) stops on such a value (DuckDB cannot read `[true]` as a boolean): exit 2, never a
  silent "no". A text longer than MAX_NESTED_TEXT characters (an embedding, a pixel array) is replaced by
  `<list: N characters of JSON, not kept>`: never a flag, and never copied whole into the manifest;
- binary values of at most MAX_BINARY bytes are kept as they are (DuckDB reads them as BLOB: `opt_out = 'yes'`
  compares bytes); a longer one (a second image, a mask, audio) becomes the bytes `<binary: N bytes, not kept>`,
  so no image is ever copied into the records table or the manifest;
- other types Arrow and DuckDB cannot share (durations, intervals, unions) are their text.

A column whose values differ in type within one part is text (`column_array`: non-strings as JSON); between parts,
curation/records.py unifies the types the same way (numbers widen, other mixes become text, never null).
"""

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


MAX_BINARY = 64  # bytes of a binary metadata value kept as they are (a flag, a hash, a UUID; never an image)
MAX_NESTED_TEXT = 16384  # characters of a nested value's JSON text kept (a tag list fits; an embedding may not)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)  # dates, times, decimals, durations inside a nested value


def nested_text(value: object) -> str:
    """A nested value (list, dict, list of map pairs) as its JSON text, or a marker when the text is too long."""
    text = json.dumps(value, ensure_ascii=False, default=_json_default)
    if len(text) > MAX_NESTED_TEXT:
        kind = "object" if isinstance(value, dict) else "list"
        return f"<{kind}: {len(text)} characters of JSON, not kept>"
    return text


def _unwrapped(column: Any) -> Any:
    """The column without dictionary encoding or extension type (its values, its storage)."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _unwrapped(column.cast(kind.value_type))
    if isinstance(kind, pa.BaseExtensionType):
        chunks: list[Any] = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        storage: Any = kind.storage_type
        return _unwrapped(pa.chunked_array([chunk.storage for chunk in chunks], storage))
    return column


SCALAR_CHECKS = (pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_string,
                 pa.types.is_large_string, pa.types.is_decimal, pa.types.is_date, pa.types.is_timestamp,
                 pa.types.is_time)
BINARY_CHECKS = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary, pa.types.is_binary_view)


def rule_column(column: Any) -> Any:
    """A metadata column as the rules see it (see the module docstring): scalars as they are, nested values as
    JSON text, short binary values as they are and long ones as a marker, anything else as text."""
    column = _unwrapped(column)
    kind = column.type
    if any(check(kind) for check in SCALAR_CHECKS):
        return column
    values = column.to_pylist()
    if any(check(kind) for check in BINARY_CHECKS):
        return pa.array([v if v is None or len(v) <= MAX_BINARY else f"<binary: {len(v)} bytes, not kept>".encode()
                         for v in values], pa.binary())
    if pa.types.is_string_view(kind):
        return pa.array(values, pa.string())
    if pa.types.is_nested(kind):
        return pa.array([None if v is None else nested_text(v) for v in values], pa.string())
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def column_array(values: list[object]) -> pa.Array[Any]:
    """One metadata column's values as an Arrow array; values of mixed types become strings (JSON for non-strings)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def as_text(column: Any) -> Any:
    """A column's values as text, as a column of mixed types is: Arrow's text of a scalar (`true`, `1.5`, an ISO
    date), JSON of a nested value; null stays null."""
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else nested_text(v) if isinstance(v, list | dict)
                         else json.dumps(v, default=_json_default) for v in column.to_pylist()], pa.string())


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
            table = table.set_column(table.column_names.index(name), name, as_text(table.column(name)))
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
