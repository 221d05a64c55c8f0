"""export.json of an exported model (`guard export`): which run and weights it comes from, the sampler its weights
expect, and the sha256 of every other file of the folder. `write_export_record` is its only writer and
`read_export_record` its only reader."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..exporting.layout import RECORD
from .base import Contract, read_contract, write_contract


class ExportedFile(Contract):
    path: str  # relative to the export folder, one of exporting/layout.py's names
    sha256: str = Field(min_length=64, max_length=64)
    bytes: int = Field(ge=0)


class SamplerSettings(Contract):
    """EDM's deterministic sampler, as `guard sample` runs it (diffusers: EDMEulerScheduler with these values)."""

    sigma_min: float
    sigma_max: float
    rho: float
    sigma_data: float
    steps: int = Field(ge=1)  # guard sample's default (Heun: 2 × steps − 1 network evaluations)


class ExportRecord(Contract):
    format: Literal["diffusers", "sfbd_guard"]
    network: str  # the pipeline's `network`
    run: str  # the run directory's name (not its path: an export is published)
    method: str
    image_shape: list[int] = Field(min_length=3, max_length=3)  # (C, H, W); pixels in [-1, 1]
    weights_sha256: str = Field(min_length=64, max_length=64)  # the run's EMA weights file that was exported
    train_event: str  # the ledger's train event that recorded those weights
    data_fingerprint: str
    licence: str  # the model's licence (SPDX or "other"), as the owner set it
    sampler: SamplerSettings
    files: list[ExportedFile]  # every file of the folder but export.json
    exported_at: str


def write_export_record(folder: Path, record: ExportRecord) -> None:
    write_contract(folder / RECORD, record)


def read_export_record(folder: Path) -> ExportRecord:
    return read_contract(ExportRecord, folder / RECORD, hint="export.json is written by guard export; export the run again")
