"""Ledger events: the envelope (ledger.py's Parquet schema) and one summary model per kind of event.

`ledger.write_event` is the only writer: an `ok` event's summary must validate against its kind's model (a
summary key the model does not declare is refused, so a renamed key fails where it is written); a `failed` or
`interrupted` event holds what the command had recorded before it stopped (every key optional) plus `error`.
`read_events` is the only reader: compliance/views.py builds the DuckDB `events` view from it, and compliance/verify.py
and prepared/reader.py (the provenance lookup) read the events through it.

Each summary model also declares the columns of its DuckDB view (`VIEW`, `COLUMNS`): compliance/views.py generates
the views' SQL from them, taking every JSON path and SQL type from the model's fields, so a column can only
name a field the model (and therefore the writer) has.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..errors import InputError
from ..locations import resolve
from ..prepared.card import Rerelease
from ..rundir import AUDIT_SUMMARY, MEMBERSHIP_SUMMARY
from .audit_summary import EmbedderInfo, Share
from .base import Contract, problem
from .run_record import LineageLink

STATUSES = ("ok", "failed", "interrupted")


# --- view columns --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SummaryColumn:
    """A view column read from the event's summary: `path` is a dotted path of the summary model's fields."""

    name: str
    path: str = ""

    @property
    def field_path(self) -> str:
        return self.path or self.name


@dataclass(frozen=True)
class ArtifactColumn:
    """A view column from the event's first `inputs`/`outputs` artifact with `role`: its sha256 or path."""

    name: str
    column: Literal["inputs", "outputs"]
    role: str
    attribute: Literal["sha256", "path"] = "sha256"


@dataclass(frozen=True)
class EnvelopeColumn:
    """A view column computed from the event's envelope (SQL over the `events` view's columns)."""

    name: str
    sql: str


Column = SummaryColumn | ArtifactColumn | EnvelopeColumn
STARTED = EnvelopeColumn("started_at", "started_at")
STATUS = EnvelopeColumn("status", "status")
EVENT_ID = EnvelopeColumn("event_id", "event_id")


# --- summaries -----------------------------------------------------------------------------------------------

class EventSummary(Contract):
    """Base of the per-kind summaries. `error` is set on failed and interrupted events only."""

    KIND: ClassVar[str] = ""
    VIEW: ClassVar[str | None] = None
    COLUMNS: ClassVar[tuple[Column, ...]] = ()

    error: str | None = None


class PrepareSummary(EventSummary):
    """curation/service.py `prepare_recorded`."""

    KIND = "prepare"
    VIEW = "prepares"
    COLUMNS = (STARTED, STATUS, SummaryColumn("policy", "policy_name"), SummaryColumn("format"), SummaryColumn("split"),
               SummaryColumn("resolution"),
               SummaryColumn("sigma"), SummaryColumn("clean", "counts.clean"), SummaryColumn("protected", "counts.protected"),
               SummaryColumn("excluded", "counts.excluded"), SummaryColumn("error", "counts.error"), SummaryColumn("rule_counts"),
               ArtifactColumn("prepared", "outputs", "prepared", "path"), ArtifactColumn("fingerprint", "outputs", "prepared"),
               ArtifactColumn("policy_sha256", "inputs", "policy"), EVENT_ID)

    policy_name: str
    format: str
    split: str
    sigma: float
    noise_key_id: str | None = None  # absent before the noise was keyed
    noise_key_source: str | None = None
    resolution: int
    counts: dict[str, int]
    rule_counts: dict[str, int]
    errors: int
    seconds: float
    signed_by: str | None = None  # prepared with --sign-key: the public key's sha256
    register_sha256: str | None = None  # the owner's release register after this prepare (curation/register.py)
    # guard prepare --set KEY=VALUE (absent without it, and before it existed); the card's `policy` has them applied
    policy_overrides: dict[str, Any] | None = None
    policy_resolved_sha256: str | None = None  # sha256 of the card's `policy` as sorted JSON (hashing.json_sha256)
    rerelease: Rerelease | None = None  # images released again with other noise (--allow-rerelease)


class NoiseCheck(Contract):
    images: int
    min_ratio: float
    median_ratio: float
    tau: float


class PrivacyInfo(Contract):
    """engine/privacy.py `summary`: the DP guarantee of a run (its other keys are kept as they are)."""

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None


