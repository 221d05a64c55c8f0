"""The records table of a prepare: every record's metadata, on disk and memory-mapped, with the dataset's parts.

A listed dataset's listing is read once here; a streamed dataset's parts are read by the workers, each part's
rows written to a file of its own as it arrives. The parts' columns are then unified (a column missing from a
part is null there; integers widen, integers and floats meet as float; types that do not meet become text, each
value Arrow's text of it: `true`, `1.5`, an ISO date) and written to one Arrow IPC file that is memory-mapped: the
policy's rules, the duplicate check and the manifest read it without holding it in this process's own memory.

A type conflict never turns a value into null: a value that does not convert exactly (an integer beyond 2**53
meeting floats, a uint64 beyond int64, bytes that are not UTF-8 meeting text) stops prepare naming the part and
the column. Text keeps typed rules working and failing closed: DuckDB reads `opt_out IS TRUE` over text by casting
it, so `true` and `yes` are true and a value it cannot read as a boolean (`[true]`, `opted out`) stops the rule
(exit 2). A rule that compares the column with text (`opt_out = 'yes'`) sees `true` for a boolean of another part:
write rules over mixed columns in the column's text (docs/policy.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..datasets import DatasetReader, Part, listing_parts
from ..datasets.base import check_reserved
from ..errors import InputError
from ..progress import ProgressFactory

# In the staging folder, removed before the prepared directory is published; named as temporaries (.<name>.tmp) so
# that the staging folder of a killed run is recognised and removed by the next one (output.clean_stale).
RECORDS_FILE = ".records.arrow.tmp"
PART_FILE = ".records-{:06d}.arrow.tmp"
BATCH_ROWS = 65536
MAX_COLUMNS = 1024  # metadata columns over all parts: a hostile shard's JSON could otherwise add one per record


@dataclass(frozen=True)
class Records:
    """The memory-mapped records table (record_id first) and the parts, with each part's first row in it."""

    table: pa.Table
    parts: list[Part]
    offsets: list[int]  # offsets[i]: row of part i's first record; offsets[-1] = number of records

    def rows(self, part: int) -> tuple[int, int]:
        return self.offsets[part], self.offsets[part + 1]


def _numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _common_type(name: str, current: pa.DataType, new: pa.DataType) -> pa.DataType:
    """The type a column keeps when parts disagree: nulls take the other's type, numbers widen, else string."""
    if current == new or pa.types.is_null(new):
        return current
    if pa.types.is_null(current):
        return new
    if _numeric(current) and _numeric(new):
        try:
            merged = pa.unify_schemas([pa.schema([pa.field(name, current)]), pa.schema([pa.field(name, new)])],
                                      promote_options="permissive")
            kind: pa.DataType = merged.field(name).type
            return kind
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return pa.float64()
    return pa.string()


class SchemaUnion:
    """Folds the parts' schemas into one, in order of first appearance, `record_id` first."""

    def __init__(self) -> None:
        self.types: dict[str, pa.DataType] = {"record_id": pa.string()}

    def add(self, schema: pa.Schema, where: str = "the dataset") -> None:
        for field in schema:
            if field.name != "record_id":
                current = self.types.get(field.name, pa.null())
                self.types[field.name] = _common_type(field.name, current, field.type)
        if len(self.types) > MAX_COLUMNS + 1:
            raise InputError(f"{where}: the metadata has more than {MAX_COLUMNS} distinct columns",
                             hint="metadata keys must be the same few columns for every record")

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(name, kind) for name, kind in self.types.items()])


