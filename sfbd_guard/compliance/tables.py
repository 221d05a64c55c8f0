"""`guard report`: the ledger's views as tables (terminal, CSV, JSON, Parquet)."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import atomic_write_bytes, owner_only_dirs
from ..locations import project_of
from ..rundir import AUDIT_SUMMARY
from .views import connect, query

DEFAULT_QUERIES = {
    "datasets prepared": "SELECT started_at, status, policy, format, split, sigma, clean, protected, excluded, error, "
                         "left(fingerprint, 12) AS fingerprint FROM prepares ORDER BY started_at",
    "training runs": "SELECT started_at, status, name, method, left(data_fingerprint, 12) AS data, steps, kimg, "
                     "round(seconds, 1) AS seconds, epsilon, delta, noise_multiplier, sample_rate, private_steps, run "
                     "FROM trainings ORDER BY started_at",
    "audits": "SELECT started_at, status, samples, copy, suspect, novel, round(copy_threshold, 4) AS copy_threshold, "
              "round(suspect_threshold, 4) AS suspect_threshold, threshold_method, event_id FROM audits ORDER BY started_at",
    "membership tests": "SELECT started_at, status, verdict, method, round(protected_auc, 3) AS protected_auc, "
                        "round(clean_auc, 3) AS clean_auc, weights, event_id FROM memberships ORDER BY started_at",
}
FORMATS = ("table", "csv", "json", "parquet")
HEADERS = {"started_at": "started (UTC)", "copy_threshold": "copy ≥", "suspect_threshold": "suspect ≥",
           "threshold_method": "thresholds", "noise_multiplier": "noise mult.", "private_steps": "DP steps"}  # terminal only


def report_tables(ledger: Path, sql: str | None) -> dict[str, Any]:
    """{title: Arrow table}: the standard tables, or the result of `sql`."""
    from ..contracts.events import read_events

    events = read_events(ledger)
    con = connect(ledger, events)
    if sql:
        return {"query": query(con, sql)}
    tables = {title: query(con, q) for title, q in DEFAULT_QUERIES.items()}
    tables["audits"] = _audit_counts_from_files(tables["audits"], events, ledger)
    return tables


def _audit_counts_from_files(table: Any, events: list[Any], ledger: Path) -> Any:
    """The audits table with each finished audit's copy, suspect and novel counts taken from its summary.json and
    samples.parquet (the files whose sha256 the event holds), not from the event; `counts from` says which, or
    why the files do not back the event (guard verify names the event, the field and the file)."""
    import pyarrow as pa

    from .verify import audit_files

    by_id = {e.event_id: e for e in events}
    project = project_of(ledger)
    rows = []
    for row in table.to_pylist():
        event = by_id.get(row.pop("event_id"))
        source = None
        if event is not None and event.status == "ok":
            summary, _, problems = audit_files(event, project)
            if summary is not None:
                row |= {k: summary.counts.get(k, 0) for k in ("copy", "suspect", "novel")}
            source = AUDIT_SUMMARY if not problems else f"MISMATCH: {problems[0]}"
        rows.append({**row, "counts from": source})
    fields = [f for f in table.schema if f.name != "event_id"] + [pa.field("counts from", pa.string())]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def _cell(value: Any, project: Path | None = None) -> str:
    """A value for the terminal: floats to 6 digits, times to the minute, paths inside the project relative to it."""

    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if project is not None and isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path != project and path.is_relative_to(project):
            return str(path.relative_to(project))
    return str(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LONGEST_WORD = 40  # a column is never narrower than its longest word up to this (longer ones, paths, fold)


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (escape sequences, line breaks, bells) written as `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _word_width(texts: list[str]) -> int:
    """The width of the longest word (run of non-spaces) in `texts`, at most LONGEST_WORD."""
    from rich.cells import cell_len

    return min(LONGEST_WORD, max((cell_len(word) for text in texts for word in text.split()), default=1))


def _console() -> Any:
    """A terminal's own width; pipes and files get 200 columns (no wrapping at 80)."""

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def print_tables(tables: dict[str, Any], project: Path | None = None) -> None:
    """The tables on the terminal, narrowed to fit it: columns empty in every row are left out (DP columns of runs
    without DP), times shown to the minute, paths relative to the project (CSV, JSON and Parquet keep them all).
    Cells wrap between words only: no column is narrower than its longest word (header included)."""
    from rich import box
    from rich.table import Column, Table
    from rich.text import Text

    console = _console()
    for title, table in tables.items():
        rows = table.to_pylist()
        columns = [c for c in table.column_names if not rows or any(row[c] is not None for row in rows)]
        hidden = len(table.column_names) - len(columns)
        note = f", {hidden} empty column(s) hidden" if hidden else ""
        cells = [[printable(_cell(row[c], project)) for c in columns] for row in rows]
        heads = [Column(HEADERS.get(c, c), overflow="fold",
                        min_width=_word_width([HEADERS.get(c, c), *(r[i] for r in cells)]),
                        no_wrap=all(isinstance(r[c], (int, float)) or r[c] is None for r in rows))
                 for i, c in enumerate(columns)]  # numbers never wrap; times wrap at their space; words are never cut
        tight = sum(h.min_width or 1 for h in heads) + 2 * len(heads) > console.width  # then one space between columns
        shown = Table(*heads, title=f"{title} ({table.num_rows}{note})", title_justify="left", box=box.SIMPLE_HEAD,
                      padding=(0, 0 if tight else 1), collapse_padding=True, pad_edge=False)
        for row_cells in cells:
            shown.add_row(*map(Text, row_cells))  # text, never rich markup (ledger values are hostile)
        console.print(shown)


