"""The reader interface: a metadata table for the selected split, and one decoded image per record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError

# Column names the tool owns; a name a dataset supplies (an image folder's metadata file, CelebA's attribute
# list) may not be one of them, compared without case as DuckDB compares names: the manifest's columns, the
# reader's `record_id`, the names a later duplicate finder will write, and every name starting with `_guard`
# (the rule evaluator's internal row number is `_guard_row`). A reader adds its own columns with `own`.
RESERVED_COLUMNS = ("record_id", "partition", "rule", "sha256", "sigma", "noise_seed", "file", "row", "error",
                    "dup_cluster", "dup_of", "dup_kind", "dup_similarity")
RESERVED_PREFIX = "_guard"


@dataclass(frozen=True)
class SourceSpec:
    """Everything a reader needs; small and picklable so worker processes can open their own reader."""

    format: str
    root: Path | None
    split: str
    resolution: int


class DatasetReader(ABC):
    """One on-disk dataset layout. Subclasses set `splits`, `channels` and `color`."""

    format: str = ""
    splits: tuple[str, ...] = ("all",)
    channels: int = 3
    color: str = "RGB"

    def __init__(self, spec: SourceSpec) -> None:
        if spec.split not in self.splits:
            raise InputError(
                f"dataset.split: {spec.split!r} is not a split of format {self.format!r}",
                hint=f"choose one of: {', '.join(self.splits)}",
            )
        self.spec = spec

    @property
    def root(self) -> Path:
        assert self.spec.root is not None
        return self.spec.root

    @abstractmethod
    def metadata(self) -> pa.Table:
        """One row per record of the selected split, sorted by `record_id` (first column)."""

    @abstractmethod
    def load(self, record_id: str) -> np.ndarray:
        """The record's transformed pixels, uint8 (C, H, W); raises ImageDecodeError if unreadable."""

    def require_file(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise InputError(f"{self.format} dataset: missing {path}", hint=self.layout_hint())
        return path

    def require_root(self) -> None:
        if not self.root.is_dir():
            raise InputError(f"{self.format} dataset: root {self.root} is not a directory", hint=self.layout_hint())

    def layout_hint(self) -> str:
        return "set dataset.root in the policy or pass --data-root"


def check_reserved(columns: list[str], source: str, own: tuple[str, ...] = ()) -> None:
    """InputError naming `source` if a column a dataset supplies clashes with the tool's or the reader's `own`
    columns, or with another of its columns (names are compared without case)."""
    reserved = {name.lower() for name in (*RESERVED_COLUMNS, *own)}
    clashes = [name for name in columns if name.lower() in reserved or name.lower().startswith(RESERVED_PREFIX)]
    if clashes:
        raise InputError(f"{source}: column(s) {', '.join(map(repr, clashes))} clash with the tool's own columns "
                         f"(reserved: {', '.join(sorted(reserved))}, {RESERVED_PREFIX}*)",
                         hint="rename them in the dataset's metadata")
    folded = [name.lower() for name in columns]
    repeated = sorted({name for name in columns if folded.count(name.lower()) > 1})
    if repeated:
        raise InputError(f"{source}: column(s) {', '.join(map(repr, repeated))} appear more than once "
                         "(names are compared without case)", hint="rename them in the dataset's metadata")
