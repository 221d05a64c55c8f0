"""CelebA as distributed: img_align_celeba/*.jpg plus the attribute, identity and partition lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .base import DatasetReader, check_reserved
from .transforms import load_square, to_chw

CROP = 140  # centre crop of the 178×218 aligned faces, then resize to the resolution
SPLIT_NAMES = {"0": "train", "1": "valid", "2": "test"}


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _pairs(path: Path) -> dict[str, str]:
    """`000001.jpg value` lines → {file: value}."""
    pairs = {}
    for number, fields in enumerate(_lines(path), start=1):
        if len(fields) != 2:
            raise InputError(f"{path}:{number}: expected '<file> <value>', got {' '.join(fields)!r}")
        pairs[fields[0]] = fields[1]
    return pairs


def _attributes(path: Path) -> tuple[list[str], list[str], list[pa.Array]]:
    """list_attr_celeba.txt: a count line, the attribute names, then `file ±1 ...` rows.

    Returns the attribute names, the files of the rows and one boolean column per attribute.
    """
    lines = _lines(path)
    if len(lines) < 2:
        raise InputError(f"{path}: expected a count line and a line of attribute names")
    names, rows = lines[1], lines[2:]
    for number, fields in enumerate(rows, start=3):
        if len(fields) != len(names) + 1 or not set(fields[1:]) <= {"1", "-1"}:
            raise InputError(f"{path}:{number}: expected a file name and {len(names)} values of 1 or -1")
    files, *values = zip(*rows) if rows else [(), *[()] * len(names)]
    return names, list(files), [pa.array([value == "1" for value in column], pa.bool_()) for column in values]


class CelebAReader(DatasetReader):
    format = "celeba"
    splits = ("train", "valid", "test", "all")

    def layout_hint(self) -> str:
        return ("expected img_align_celeba/, list_attr_celeba.txt, identity_CelebA.txt and "
                "list_eval_partition.txt under the root (set dataset.root or --data-root)")

    def metadata(self) -> pa.Table:
        self.require_root()
        if not (self.root / "img_align_celeba").is_dir():
            raise InputError(f"celeba dataset: missing {self.root / 'img_align_celeba'}/", hint=self.layout_hint())
        partitions = _pairs(self.require_file("list_eval_partition.txt"))
        identities = _pairs(self.require_file("identity_CelebA.txt"))
        names, attribute_files, attributes = _attributes(self.require_file("list_attr_celeba.txt"))
        check_reserved(names, str(self.root / "list_attr_celeba.txt"), own=("identity", "split"))
        files = sorted(f for f, p in partitions.items() if self.spec.split == "all" or SPLIT_NAMES.get(p) == self.spec.split)
        attribute_row = {f: row for row, f in enumerate(attribute_files)}
        rows = pa.array([attribute_row.get(f) for f in files], pa.int64())  # null for a file without attributes
        columns: dict[str, pa.Array] = {
            "record_id": pa.array(files, pa.string()),
            "identity": pa.array([_int_or_none(identities.get(f)) for f in files], pa.int64()),
            "split": pa.array([SPLIT_NAMES.get(partitions[f]) for f in files], pa.string()),
        }
        for name, values in zip(names, attributes):
            columns[name] = values.take(rows)
        return pa.table(columns).sort_by("record_id")

    def load(self, record_id: str) -> np.ndarray:
        return to_chw(load_square(self.root / "img_align_celeba" / record_id, self.spec.resolution, CROP))


def _int_or_none(value: str | None) -> int | None:
    return None if value is None else int(value)
