"""import.json of a folder of imported weights (`guard import-weights`): weights this tool did not train, brought in
to start runs from (`init`), with what the user declared about them. `write_import_record` is its only writer and
`read_import_record` its only reader."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..rundir import IMPORT_RECORD
from .base import Contract, read_contract, write_contract


class ImportRecord(Contract):
    weights_sha256: str = Field(min_length=64, max_length=64)  # of the folder's ema.safetensors
    licence: str = Field(min_length=1)  # SPDX expression, as declared
    source: str = Field(min_length=1)  # where the weights come from, as declared
    original: str  # the file they were imported from
    tensors: int = Field(ge=1)
    imported_at: str


def write_import_record(folder: Path, record: ImportRecord) -> None:
    write_contract(folder / IMPORT_RECORD, record)


def read_import_record(folder: Path) -> ImportRecord:
    return read_contract(ImportRecord, folder / IMPORT_RECORD,
                         hint="import.json is written by guard import-weights; import the weights again")
