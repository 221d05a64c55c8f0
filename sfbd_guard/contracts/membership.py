"""membership.json of a membership report folder (`guard membership`, auditing/model_audit.py): per group, the
membership test's AUC and TPR at 1 % FPR against the holdout with intervals, under the model and its control, and the
verdict. `write_membership_summary` is its only writer and `read_membership_summary` its only reader; every number
in it is recomputed from membership.parquet by `recompute` (auditing/model_audit.py), which guard verify runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..rundir import MEMBERSHIP_SUMMARY
from .base import Contract, read_contract, write_contract
from .run_record import LedgerHead


class ModelRef(Contract):
    run: str  # the run directory
    checkpoint: str  # the EMA weights file tested
    sha256: str
    method: str


class Result(Contract):
    auc: float
    auc_ci95: list[float]
    tpr_at_1pct_fpr: float
    tpr_ci95: list[float]


class GroupResult(Contract):
    group: Literal["clean", "protected"]
    images: int
    holdout_images: int
    model: Result
    control: Result | None  # the same test under the control model, if one was given
    difference_ci95: list[float] | None  # paired interval of AUC(model) - AUC(control)
    control_note: str  # which model the control is, or why there is none
    distinguishable: bool
    power: str  # in words: how small a memorisation the test can see


class MembershipSummary(Contract):
    version: Literal[1] = 1
    model: ModelRef
    control: ModelRef | None  # a model that never trained on the protected group (e.g. clean-only on the same data)
    prepared: str
    prepared_fingerprint: str
    holdout_source: str
    score: str
    sigmas: list[float]
    draws: int
    seed: int
    bootstrap: int
    margin: float
    max_images: int
    groups: list[GroupResult]
    verdict: Literal["PASS", "ATTENTION"]
    verdict_reason: str
    scores_sha256: str  # membership.parquet
    ledger_head: LedgerHead | None = None
    seconds: float


def write_membership_summary(report: Path, summary: MembershipSummary) -> Path:
    path = report / MEMBERSHIP_SUMMARY
    write_contract(path, summary)
    return path


def read_membership_summary(report: Path) -> MembershipSummary:
    return read_contract(MembershipSummary, report / MEMBERSHIP_SUMMARY)
