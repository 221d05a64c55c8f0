"""`guard report`: the ledger's views as tables (terminal, CSV, JSON, Parquet)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import atomic_write_bytes
from .views import connect, query

DEFAULT_QUERIES = {
    "datasets prepared": "SELECT started_at, status, policy, format, split, sigma, clean, protected, excluded, error, "
                         "left(fingerprint, 12) AS fingerprint FROM prepares ORDER BY started_at",
    "training runs": "SELECT started_at, status, name, method, left(data_fingerprint, 12) AS data, steps, kimg, "
                     "round(seconds, 1) AS seconds, epsilon, delta, noise_multiplier, sample_rate, private_steps, run "
                     "FROM trainings ORDER BY started_at",
    "audits": "SELECT started_at, status, samples, copy, suspect, novel, round(copy_threshold, 4) AS copy_threshold, "
              "round(suspect_threshold, 4) AS suspect_threshold, threshold_method FROM audits ORDER BY started_at",
}
FORMATS = ("table", "csv", "json", "parquet")


def report_tables(ledger: Path, sql: str | None) -> dict[str, Any]:
    """{title: Arrow table}: the three standard tables, or the result of `sql`."""
    con = connect(ledger)
    if sql:
        return {"query": query(con, sql)}
    return {title: query(con, q) for title, q in DEFAULT_QUERIES.items()}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_tables(tables: dict[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=200)  # pipes and files: no wrapping at 80
    for title, table in tables.items():
        shown = Table(*table.column_names, title=f"{title} ({table.num_rows})", title_justify="left")
        for row in table.to_pylist():
            shown.add_row(*(_cell(v) for v in row.values()))
        console.print(shown)


def serialise(tables: dict[str, Any], fmt: str) -> bytes:
    """CSV / JSON / Parquet bytes; several tables need JSON (one key per table)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "json":
        payload = {t: table.to_pylist() for t, table in tables.items()}
        return (json.dumps(payload if len(payload) > 1 else next(iter(payload.values())), indent=2, default=str) + "\n").encode()
    if len(tables) > 1:
        raise InputError(f"--format {fmt} writes one table", hint="add --sql 'SELECT ... FROM <view>' or use --format json")
    table = next(iter(tables.values()))
    buffer = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, buffer)
    else:
        pq.write_table(table, buffer)
    return buffer.getvalue()


def emit(tables: dict[str, Any], fmt: str, output: Path | None) -> None:
    """Print or write `tables` in `fmt` (Parquet needs --output)."""
    import sys

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "table" and output is None:
        print_tables(tables)
        return
    data = serialise(tables, "csv" if fmt == "table" else fmt)
    if output is not None:
        atomic_write_bytes(output, data)
    elif fmt == "parquet":
        raise InputError("--format parquet needs --output FILE")
    else:
        sys.stdout.write(data.decode())
