"""DuckDB views over the ledger: events, prepares, trainings, samplings, audits, memberships.

`events` holds every event as `contracts.events.read_events` read and checked it (a file that is not a valid
event is an input error naming it), with its artifact paths resolved against the project (the ledger's parent,
locations.py): where the files are now, wherever the project was copied or moved. A relative path leading
outside the project is left as written (relative: it matches no run and is never opened), and so is the `source`
artifact (a dataset root, or the name of a built-in dataset). The other views are generated from the event summary models: each
model's `COLUMNS` name the summary fields (dotted paths) a view shows, and their JSON paths and SQL types
come from the model's fields, so a column can only read a key the writer (which validates against the same
model) writes; a renamed field fails where the views are built, never turns into NULL.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..contracts.events import SUMMARIES, ArtifactColumn, EnvelopeColumn, Event, EventSummary, SummaryColumn
from ..errors import InputError
from ..ledger import event_schema
from ..locations import project_of, resolve

_SQL_TYPES = {str: "VARCHAR", int: "BIGINT", float: "DOUBLE", bool: "BOOLEAN"}


def _unwrap(annotation: Any) -> Any:
    """`X | None` → X (the views show None as NULL)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def field_type(model: type[BaseModel], path: str) -> tuple[str, Any]:
    """The JSON path ('$.a.b', by the fields' aliases) and the Python type of the dotted field `path` of `model`;
    KeyError if `model` has no such field."""
    current: Any = model
    keys = []
    for part in path.split("."):
        if isinstance(current, type) and issubclass(current, BaseModel):
            found = [(name, info) for name, info in current.model_fields.items() if (info.alias or name) == part]
            if not found:
                raise KeyError(f"{model.__name__} has no field {path!r} ({part!r} is not a field of {current.__name__})")
            keys.append(part)
            current = _unwrap(found[0][1].annotation)
        elif typing.get_origin(current) is dict:
            keys.append(part)
            current = _unwrap(typing.get_args(current)[1])
        else:
            raise KeyError(f"{model.__name__} has no field {path!r} ({part!r} is inside a {current})")
    return "$." + ".".join(keys), current


def _column_sql(model: type[EventSummary], column: SummaryColumn | ArtifactColumn | EnvelopeColumn) -> str:
    if isinstance(column, EnvelopeColumn):
        sql = column.sql
    elif isinstance(column, ArtifactColumn):
        sql = f"list_filter({column.column}, lambda a: a.role = '{column.role}')[1].{column.attribute}"
    else:
        json_path, kind = field_type(model, column.field_path)
        sql_type = _SQL_TYPES.get(kind)
        sql = (f"TRY_CAST(json_extract_string(summary, '{json_path}') AS {sql_type})" if sql_type
               else f"json_extract(summary, '{json_path}')")  # a mapping, a list or a model: its JSON
    return sql if sql == column.name else f"{sql} AS {column.name}"


def view_sql(model: type[EventSummary]) -> str:
    """The SELECT of `model`'s view (generated from its `COLUMNS` and fields)."""
    columns = ",\n       ".join(_column_sql(model, c) for c in model.COLUMNS)
    return f"SELECT {columns}\nFROM events WHERE kind = '{model.KIND}'"


def generate_views(models: dict[str, type[EventSummary]] | None = None) -> dict[str, str]:
    """{view name: SELECT} for every event model that declares a view."""
    return {m.VIEW: view_sql(m) for m in (models or SUMMARIES).values() if m.VIEW}


VIEWS = generate_views()
VIEW_NAMES = ("events", *VIEWS)

# Audits of a run's samples: the samples folder is inside the run directory, or was drawn from its weights.
# Bind the run directory twice.
RUN_AUDITS = ("(samples LIKE ? || '/%' OR samples IN (SELECT samples FROM samplings WHERE weights LIKE ? || '/%'))")


def events_table(events: list[Event], project: Path | None = None) -> Any:
    """The events as an Arrow table in the ledger's Parquet schema (the summary as its JSON text); with `project`,
    artifact paths resolved against it (see the module's docstring)."""
    import pyarrow as pa


    def located(artifact: dict[str, Any]) -> dict[str, Any]:
        where = resolve(artifact["path"], project) if project is not None and artifact["role"] != "source" else None
        return {**artifact, "path": str(where)} if where is not None else artifact

    rows = []
    for event in events:
        row = event.model_dump(exclude={"summary"})
        rows.append({**row, "inputs": [located(a) for a in row["inputs"]], "outputs": [located(a) for a in row["outputs"]],
                     "summary": _summary_text(event)})
    return pa.Table.from_pylist(rows, schema=event_schema())


def _summary_text(event: Event) -> str:

    return json.dumps(event.summary.model_dump(mode="json", exclude_unset=True, by_alias=True), sort_keys=True)


def connect(ledger: Path, events: list[Event] | None = None, *,
            models: dict[str, type[EventSummary]] | None = None) -> Any:
    """A DuckDB connection with the ledger's views over `events` (default: all of the ledger's, read and checked);
    an empty or missing ledger is an input error."""
    import duckdb

    from ..contracts.events import read_events

    if not any(ledger.glob("**/*.parquet")):
        raise InputError(f"ledger {ledger} holds no events yet", hint="run guard prepare first, or pass --ledger DIR")
    table = events_table(read_events(ledger) if events is None else events, project_of(ledger))
    con = duckdb.connect()
    con.register("ledger_events", table)
    con.execute("CREATE VIEW events AS SELECT * REPLACE (started_at::TIMESTAMP AS started_at, "  # UTC, naive
                "finished_at::TIMESTAMP AS finished_at) FROM ledger_events")
    for name, query in (VIEWS if models is None else generate_views(models)).items():
        con.execute(f"CREATE VIEW {name} AS {query}")
    return con


def query(con: Any, sql: str) -> Any:
    """Run `sql` over the views; returns an Arrow table. Bad SQL is an input error."""
    import duckdb

    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as err:
        raise InputError(f"--sql: {str(err).splitlines()[0]}", hint=f"views: {', '.join(VIEW_NAMES)}") from None
