"""An image folder's metadata file (metadata.csv, metadata.jsonl or metadata.parquet), read row by row so that
no row is lost or changed on the way: every row is either read as it was written or listed with its line and why.

Each format is read by one parser whose row numbers are the file's own (Python's csv and json modules, or the
Parquet file's rows), so a message names the line a person would open:

- `file_name` is taken exactly as written (a string; never a number, list or null turned into text). A row whose
  `file_name` is missing, null, empty or not a string is *mistyped*: its other columns are kept (so a rule can
  still see that it opts something out), its name is not. A line that cannot be read at all (not JSON, not a JSON
  object, a CSV line with a different number of fields than the header, a Parquet `file_name` of another type) is
  *unreadable*: nothing of it is kept.
- metadata.jsonl: UTF-8 (a leading byte-order mark is dropped); lines end in LF, CRLF or CR, mixed (a raw CR or LF
  cannot occur inside a JSON string); blank lines are skipped. A column whose values are of one JSON type keeps it
  (integers and floats meet as floats); a column of mixed types is text, non-strings written as JSON.
- metadata.csv: UTF-8 (a leading byte-order mark is dropped), the header row names the columns, RFC 4180 quoting
  (a quoted field may hold commas, quotes and line ends; its row is named by the line it starts on), any line
  ends; blank lines are skipped. An empty field is null. A column is integer, else float, else boolean
  (true/false/1/0, any case) when every non-null value reads as one, else text.
- metadata.parquet: the file's own types; `file_name` must be a string column.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from ..errors import InputError
from .streamed import RepeatedKey, column_array, unique_keys

METADATA_NAMES = ("metadata.parquet", "metadata.jsonl", "metadata.csv")
NAME_COLUMN = "file_name"
LINE_ENDS = re.compile(r"\r\n|\r|\n")
MAX_COLUMNS = 1024  # distinct columns of one file (a hostile metadata.jsonl could add one per line)
CSV_TYPES = (pa.int64(), pa.float64(), pa.bool_())  # tried in this order on a column of CSV text


@dataclass(frozen=True)
class MetadataRows:
    """The rows of one metadata file, in file order.

    `names[i]` is row i's file_name as written, or None when the row is mistyped or unreadable (`problems[i]` says
    why); `lines[i]` is its line (csv, jsonl) or row (parquet), counted from 1; `unreadable[i]` is True when nothing
    of the row could be read. `table` holds every row's columns (`file_name` as text where it is one; null columns
    for an unreadable row).
    """

    path: str  # relative to the dataset root, as messages name it
    unit: Literal["line", "row"]
    names: list[str | None]
    lines: list[int]
    problems: list[str | None]
    unreadable: list[bool]
    table: pa.Table

    def where(self, index: int) -> str:
        return f"{self.path} {self.unit} {self.lines[index]}"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _name_problem(value: object, present: bool) -> str | None:
    """Why a file_name value is unusable, or None."""
    if not present:
        return f"no {NAME_COLUMN}"
    if value is None or value == "":
        return f"{NAME_COLUMN} is null or empty"
    if not isinstance(value, str):
        return f"{NAME_COLUMN} is {_kind(value)}, not a string"
    return None


def _text(data: bytes, label: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{label}: not UTF-8 text (line {line})", hint="save the metadata file as UTF-8") from None


def _check_columns(columns: list[str], label: str) -> None:
    if NAME_COLUMN not in columns:
        raise InputError(f"{label}: needs a {NAME_COLUMN} column (path of the image relative to its folder)")
    empty = [i + 1 for i, name in enumerate(columns) if not name.strip()]
    if empty:
        raise InputError(f"{label}: column {empty[0]} of the header has no name", hint="name every column")
    folded = [name.lower() for name in columns]
    repeated = sorted({name for name in columns if folded.count(name.lower()) > 1})
    if repeated:  # else one of them would silently win
        raise InputError(f"{label}: column(s) {', '.join(map(repr, repeated))} appear more than once (names are "
                         "compared without case)", hint="rename them in the dataset's metadata")


class _Builder:
    """Collects the rows column by column (a dict per row would take about twice the memory)."""

    def __init__(self, path: str, unit: Literal["line", "row"]) -> None:
        self.path, self.unit = path, unit
        self.names: list[str | None] = []
        self.lines: list[int] = []
        self.problems: list[str | None] = []
        self.unreadable: list[bool] = []
        self.columns: dict[str, list[object]] = {}
        self.count = 0

    def add(self, line: int, row: dict[str, object] | None, problem: str | None = None) -> None:
        """A row read (its problem, if its file_name is unusable) or, with `row` None, an unreadable line."""
        if row is not None and problem is None:
            problem = _name_problem(row.get(NAME_COLUMN), NAME_COLUMN in row)
        name = row.get(NAME_COLUMN) if row is not None and problem is None else None
        self.names.append(name if isinstance(name, str) else None)
        self.lines.append(line)
        self.problems.append(problem)
        self.unreadable.append(row is None)
        for key, value in (row or {}).items():
            column = self.columns.get(key)
            if column is None:
                if len(self.columns) >= MAX_COLUMNS:
                    raise InputError(f"{self.path} {self.unit} {line}: more than {MAX_COLUMNS} distinct columns",
                                     hint="metadata keys must be the same few columns for every row")
                column = self.columns[key] = [None] * self.count
            # a mistyped name is in the row's problem, never in a column of text
            column.append(value if key != NAME_COLUMN or isinstance(value, str) else None)
        self.count += 1
        if row is None or len(row) != len(self.columns):
            for column in self.columns.values():
                if len(column) < self.count:
                    column.append(None)

    def build(self, columns: list[str], typed: bool) -> MetadataRows:
        arrays: dict[str, pa.Array[Any]] = {}
        for name in columns:
            values = self.columns.get(name, [None] * self.count)
            arrays[name] = _typed_text(values) if typed and name != NAME_COLUMN else (
                pa.array(values, pa.string()) if name == NAME_COLUMN else column_array(values))
        table = pa.table(arrays) if arrays else pa.table({NAME_COLUMN: pa.array([], pa.string())})
        return MetadataRows(self.path, self.unit, self.names, self.lines, self.problems, self.unreadable, table)


def _typed_text(values: list[object]) -> pa.Array[Any]:
    """A CSV column: integer, float or boolean when every non-null value reads as one, else text."""
    import pyarrow.compute as pc

    text = pa.array(values, pa.string())
    if text.null_count == len(text):
        return text
    for kind in CSV_TYPES:
        try:
            return pc.cast(text, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return text


def read_jsonl(data: bytes, path: str) -> MetadataRows:
    """metadata.jsonl: one JSON object a line (see the module docstring)."""
    rows = _Builder(path, "line")
    columns: dict[str, None] = {}
    folded: set[str] = set()
    for number, line in enumerate(LINE_ENDS.split(_text(data, path)), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=unique_keys)
        except RepeatedKey as err:
            rows.add(number, None, f"key {err} appears twice in the object")
            continue
        except (ValueError, RecursionError):
            rows.add(number, None, "not valid JSON")
            continue
        if not isinstance(value, dict):
            rows.add(number, None, f"{_kind(value)}, not a JSON object")
            continue
        for key in value:
            if key not in columns:
                if key.lower() in folded:
                    raise InputError(f"{path} line {number}: key {key!r} differs from another key only in case",
                                     hint="rename it (column names are compared without case)")
                columns[key] = None
                folded.add(key.lower())
        rows.add(number, value)
    if not all(rows.unreadable) and NAME_COLUMN not in columns:
        raise InputError(f"{path}: needs a {NAME_COLUMN} key (path of the image relative to its folder)")
    return rows.build(list(columns) if NAME_COLUMN in columns else [NAME_COLUMN, *columns], typed=False)


def read_csv(data: bytes, path: str) -> MetadataRows:
    """metadata.csv: a header row, then one row per image (see the module docstring)."""
    handle = io.StringIO(_text(data, path), newline="")
    reader = csv.reader(handle, strict=True)
    rows = _Builder(path, "line")
    header: list[str] | None = None
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if header is None:
                raise InputError(f"{path} line {start}: the header cannot be read ({err})") from None
            rows.add(start, None, f"not a CSV row ({err})")  # the reader resumes at the next line
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not fields:
            continue
        if header is None:
            header = fields
            _check_columns(header, path)
            continue
        if len(fields) != len(header):
            rows.add(line, None, f"{len(fields)} field(s), the header has {len(header)}")
            continue
        rows.add(line, {name: (value if value != "" else None) for name, value in zip(header, fields, strict=True)})
    if header is None:
        raise InputError(f"{path}: empty (a header row with a {NAME_COLUMN} column is needed)")
    return rows.build(header, typed=True)


def read_parquet(path_on_disk: Path, path: str) -> MetadataRows:
    """metadata.parquet: the file's own column types (made readable by the rules' DuckDB: float16 as float32,
    decimal256 as text, dictionary columns decoded); `file_name` must be a string column."""
    import pyarrow.parquet as pq

    try:
        fields = pq.read_schema(path_on_disk).names
        _check_columns(fields, path)
        table = pq.read_table(path_on_disk)
    except FileNotFoundError:  # not "cannot read it as Parquet": there is no file to parse
        raise InputError(f"{path}: missing (no such file)") from None
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: cannot read it as Parquet ({str(err).splitlines()[0][:120]})") from None
    table = pa.table({name: _readable(table.column(name)) for name in table.column_names})
    column = table.column(NAME_COLUMN)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise InputError(f"{path}: column {NAME_COLUMN} is {column.type}, not a string column",
                         hint="write file_name as text")
    names = [v if isinstance(v, str) else None for v in column.to_pylist()]
    problems = [_name_problem(v, True) for v in names]
    table = table.set_column(table.column_names.index(NAME_COLUMN), NAME_COLUMN, pa.array(names, pa.string()))
    return MetadataRows(path, "row", [n if p is None else None for n, p in zip(names, problems, strict=True)],
                        list(range(1, table.num_rows + 1)), problems, [False] * table.num_rows, table)


def _readable(column: pa.ChunkedArray[Any]) -> pa.ChunkedArray[Any]:
    """A Parquet column in a type DuckDB can read (it refuses float16 and decimal256), with the same values."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _readable(column.cast(kind.value_type))
    if pa.types.is_float16(kind):
        return column.cast(pa.float32())
    if pa.types.is_decimal256(kind):
        return column.cast(pa.string())
    return column


def read_metadata(path_on_disk: Path, data: bytes | None, path: str) -> MetadataRows:
    """The rows of the metadata file `path` (relative to the root); `data` is its bytes (csv, jsonl)."""
    if path_on_disk.suffix == ".parquet":
        return read_parquet(path_on_disk, path)
    assert data is not None
    return read_jsonl(data, path) if path_on_disk.suffix == ".jsonl" else read_csv(data, path)


__all__ = ["METADATA_NAMES", "NAME_COLUMN", "MetadataRows", "read_metadata"]