def conform(table: pa.Table, schema: pa.Schema, where: str = "") -> pa.Table:
    """`table` with exactly `schema`'s columns and types (missing columns null)."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            try:
                columns.append(column if column.type == field.type else column.cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(f"{where}: metadata column {field.name!r} ({column.type}) cannot be read as "
                                 f"{field.type}, its type in other parts") from None
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


MAX_DECIMAL_DIGITS = 38  # DuckDB's widest decimal (and decimal128's)


def portable_type(kind: pa.DataType) -> pa.DataType:
    """`kind` with every part that DuckDB (the rules) cannot read replaced by one it can, losing no value:
    float16 → float32; a 256-bit decimal → decimal128 when its precision allows, else its exact text;
    a dictionary → its values' type; an extension type → its storage; lists, structs and maps part by part."""
    if pa.types.is_float16(kind):
        return pa.float32()
    if pa.types.is_decimal(kind) and (pa.types.is_decimal256(kind) or kind.precision > MAX_DECIMAL_DIGITS):
        return pa.decimal128(kind.precision, kind.scale) if kind.precision <= MAX_DECIMAL_DIGITS else pa.string()
    if pa.types.is_dictionary(kind):
        return portable_type(kind.value_type)
    if isinstance(kind, pa.BaseExtensionType):
        storage: pa.DataType = kind.storage_type
        return portable_type(storage)
    if pa.types.is_map(kind):
        mapped: pa.DataType = pa.map_(portable_type(kind.key_type), portable_type(kind.item_type))
        return mapped
    if pa.types.is_fixed_size_list(kind):
        fixed: pa.DataType = pa.list_(kind.value_field.with_type(portable_type(kind.value_type)), kind.list_size)
        return fixed
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(portable_type(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(portable_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(portable_type(field.type)) for field in kind])
    return kind


def _portable(table: pa.Table, where: str) -> pa.Table:
    """`table` with every column of a type DuckDB cannot read cast to `portable_type` (InputError naming the
    column if Arrow cannot cast it)."""
    for index, field in enumerate(table.schema):
        kind = portable_type(field.type)
        if kind == field.type:
            continue
        try:
            column: Any = table.column(index)
            if isinstance(field.type, pa.BaseExtensionType):  # Arrow casts an extension array only from its storage
                storage: Any = field.type.storage_type
                column = pa.chunked_array([chunk.storage for chunk in column.chunks], storage)
            table = table.set_column(index, field.with_type(kind), column.cast(kind))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise InputError(f"{where}: metadata column {field.name!r} has type {field.type}, which the rules cannot "
                             "read and which does not convert", hint="convert or drop the column") from None
    return table


def _check_part(table: pa.Table, part: Part, format_name: str) -> pa.Table:
    if not table.column_names or table.column_names[0] != "record_id":
        raise InputError(f"{format_name} reader: {part.name}: metadata must start with record_id")
    ids = table.column("record_id")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)) or ids.null_count:
        raise InputError(f"{format_name} dataset: {part.name}: record ids must be non-null strings")
    table = table if pa.types.is_string(ids.type) else table.set_column(0, "record_id", ids.cast(pa.string()))
    return _portable(table, f"{format_name} dataset: {part.name}")


def _write(path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for table in tables:
            for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                writer.write_batch(batch)


def _mapped(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _check_unique(table: pa.Table, format_name: str) -> None:
    """Record ids key the noise: two records with one id would get the same noise, which the difference of
    their noisy copies cancels. Refuse them."""
    import pyarrow.compute as pc

    ids = table.column("record_id")
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return
    seen: set[str] = set()
    repeated: list[str] = []
    for batch in ids.chunks:  # only on failure: find a few repeated ids to name
        for value in batch.to_pylist():
            if value in seen and len(repeated) < 3 and str(value) not in repeated:
                repeated.append(str(value))
            seen.add(str(value))
    raise InputError(f"{format_name} dataset: record id(s) {', '.join(map(repr, repeated))} occur more than once",
                     hint="every record needs its own id (file name, shard/key or file/row)")


PartReader = Callable[[list[Part]], Iterator[pa.Table]]  # the parts' metadata tables, in order


def collect(reader: DatasetReader, staging: Path, read_parts: PartReader,
            progress: ProgressFactory | None = None) -> Records:
    """Read every record's metadata into the staging folder's records file and map it (see the module docstring).

    `read_parts` runs `reader.part_metadata` over the parts (in worker processes, for a streamed reader)."""
    path = staging / RECORDS_FILE
    if reader.listed:
        listing = _check_part(reader.metadata(), Part(0, "the listing"), reader.format)
        parts = listing_parts(listing.num_rows)
        offsets = [p.start for p in parts] + [listing.num_rows]
        schema = listing.schema.remove_metadata()
        check_reserved(schema.names[1:], f"{reader.format} metadata")
        _write(path, schema, [listing.replace_schema_metadata(None)])
        del listing
    else:
        parts = reader.parts()
        union, offsets = SchemaUnion(), [0]
        tick = progress("reading metadata", len(parts)) if progress else None
        for part, table in zip(parts, read_parts(parts), strict=True):
            table = _check_part(table, part, reader.format)
            union.add(table.schema, f"{reader.format} dataset: {part.name}")
            _write(staging / PART_FILE.format(part.index), table.schema.remove_metadata(),
                   [table.replace_schema_metadata(None)])
            offsets.append(offsets[-1] + table.num_rows)
            if tick:
                tick(1)
        schema = union.schema
        check_reserved(schema.names[1:], f"{reader.format} metadata")

        def conformed() -> Iterator[pa.Table]:
            for part in parts:
                part_path = staging / PART_FILE.format(part.index)
                yield conform(_mapped(part_path), schema, f"{reader.format} dataset: {part.name}")
                part_path.unlink()

        _write(path, schema, conformed())
    table = _mapped(path)
    _check_unique(table, reader.format)
    return Records(table, parts, offsets)


def discard(staging: Path) -> None:
    """Remove the records file (mapped tables stay readable until released)."""
    (staging / RECORDS_FILE).unlink(missing_ok=True)


def slice_ids(records: Records, part: int) -> list[str]:
    start, stop = records.rows(part)
    return [str(v) for v in records.table.column("record_id").slice(start, stop - start).to_pylist()]


def metadata_slice(records: Records, part: int) -> pa.Table:
    start, stop = records.rows(part)
    return records.table.slice(start, stop - start)

