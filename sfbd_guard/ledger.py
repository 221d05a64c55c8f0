"""The compliance ledger: one Parquet file per event, appended, never rewritten.

Layout: <ledger>/<kind>/<started>-<event_id>.parquet, readable with DuckDB as
read_parquet('<ledger>/**/*.parquet', union_by_name=true); the tool itself reads them through
`contracts.events.read_events` (typed, every file checked). The ledger directory is `--ledger`,
else $GUARD_LEDGER, else ./guard-ledger.

The ledger's parent folder is the project: artifact paths inside it are written relative to it
(locations.py), so a project copied or moved with its ledger still verifies; paths outside it stay absolute.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GuardError

DEFAULT_LEDGER = Path("guard-ledger")
ENV_VAR = "GUARD_LEDGER"


@dataclass(frozen=True)
class Artifact:
    """An input or output of an event: what it is, where it was (an absolute path, made relative to the project
    when the event is written; the `source` of a built-in dataset holds the format's name), and its fingerprint."""

    role: str
    path: str
    sha256: str | None


@dataclass
class EventDraft:
    """What a command fills in while it runs; written when the command ends, ok or failed."""

    kind: str
    command: list[str]
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    inputs: list[Artifact] = field(default_factory=list)
    outputs: list[Artifact] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # checked against contracts.events when written
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def ledger_dir(explicit: Path | None = None) -> Path:
    return explicit or Path(os.environ.get(ENV_VAR) or DEFAULT_LEDGER)


def event_schema() -> Any:
    import pyarrow as pa

    artifact = pa.struct([("role", pa.string()), ("path", pa.string()), ("sha256", pa.string())])
    fields: list[tuple[str, Any]] = [
        ("event_id", pa.string()), ("kind", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()), ("tool_version", pa.string()), ("command", pa.list_(pa.string())),
        ("inputs", pa.list_(artifact)), ("outputs", pa.list_(artifact)), ("summary", pa.string()),
    ]
    return pa.schema(fields)


def write_event(ledger: Path, draft: EventDraft, *, status: str, finished_at: datetime | None = None) -> Path:
    """Append one event to the ledger (atomic file write) and return its path.

    The only writer of events: the summary is checked against its kind's model in contracts/events.py (an `ok`
    event must have every key of it and no other; a failed one a subset, plus `error`), whose reader is
    `contracts.events.read_events`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .contracts.events import summary_json
    from .fileio import atomic_write_bytes
    from .locations import project_of, store

    finished_at = finished_at or datetime.now(UTC)
    project = project_of(ledger)

    def artifact(a: Artifact) -> dict[str, Any]:  # absolute paths inside the project become relative to it
        return {**vars(a), "path": store(a.path, project) if os.path.isabs(a.path) else a.path}

    row = {
        "event_id": draft.event_id, "kind": draft.kind, "started_at": draft.started_at, "finished_at": finished_at,
        "status": status, "tool_version": __version__, "command": draft.command,
        "inputs": [artifact(a) for a in draft.inputs], "outputs": [artifact(a) for a in draft.outputs],
        "summary": summary_json(draft.kind, status, draft.summary),
    }
    table = pa.Table.from_pylist([row], schema=event_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = ledger / draft.kind / f"{draft.started_at:%Y%m%dT%H%M%S}-{draft.event_id[:12]}.parquet"
    atomic_write_bytes(path, buffer.getvalue())
    return path


def one_line(err: BaseException) -> str:
    """An error's message on one line: a GuardError's own text, else `Type: first line`."""
    if isinstance(err, GuardError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def was_recorded(err: BaseException) -> bool:
    """Whether a `recorded` block (or `record_failure`) already wrote the event of this error."""
    return bool(getattr(err, "_guard_recorded", False))


def record_failure(ledger: Path, kind: str, command: list[str], err: BaseException,
                   draft: EventDraft | None = None) -> None:
    """Append the `failed` (or, for Ctrl-C, `interrupted`) event of `err`, once per error.

    Writing the event must not hide the error: if the ledger cannot be written for an error that is
    not a GuardError (a bug, MemoryError, Ctrl-C), the original error still propagates.
    """
    if was_recorded(err):
        return
    draft = draft or EventDraft(kind=kind, command=command)
    draft.summary["error"] = one_line(err)
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    with contextlib.suppress(AttributeError):  # exceptions accept attributes; a marker, not data
        err._guard_recorded = True  # type: ignore[attr-defined]
    if isinstance(err, GuardError):
        write_event(ledger, draft, status=status)
        return
    with contextlib.suppress(Exception):  # the original error matters more than a missing event
        write_event(ledger, draft, status=status)


@contextmanager
def recorded(ledger: Path, kind: str, command: list[str]) -> Iterator[EventDraft]:
    """Record the enclosed work as one event: status ok, or failed with the error's one-line message
    (any exception, not only a GuardError; Ctrl-C is recorded as `interrupted`). The error propagates."""
    draft = EventDraft(kind=kind, command=command)
    try:
        yield draft
    except BaseException as err:
        if not isinstance(err, (GeneratorExit, SystemExit)) or (isinstance(err, SystemExit) and err.code not in (0, None)):
            record_failure(ledger, kind, command, err, draft)
        raise
    write_event(ledger, draft, status="ok")