class TrainSummary(EventSummary):
    """engine/service.py `train_recorded` (and `check_trusted`)."""

    KIND = "train"
    VIEW = "trainings"
    COLUMNS = (STARTED, STATUS, SummaryColumn("name"), SummaryColumn("method"),
               ArtifactColumn("data_fingerprint", "inputs", "prepared"),
               SummaryColumn("steps", "step"), SummaryColumn("kimg"), SummaryColumn("resumed"),
               EnvelopeColumn("seconds", "date_diff('millisecond', started_at, finished_at) / 1000.0"),
               SummaryColumn("epsilon", "privacy.epsilon"), SummaryColumn("delta", "privacy.delta"),
               SummaryColumn("noise_multiplier", "privacy.noise_multiplier"), SummaryColumn("sample_rate", "privacy.sample_rate"),
               SummaryColumn("private_steps", "privacy.steps"), ArtifactColumn("run", "outputs", "run", "path"),
               ArtifactColumn("ema_sha256", "outputs", "ema"), EVENT_ID)

    prepare_event: str | None = None  # the ledger's prepare event of the data (absent before provenance checks)
    verify_key_sha256: str | None = None
    unrecorded_data: bool | None = None
    noise_check: NoiseCheck | None = None
    method: str
    name: str
    resumed: bool
    step: int
    kimg: float
    seconds: float
    device: str
    world_size: int
    threads: dict[str, Any] | None = None  # CPU threads and OpenMP wait policy of this session (threads.py)
    privacy: PrivacyInfo | None = None  # DP-SGD runs only
    lineage: list[LineageLink] | None = None  # a run started from another's weights (init): parent first (run.json)


class SampleSummary(EventSummary):
    """engine/service.py `sample_recorded`."""

    KIND = "sample"
    VIEW = "samplings"
    COLUMNS = (STARTED, STATUS, SummaryColumn("count"), SummaryColumn("steps"), SummaryColumn("seed"),
               ArtifactColumn("weights", "inputs", "weights", "path"), ArtifactColumn("weights_sha256", "inputs", "weights"),
               ArtifactColumn("samples", "outputs", "samples", "path"), EVENT_ID)

    count: int
    seconds: float
    steps: int | None = None  # the options the caller passed
    seed: int | None = None
    batch: int | None = None


class AuditThresholds(Contract):
    copy_: float = Field(alias="copy")  # `copy` would shadow BaseModel.copy
    suspect: float
    ratio: float
    method: str
    expected_fpr: dict[str, float | None]


class AuditEventSummary(EventSummary):
    """auditing/service.py `audit_recorded`."""

    KIND = "audit"
    VIEW = "audits"
    COLUMNS = (STARTED, STATUS, ArtifactColumn("samples", "inputs", "samples", "path"), SummaryColumn("copy", "counts.copy"),
               SummaryColumn("suspect", "counts.suspect"), SummaryColumn("novel", "counts.novel"),
               SummaryColumn("copy_threshold", "thresholds.copy"), SummaryColumn("suspect_threshold", "thresholds.suspect"),
               SummaryColumn("threshold_method", "thresholds.method"), SummaryColumn("expected_fpr", "thresholds.expected_fpr"),
               SummaryColumn("embedder"), ArtifactColumn("data_fingerprint", "inputs", "prepared"),
               ArtifactColumn("summary_file", "outputs", AUDIT_SUMMARY, "path"), EVENT_ID)

    counts: dict[str, int]
    flagged: Share
    thresholds: AuditThresholds
    embedder: EmbedderInfo
    index: str
    references: int


class MembershipEventSummary(EventSummary):
    """auditing/model_audit.py `membership_recorded`: the membership test of a trained model (contracts/membership.py)."""

    KIND = "membership"
    VIEW = "memberships"
    COLUMNS = (STARTED, STATUS, SummaryColumn("verdict"), SummaryColumn("method"),
               SummaryColumn("protected_auc"), SummaryColumn("protected_auc_ci95"),
               SummaryColumn("clean_auc"), SummaryColumn("clean_auc_ci95"),
               ArtifactColumn("weights", "inputs", "weights", "path"), ArtifactColumn("weights_sha256", "inputs", "weights"),
               ArtifactColumn("data_fingerprint", "inputs", "prepared"),
               ArtifactColumn("summary_file", "outputs", MEMBERSHIP_SUMMARY, "path"), EVENT_ID)

    verdict: str
    method: str
    protected_auc: float
    protected_auc_ci95: list[float]
    clean_auc: float | None = None
    clean_auc_ci95: list[float] | None = None
    images: dict[str, int]
    sigmas: list[float]
    scores_sha256: str


class ImportSummary(EventSummary):
    """engine/lineage.py `import_weights` (guard import-weights): weights trained elsewhere, as declared."""

    KIND = "import"

    licence: str
    source: str
    tensors: int


class ExportSummary(EventSummary):
    """api.py `export` (guard export): a run's model written in a layout other tools load, and where it was pushed."""

    KIND = "export"

    format: str  # diffusers | sfbd_guard
    network: str
    licence: str
    files: int
    pushed: str | None = None  # the Hub commit's URL, when pushed


class RunSummary(EventSummary):
    """`guard run` records its stages' own events; a `run` event is only the failure of the command itself."""

    KIND = "run"


SUMMARIES: dict[str, type[EventSummary]] = {m.KIND: m for m in (PrepareSummary, TrainSummary, SampleSummary,
                                                                 AuditEventSummary, MembershipEventSummary, ImportSummary,
                                                                 ExportSummary, RunSummary)}


@functools.cache
def partial_model(model: type[EventSummary]) -> type[EventSummary]:
    """`model` with every key optional: the summary of a command that stopped before it had them all."""
    fields: dict[str, Any] = {name: (Optional[info.annotation], None) for name, info in model.model_fields.items()}  # noqa: UP045
    return create_model(f"Partial{model.__name__}", __base__=EventSummary, **fields)


