"""Fail closed where metadata meets images: an opt-out whose row names no image stops `guard prepare`.

An image folder joins its metadata file to the images by file_name (datasets/imagefolder.py). A row that names
no image (a typo, a name in another Unicode form than the file's, a file_name that is a number, a line that
cannot be read) leaves the image it meant without its metadata, and that image would be decided by the rules
that come after the opt-outs: clean or protected. So, whether or not --strict is given:

- a row naming no image that the `where` of an exclude rule matches stops the prepare, naming the rows;
- a row of which nothing could be read stops it when the policy has an exclude rule with a `where` (whether the
  row opted an image out cannot be known).

What remains is reported, not refused: images without a metadata row (null metadata) and rows naming no image
that no exclude rule matches (error rows in the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..datasets.base import ListingReport
from ..errors import InputError
from ..policy.model import Rule
from ..policy.rules import RuleEvaluator

SHOWN = 5  # rows named in a message


def _rows_of(ids: pa.ChunkedArray[Any], wanted: list[str]) -> np.ndarray:
    import pyarrow.compute as pc

    if not wanted:
        return np.zeros(0, np.int64)
    mask = pc.is_in(ids, value_set=pa.array(wanted, pa.string()))
    return np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))


def _named(items: list[str]) -> str:
    return "; ".join(items[:SHOWN]) + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def check_listing(report: ListingReport | None, metadata: pa.Table, rules: list[Rule], *, base_dir: Path,
                  source: str, format_name: str | None = None) -> None:
    """InputError (exit 2) when a row naming no image is, or may be, an opt-out (see the module docstring).

    An exclude rule "matches" a row when its `where` does, whatever its `sample` and the other rules decided (a
    sampled opt-out rule may leave the row to a later rule); an exclude rule without `where` (a sampled held-out
    set) says nothing of a row's content and is not counted."""
    if report is None or not report.rows_without_image:
        return
    excluding = [(index, rule) for index, rule in enumerate(rules) if rule.action == "exclude" and rule.where]
    if not excluding:
        return
    record_ids = metadata.column("record_id")
    orphans = _rows_of(record_ids, sorted(report.rows_without_image))
    evaluator = RuleEvaluator(metadata, rules, base_dir=base_dir, source=source, format_name=format_name)
    found: list[str] = []
    for index, rule in excluding:
        for row in np.intersect1d(orphans, evaluator.matching_rows(rule, index)).tolist():
            name = str(record_ids[row])
            found.append(f"{report.rows_without_image[name]} ({name!r}, rule {rule.name})")
    if found:
        raise InputError(f"{len(found)} metadata row(s) that an exclude rule matches name no image: {_named(found)}",
                         hint="fix their file_name (exact name, relative to the metadata file's folder); the image "
                              "they meant would otherwise be prepared without its opt-out")
    if report.unreadable_rows:
        unread = list(report.unreadable_rows.values())  # in file order
        raise InputError(f"{len(unread)} metadata row(s) cannot be read, so whether they opt an image out is unknown: "
                         f"{_named(unread)}", hint="fix these lines of the metadata file")
