"""A forged manifest (re-hashed into the card) whose file/row columns point where no shard row is: refused
with an error naming the record, never an IndexError or a read of another row (partitions are memory-mapped
through the manifest's file and row columns)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import digits_policy, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.errors import VerificationError
from sfbd_guard.fileio import atomic_write_json
from sfbd_guard.hashing import fingerprint, sha256_file
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trainmem-manifest")
    return prepare(load_policy(write_policy(tmp / "p.yaml", digits_policy(tmp / "out", drop=0.9)))).output


def _forge(prepared: Path, out: Path, column: str, value: object) -> Path:
    """A copy whose first protected row has `column` = `value`, the card re-hashed to match (a forger's copy)."""
    copy = Path(shutil.copytree(prepared, out))
    table = pq.read_table(copy / "manifest.parquet")
    partitions = table.column("partition").to_pylist()
    first = partitions.index("protected")
    values = table.column(column).to_pylist()
    if value == "<a clean file>":  # a shard of the other partition (whatever prepare names its shards)
        value = table.column("file").to_pylist()[partitions.index("clean")]
    values[first] = value
    table = table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, copy / "manifest.parquet")
    card = json.loads((copy / "card.json").read_text())
    card["manifest_sha256"] = sha256_file(copy / "manifest.parquet")
    card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    atomic_write_json(copy / "card.json", card)
    return copy


@pytest.mark.parametrize(("column", "value", "message"), [
    ("row", 10**6, r"points to row 1000000 of protected/.*\.npy, which holds \d+ rows"),
    ("row", -1, r"points to row -1 of protected/"),
    ("row", None, r"has no row in protected/"),
    ("file", None, r"points to None, not a recorded protected file"),
    ("file", "<a clean file>", r"points to 'clean/[^']+\.npy', not a recorded protected file"),
])
def test_a_manifest_row_outside_the_shards_is_refused(prepared: Path, tmp_path: Path, column: str, value: object,
                                                      message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        open_prepared(_forge(prepared, tmp_path / "forged", column, value))
