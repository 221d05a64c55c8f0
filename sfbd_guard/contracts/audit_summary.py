"""summary.json of an audit report folder (built by auditing/summary.py): counts per verdict, the flagged share with
its interval, thresholds and how they were set, the embedder and index. `write_audit_summary` is its only writer
and `read_audit_summary` its only reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from ..rundir import AUDIT_SUMMARY
from .base import Contract, read_contract, write_contract
from .run_record import LedgerHead


class Share(Contract):
    count: int
    of: int
    fraction: float
    ci95: list[float]
    interval: str


class PreparedRef(Contract):
    path: str
    fingerprint: str
    format: str
    split: str
    resolution: int


class SummaryThresholds(Contract):
    copy_: float = Field(alias="copy")  # `copy` would shadow BaseModel.copy
    suspect: float
    ratio: float
    ratio_min_similarity: float | None = None  # the L2-ratio rule needs s1 >= this (absent in early summaries)
    ratio_min_quantile: float | None = None  # with a holdout: the quantile of its s1 that set it
    method: str
    note: str
    alpha_copy: float
    alpha_suspect: float
    # per rule, a bound on the false-positive rate on real unseen images that holds with `confidence` over the
    # draw of the holdout (calibration-conditional; auditing/calibrate.py); None = unknown (no holdout)
    expected_fpr: dict[str, float | None]
    expected_fpr_text: str
    # among the audited samples, if none copied anything: at most this many called copy / flagged with `confidence`
    predicted_false: dict[str, int] | None = None
    confidence: float | None = None  # 0.95 when calibrated (absent in early summaries, whose bounds were averages)
    holdout: dict[str, Any]


class EmbedderInfo(Contract):
    kind: str
    dim: int
    flip: bool


class IndexInfo(Contract):
    kind: str
    references: int
    dim: int


class AuditSummary(Contract):
    schema_version: int
    tool_version: str
    samples: str
    samples_fingerprint: str
    prepared: PreparedRef
    references: int
    counts: dict[str, int]
    flagged: Share
    copies: Share
    thresholds: SummaryThresholds
    embedder: EmbedderInfo
    index: IndexInfo
    l2: dict[str, int]
    similarity: dict[str, Any]
    background: dict[str, Any]
    warnings: list[str]
    top: list[dict[str, Any]]
    thumbnails: str
    timings: dict[str, float]
    config: dict[str, Any]
    skipped: dict[str, Any] | None = None  # files not audited and why (absent in early summaries)
    ledger_head: LedgerHead | None = None  # the ledger's head when the audit began (absent before the hash chain)

    @property
    def copy_count(self) -> int:
        return int(self.counts.get("copy", 0))


def read_audit_summary(report: Path) -> AuditSummary:
    """report/summary.json, checked; a missing or damaged summary is an InputError naming the file and key."""
    return read_contract(AuditSummary, report / AUDIT_SUMMARY,
                         hint="summary.json is written by guard audit; re-run the audit of these samples")


def write_audit_summary(report: Path, summary: AuditSummary) -> Path:
    path = report / AUDIT_SUMMARY
    write_contract(path, summary)
    return path
