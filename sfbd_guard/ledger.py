"""The compliance ledger: one Parquet file per event, appended, never rewritten.

Layout: <ledger>/<kind>/<started>-<event_id>.parquet, readable with DuckDB as
read_parquet('<ledger>/**/*.parquet', union_by_name=true); the tool itself reads them through
`contracts.events.read_events` (typed, every file checked). The ledger directory is `--ledger`,
else $GUARD_LEDGER, else ./guard-ledger.

The ledger's parent folder is the project: artifact paths inside it are written relative to it
(locations.py), so a project copied or moved with its ledger still verifies; paths outside it stay absolute.

The events form a hash chain (docs/ledger.md "Tamper evidence"): under the ledger's file lock (`.lock`), each
event gets the next `seq` and `prev_sha256`, the sha256 of the previous event file as written; `HEAD.json` then
names the new head (seq, sha256, file). With a signing key (`--sign-key`), the event names its signer (the
public key's sha256) and `signatures/<seq>.json` holds the Ed25519 signature of the head it appended. An
edited, removed, inserted or reordered event breaks the chain (compliance/tamper.py checks it).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import GuardError
from .hashing import sha256_bytes, sha256_file
from .locations import project_of, store
from .version import __version__

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
        ("seq", pa.int64()), ("prev_sha256", pa.string()), ("signer", pa.string()),
    ]
    return pa.schema(fields)


HEAD_FILE = "HEAD.json"
SMALL_FILE = 65536  # HEAD.json and a signature file are a few hundred bytes
LOCK_FILE = ".lock"
SIGNATURES = "signatures"


@dataclass(frozen=True)
class Head:
    """The newest event of the chain: its sequence number and the sha256 of its file (seq 0: no chained event)."""

    seq: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "sha256": self.sha256}


@contextmanager
def locked(ledger: Path) -> Iterator[None]:
    """The ledger's append lock (an exclusive flock on ledger/.lock): one writer at a time extends the chain."""

    ledger.mkdir(parents=True, exist_ok=True)
    fd = os.open(ledger / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _scan_head(ledger: Path) -> Head:
    """The chain's head found by reading every event file (HEAD.json missing or not matching its file)."""
    import pyarrow.parquet as pq


    best = Head(0, "")
    for path in ledger.glob("*/*.parquet"):
        try:
            seqs = pq.read_table(path, columns=["seq"]).column("seq").to_pylist()
        except Exception:  # noqa: BLE001 - a foreign or pre-chain file holds no head
            seqs = []
        for seq in seqs:
            if isinstance(seq, int) and seq > best.seq:
                best = Head(seq, sha256_file(path))
    return best


def current_head(ledger: Path) -> Head:
    """The ledger's head: HEAD.json when the file it names still has its sha256, else found by scanning."""

    from .fileio import read_regular

    try:  # a FIFO or a huge file in its place is not a head (read_regular: never waits on a FIFO)
        data = json.loads(read_regular(ledger / HEAD_FILE, SMALL_FILE)[:SMALL_FILE])
        head, where = Head(int(data["seq"]), str(data["sha256"])), ledger / str(data["file"])
        if where.is_relative_to(ledger) and ".." not in Path(data["file"]).parts and sha256_file(where) == head.sha256:
            return head
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _scan_head(ledger)


def sign_head(ledger: Path, head: Head, key: Any) -> None:
    """signatures/<seq>.json: the Ed25519 signature of "sfbd-guard-ledger-head:<seq>:<sha256>", with the public key."""

    from .fileio import atomic_write_bytes
    from .keys.signing import ALGORITHM, key_fingerprint, raw_public_key

    public = key.public_key()
    payload = {"algorithm": ALGORITHM, "seq": head.seq, "head": head.sha256, "public_key": raw_public_key(public).hex(),
               "public_key_sha256": key_fingerprint(public), "signature": key.sign(head_message(head)).hex()}
    atomic_write_bytes(ledger / SIGNATURES / f"{head.seq:08d}.json", (json.dumps(payload, indent=2) + "\n").encode())


def head_message(head: Head) -> bytes:
    return f"sfbd-guard-ledger-head:{head.seq}:{head.sha256}".encode()


def write_event(ledger: Path, draft: EventDraft, *, status: str, finished_at: datetime | None = None,
                sign_key: Any = None) -> Path:
    """Append one event to the ledger (atomic file write, under the ledger's lock, as the chain's next link) and
    return its path. `sign_key` (an Ed25519 private key, signing.load_private_key) signs the new head.

    The only writer of events: the summary is checked against its kind's model in contracts/events.py (an `ok`
    event must have every key of it and no other; a failed one a subset, plus `error`), whose reader is
    `contracts.events.read_events`."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .contracts.events import summary_json
    from .fileio import atomic_write_bytes
    from .keys.signing import key_fingerprint

    finished_at = finished_at or datetime.now(UTC)
    project = project_of(ledger)

    def artifact(a: Artifact) -> dict[str, Any]:  # absolute paths inside the project become relative to it
        return {**vars(a), "path": store(a.path, project) if os.path.isabs(a.path) else a.path}

    row = {
        "event_id": draft.event_id, "kind": draft.kind, "started_at": draft.started_at, "finished_at": finished_at,
        "status": status, "tool_version": __version__, "command": draft.command,
        "inputs": [artifact(a) for a in draft.inputs], "outputs": [artifact(a) for a in draft.outputs],
        "summary": summary_json(draft.kind, status, draft.summary),
        "signer": key_fingerprint(sign_key.public_key()) if sign_key is not None else None,
    }
    path = ledger / draft.kind / f"{draft.started_at:%Y%m%dT%H%M%S}-{draft.event_id[:12]}.parquet"
    with locked(ledger):
        head = current_head(ledger)
        row |= {"seq": head.seq + 1, "prev_sha256": head.sha256}
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([row], schema=event_schema()), buffer)
        data = buffer.getvalue()
        atomic_write_bytes(path, data)
        new = Head(head.seq + 1, sha256_bytes(data))
        atomic_write_bytes(ledger / HEAD_FILE, (json.dumps({**new.as_dict(), "file": path.relative_to(ledger).as_posix()},
                                                           indent=2) + "\n").encode())
        if sign_key is not None:
            sign_head(ledger, new, sign_key)
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
                   draft: EventDraft | None = None, sign_key: Any = None) -> None:
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
        write_event(ledger, draft, status=status, sign_key=sign_key)
        return
    with contextlib.suppress(Exception):  # the original error matters more than a missing event
        write_event(ledger, draft, status=status, sign_key=sign_key)


@contextmanager
def recorded(ledger: Path, kind: str, command: list[str], sign_key: Path | None = None) -> Iterator[EventDraft]:
    """Record the enclosed work as one event: status ok, or failed with the error's one-line message
    (any exception, not only a GuardError; Ctrl-C is recorded as `interrupted`). The error propagates.
    `sign_key` (a private key file, guard signkey create) signs the ledger head the event makes; it is read
    before the work starts, so a bad key file is an error before anything runs."""
    from .keys.signing import load_private_key

    key = load_private_key(sign_key) if sign_key is not None else None
    draft = EventDraft(kind=kind, command=command)
    try:
        yield draft
    except BaseException as err:
        if not isinstance(err, (GeneratorExit, SystemExit)) or (isinstance(err, SystemExit) and err.code not in (0, None)):
            record_failure(ledger, kind, command, err, draft, key)
        raise
    write_event(ledger, draft, status="ok", sign_key=key)