def summary_model(kind: str, status: str) -> type[EventSummary]:
    model = SUMMARIES.get(kind)
    if model is None:
        raise KeyError(kind)
    return model if status == "ok" else partial_model(model)


def parse_summary(kind: str, status: str, text: str) -> EventSummary:
    """The summary JSON text of an event as its kind's model (numbers written as strings are accepted, as the
    views' casts accept them); raises ValidationError, or KeyError for an unknown kind."""
    return summary_model(kind, status).model_validate_json(text, strict=False)


# --- the envelope ----------------------------------------------------------------------------------------------

class EventArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: str
    path: str
    sha256: str | None


class Event(BaseModel):
    """One ledger event (one Parquet file: ledger.py `_schema`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    event_id: str
    kind: str
    started_at: datetime
    finished_at: datetime
    status: Literal["ok", "failed", "interrupted"]
    tool_version: str
    command: list[str]
    inputs: list[EventArtifact]
    outputs: list[EventArtifact]
    summary: EventSummary
    # the hash chain (ledger.py): absent (None) in events written before it existed
    seq: int | None = None
    prev_sha256: str | None = None
    signer: str | None = None  # sha256 of the Ed25519 public key that signed the head this event made
    file: str | None = Field(default=None, exclude=True)  # the event's file, as read (set by read_event_file)

    def artifacts(self, column: Literal["inputs", "outputs"], role: str) -> list[EventArtifact]:
        return [a for a in getattr(self, column) if a.role == role]

    def located(self, column: Literal["inputs", "outputs"], role: str, project: Path) -> list[Path | None]:
        """Where the artifacts with `role` are now: each path resolved against the project (the ledger's parent,
        locations.py); None for a relative path that leads outside it (never opened, never matched)."""

        return [resolve(a.path, project) for a in self.artifacts(column, role)]


def _event(row: dict[str, Any], source: str) -> Event:
    row = {**row, "file": source}
    text = row.get("summary")
    kind, status = row.get("kind"), row.get("status")
    for key, ok, expected in (("kind", isinstance(kind, str), "a string"), ("status", status in STATUSES, " | ".join(STATUSES)),
                              ("summary", isinstance(text, str), "a JSON string")):
        if not ok:
            why = "required key is missing" if key not in row else f"expected {expected} (got {str(row[key])[:60]!r})"
            raise InputError(f"{source}: {key}: {why}")
    assert isinstance(kind, str) and isinstance(text, str) and isinstance(status, str)
    try:
        summary = parse_summary(kind, status, text)
    except KeyError:
        raise InputError(f"{source}: kind: {kind[:40]!r} is not a kind of event ({', '.join(SUMMARIES)})") from None
    except ValidationError as err:
        raise InputError(f"{source}: summary.{problem(err.errors()[0])}") from None
    try:
        return Event.model_validate({**row, "summary": summary})
    except ValidationError as err:
        raise InputError(f"{source}: {problem(err.errors()[0])}") from None


def read_event_file(path: Path) -> list[Event]:
    """The events of one ledger file; a file that is not one is an InputError naming it (and the key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as err:
        text = str(err).strip().splitlines()
        raise InputError(f"{path}: not a ledger event file ({text[0] if text else type(err).__name__})") from None
    return [_event(row, str(path)) for row in rows]


def read_events(ledger: Path, kind: str | None = None, *, skip_invalid: bool = False) -> list[Event]:
    """Every event of `ledger` (only those of `kind`, from its folder), oldest first.

    A file that is not a valid event is an InputError naming the file and key, or, with `skip_invalid`
    (looking for evidence, such as the prepare event of a directory), left out: it proves nothing.
    """
    files = sorted((ledger / kind).glob("*.parquet") if kind else ledger.glob("**/*.parquet"))
    events: list[Event] = []
    for path in files:
        try:
            found = read_event_file(path)
        except InputError:
            if skip_invalid:
                continue
            raise
        events += [e for e in found if kind is None or e.kind == kind]
    return sorted(events, key=lambda e: e.started_at)


def summary_json(kind: str, status: str, summary: dict[str, Any] | EventSummary) -> str:
    """The summary column of a new event, checked against its kind's model (ledger.write_event)."""
    payload = summary.model_dump(mode="json", exclude_unset=True, by_alias=True) if isinstance(summary, BaseModel) else summary
    text = json.dumps(payload, sort_keys=True, default=str)
    model = summary_model(kind, status)
    try:
        parsed = model.model_validate_json(text, strict=False)
    except ValidationError as err:
        if status != "ok" and isinstance(payload.get("error"), str):  # never lose the event of a failure
            return json.dumps({"error": payload["error"]}, sort_keys=True)
        raise ValueError(f"ledger event {kind} ({status}): summary.{problem(err.errors()[0])}") from None
    if parsed.model_extra:
        if status != "ok" and isinstance(payload.get("error"), str):
            return json.dumps({"error": payload["error"]}, sort_keys=True)
        raise ValueError(f"ledger event {kind} ({status}): summary key(s) {sorted(parsed.model_extra)} are not "
                         f"fields of {model.__name__}")
    return text
