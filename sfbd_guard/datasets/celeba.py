"""CelebA as distributed: img_align_celeba/*.jpg plus the attribute, identity and partition lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .base import DatasetReader, PathEscapeError, check_reserved, safe_join
from .transforms import load_square, to_chw

CROP = 140  # centre crop of the 178×218 aligned faces, then resize to the resolution
SPLIT_NAMES = {"0": "train", "1": "valid", "2": "test"}


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def _pairs(path: Path, text: str) -> dict[str, str]:
    """`000001.jpg value` lines → {file: value}; a file listed twice is refused (which value holds would be a guess:
    an identity listed twice could hide an opt-out)."""
    pairs: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, fields in enumerate(_lines(text), start=1):
        if len(fields) != 2:
            raise InputError(f"{path}:{number}: expected '<file> <value>', got {' '.join(fields)!r}")
        if fields[0] in pairs:
            raise InputError(f"{path}:{number}: {fields[0]} is listed twice (also on line {first[fields[0]]})",
                             hint="keep one line per file")
        pairs[fields[0]] = fields[1]
        first[fields[0]] = number
    return pairs


def _attributes(path: Path, text: str) -> tuple[list[str], list[str], list[pa.Array[Any]]]:
    """list_attr_celeba.txt: a count line, the attribute names, then `file ±1 ...` rows.

    Returns the attribute names, the files of the rows and one boolean column per attribute.
    """
    lines = _lines(text)
    if len(lines) < 2:
        raise InputError(f"{path}: expected a count line and a line of attribute names")
    names, rows = lines[1], lines[2:]
    for number, fields in enumerate(rows, start=3):
        if len(fields) != len(names) + 1 or not set(fields[1:]) <= {"1", "-1"}:
            raise InputError(f"{path}:{number}: expected a file name and {len(names)} values of 1 or -1")
    files, *values = zip(*rows, strict=True) if rows else [(), *[()] * len(names)]
    return names, list(files), [pa.array([value == "1" for value in column], pa.bool_()) for column in values]


class CelebAReader(DatasetReader):
    format = "celeba"
    splits = ("train", "valid", "test", "all")

    def layout_hint(self) -> str:
        return ("expected img_align_celeba/, list_attr_celeba.txt, identity_CelebA.txt and "
                "list_eval_partition.txt under the root (set dataset.root or --data-root)")

    def _list(self, name: str) -> tuple[Path, str]:
        path = self.require_file(name)
        return path, _text(path, self.read_file(path))

    def metadata(self) -> pa.Table:
        self.require_root()
        try:
            images = safe_join(self.root, "img_align_celeba")
        except PathEscapeError as err:
            reason = str(err).removeprefix("img_align_celeba: ")
            raise InputError(f"celeba dataset: {self.root / 'img_align_celeba'}: {reason}",
                             hint="point dataset.root at the real CelebA folder") from None
        if not images.is_dir():
            raise InputError(f"celeba dataset: missing {self.root / 'img_align_celeba'}/", hint=self.layout_hint())
        partition_path, partition_text = self._list("list_eval_partition.txt")
        partitions = _pairs(partition_path, partition_text)
        odd = [f for f, p in partitions.items() if p not in SPLIT_NAMES]
        if odd:  # a null split: a held-out `split = 'test'` rule would not see the file, a named split would skip it
            raise InputError(f"{partition_path}: partition {partitions[odd[0]]!r} of {odd[0]} (and {len(odd) - 1} "
                             "other file(s)) is not 0, 1 or 2", hint="0 is train, 1 valid, 2 test")
        identity_path, identity_text = self._list("identity_CelebA.txt")
        identities = _pairs(identity_path, identity_text)
        unknown = [f for f in partitions if f not in identities]
        if unknown:  # a null identity would escape every opt-out by identity
            raise InputError(f"{identity_path}: no identity for {len(unknown)} file(s) of list_eval_partition.txt, "
                             f"e.g. {', '.join(unknown[:3])}", hint="list every image's identity")
        names, attribute_files, attributes = _attributes(*self._list("list_attr_celeba.txt"))
        check_reserved(names, str(self.root / "list_attr_celeba.txt"), own=("identity", "split"))
        files = sorted(f for f, p in partitions.items() if self.spec.split == "all" or SPLIT_NAMES.get(p) == self.spec.split)
        attribute_row = {f: row for row, f in enumerate(attribute_files)}
        if len(attribute_row) != len(attribute_files):
            twice = next(f for row, f in enumerate(attribute_files) if attribute_row[f] != row)
            raise InputError(f"{self.root / 'list_attr_celeba.txt'}: {twice} is listed twice",
                             hint="keep one line per file")
        missing = [f for f in files if f not in attribute_row]
        if missing:  # null attributes would escape every rule on them
            raise InputError(f"{self.root / 'list_attr_celeba.txt'}: no attributes for {len(missing)} file(s) of "
                             f"list_eval_partition.txt, e.g. {', '.join(missing[:3])}", hint="list every image's attributes")
        rows = pa.array([attribute_row[f] for f in files], pa.int64())
        columns: dict[str, pa.Array[Any]] = {
            "record_id": pa.array(files, pa.string()),
            "identity": pa.array([_int_or_none(identities.get(f), identity_path, f) for f in files], pa.int64()),
            "split": pa.array([SPLIT_NAMES.get(partitions[f]) for f in files], pa.string()),
        }
        for name, values in zip(names, attributes, strict=True):
            columns[name] = values.take(rows)
        return pa.table(columns).sort_by("record_id")

    def load(self, record_id: str) -> np.ndarray:
        """The record's pixels; a list entry that is absolute, has `..` or leads outside the root is an error row."""
        path = safe_join(self.root, "img_align_celeba", record_id)
        return to_chw(load_square(path, self.spec.resolution, CROP,
                                  max_pixels=self.spec.max_pixels, max_file_bytes=self.spec.max_file_bytes))


def _int_or_none(value: str | None, path: Path, file: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}: identity of {file} must be an integer, got {value!r}") from None
