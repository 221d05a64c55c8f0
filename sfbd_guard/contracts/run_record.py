"""run.json, the run record: the prepared directory a training run began on (path, fingerprint, files) and its
image shape. Written once by `guard train` when a run starts (`write_run_record`); read by resume, sample,
verify and the datasheet through `read_run_record` only.

`data` is relative to the run directory (run.json's own folder) when the run and its prepared directory both
lie inside the project (the parent of the ledger `guard train` recorded into), else absolute (and absolute in
records written before; locations.py). Readers find the directory with `relocate.prepared_of_run`, which
falls back on the fingerprint when the path does not resolve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from ..errors import InputError
from ..rundir import RUN_RECORD
from .base import Contract, read_contract, write_contract

HINT = "run.json is written by guard train when the run starts; restore it from a backup of the run"

Dimension = Annotated[int, Field(gt=0, le=65536)]


class LedgerHead(Contract):
    """The ledger's head when a file was written (ledger.py `Head`): compliance/tamper.py checks the ledger still has it."""

    seq: int = Field(ge=0)
    sha256: str


class LineageLink(Contract):
    """One ancestor of a run's weights: the run it came from, or weights brought in by guard import-weights."""

    run: str  # the ancestor's run directory (absolute when recorded)
    weights: str  # the weights file the next generation started from
    weights_sha256: str
    data_fingerprint: str | None  # the prepared data the ancestor trained on (None: imported weights)
    method: str | None
    declared: dict[str, str] | None = None  # imported weights: what the user declared (licence, source), not verified


class RunRecord(Contract):
    data: str = Field(min_length=1)  # the prepared directory: relative to the run directory, or absolute
    data_fingerprint: str = Field(min_length=1)
    files: dict[str, str]  # relative path → sha256 of every array file, verified when the run started
    image_shape: list[Dimension] = Field(min_length=3, max_length=3)  # [channels, height, width]
    created_at: str
    threads: dict[str, Any] | None = None  # CPU threads and OpenMP wait policy the run started with (threads.py)
    ledger_head: LedgerHead | None = None  # the ledger's head when the run began (absent before the hash chain)
    lineage: list[LineageLink] = Field(default_factory=list)  # the weights it started from: parent first, then its own

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.image_shape
        return channels, height, width


def read_run_record(run_dir: Path) -> RunRecord:
    """run_dir/run.json, checked; a missing, corrupt or incomplete record is an InputError naming the key."""
    path = run_dir / RUN_RECORD
    if not path.exists():
        raise InputError(f"{path}: missing (not a run directory written by guard train)", hint=HINT)
    return read_contract(RunRecord, path, hint=HINT)


def write_run_record(run_dir: Path, record: RunRecord) -> None:
    write_contract(run_dir / RUN_RECORD, record)