def print_checks(checks: list[Any]) -> None:
    """`guard verify` on a terminal: one row per check (status, check, what it checked and found), wrapped between
    words to the terminal's width."""
    from rich import box
    from rich.table import Column, Table
    from rich.text import Text

    shown = Table(Column("status", no_wrap=True), Column("check", min_width=_word_width([c.name for c in checks])),
                  Column("what was checked, and what was found", overflow="fold", ratio=1),
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, expand=True)
    styles = {"PASS": "green", "ATTENTION": "yellow", "FAIL": "bold red"}
    for check in checks:
        shown.add_row(Text(check.word, style=styles[check.word]), Text(printable(check.name)), Text(printable(check.detail)))
    _console().print(shown)


def checks_json(run_dir: Path, checks: list[Any]) -> str:
    """`guard verify --json`: the run, each check (name, status PASS/ATTENTION/FAIL, detail, evidence paths) and
    the totals."""
    words = [c.word for c in checks]
    document = {"run": str(run_dir), "checks": [{"name": c.name, "status": c.word, "detail": c.detail,
                                                 "evidence": [str(p) for p in c.evidence],
                                                 **({"items": list(c.items)} if c.items else {})} for c in checks],
                "passed": words.count("PASS"), "attention": words.count("ATTENTION"), "failed": words.count("FAIL")}
    return json.dumps(document, indent=2, ensure_ascii=False)


def _as_json_text(column: Any) -> Any:
    """A column's values as JSON text (nulls stay null): lists, structs and maps keep their structure."""
    import pyarrow as pa

    return pa.array([None if value is None else json.dumps(value, default=str, ensure_ascii=False)
                     for value in column.to_pylist()], pa.string())


def _writable(table: Any, fits: Any) -> Any:
    """`table` with each column whose type `fits(type)` refuses turned into JSON text (`_as_json_text`)."""
    import pyarrow as pa

    for index, field in enumerate(table.schema):
        if not fits(field.type):
            table = table.set_column(index, pa.field(field.name, pa.string()), _as_json_text(table.column(index)))
    return table


def _csv_fits(kind: Any) -> bool:
    """Whether CSV can hold a column of `kind` as it is: the types Arrow turns into text (lists, structs, maps,
    unions and intervals are not)."""
    import pyarrow as pa

    try:
        pa.array([], kind).cast(pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _parquet_fits(kind: Any) -> bool:
    """Whether Parquet can store a column of `kind` (unions and month-day-nano intervals, for instance, cannot)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.write_table(pa.table({"c": pa.array([], kind)}), io.BytesIO())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (anywhere in lists and dicts) replaced by None: JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def serialise(tables: dict[str, Any], fmt: str, label: str | None = None) -> bytes:
    """CSV / JSON / Parquet bytes; several tables need JSON (one key per table). A column CSV or Parquet cannot
    hold (a list, a struct, a map, a union, an interval) is written as JSON text; one that still cannot be written
    (binary that is not UTF-8, in CSV) is an InputError naming it, and the option given (`label`, default
    `--format <fmt>`). JSON is strict: NaN and ±infinity are written as null."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    label = label or f"--format {fmt}"
    if fmt == "json":
        payload = _finite({t: table.to_pylist() for t, table in tables.items()})
        document = payload if len(payload) > 1 else next(iter(payload.values()))
        return (json.dumps(document, indent=2, default=str, allow_nan=False) + "\n").encode()
    if len(tables) > 1:
        raise InputError(f"{label} writes one table", hint="add --sql 'SELECT ... FROM <view>' or use --format json")
    table = next(iter(tables.values()))
    def write(part: Any) -> bytes:
        buffer = io.BytesIO()
        (pacsv.write_csv if fmt == "csv" else pq.write_table)(part, buffer)
        return buffer.getvalue()

    table = _writable(table, _csv_fits if fmt == "csv" else _parquet_fits)
    failures = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
    try:
        return write(table)
    except failures as err:
        bad = []
        for name in table.column_names:
            try:
                write(table.select([name]))
            except failures:
                bad.append(name)
        raise InputError(f"{label}: column(s) {', '.join(map(repr, bad or table.column_names))} cannot be "
                         f"written as {fmt.upper()} ({str(err).splitlines()[0][:120]})",
                         hint="cast them in --sql (e.g. hex(column)), or use --format json") from None


def emit(tables: dict[str, Any], fmt: str, output: Path | None, project: Path | None = None) -> None:
    """Print or write `tables` in `fmt` (Parquet needs --out); printed paths are shortened against `project`."""

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "table" and output is None:
        print_tables(tables, project)
        return
    label = "--format table --out (written as CSV)" if fmt == "table" else None
    data = serialise(tables, "csv" if fmt == "table" else fmt, label)
    if output is not None:
        owner_only_dirs(output.parent)  # new folders are owner-only (the file is 0600)
        atomic_write_bytes(output, data)
    elif fmt == "parquet":
        raise InputError("--format parquet needs --out FILE")
    else:
        sys.stdout.write(data.decode())
