"""tracker.json of a run directory with `tracker: mlflow`: the MLflow run that a resumed run (and guard run's audit
counts) log into. `write_tracker_record` is its only writer and `read_tracker_record` its only reader."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..rundir import TRACKER_RECORD
from .base import Contract, read_contract, write_contract


class TrackerRecord(Contract):
    kind: str = Field(min_length=1)  # mlflow
    uri: str = Field(min_length=1)  # mlflow.uri when the run was created; run-local for the default <run>/mlruns
    experiment_id: str = Field(min_length=1)
    run_id: str = Field(min_length=1)


def write_tracker_record(path: Path, record: TrackerRecord) -> None:
    write_contract(path, record)


def read_tracker_record(path: Path) -> TrackerRecord:
    return read_contract(TrackerRecord, path, hint=f"{TRACKER_RECORD} is written by guard train with tracker: mlflow; "
                                                   "remove it to start a new MLflow run")
