"""Attacks on dedup (curation/dedup.py) and its evidence.

- The embeddings `guard prepare` computes for dedup are low-resolution copies of the originals, protected ones
  included: none may remain in the prepared directory, nor in a staging folder after a failed run.
- `guard verify`'s duplicates check reads the manifest: a manifest in which a clean row holds the pixels
  (sha256) of a protected or excluded one, or two protected rows hold one image, fails it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures.synthetic import write_imagefolder
from helpers import key_file, lineage, write_policy
from sfbd_guard.compliance.verify import check_duplicates
from sfbd_guard.curation import dedup
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared


def _prepare(tmp_path: Path, name: str = "out") -> Path:
    rows: list[dict[str, object]] = [{"file_name": f"{i:02d}.png", "kind": "open" if i % 2 else "closed"} for i in range(10)]
    root = write_imagefolder(tmp_path / "images", rows)
    (root / "90.png").write_bytes((root / "00.png").read_bytes())  # a protected image re-uploaded as clean
    (root / "91.png").write_bytes((root / "02.png").read_bytes())  # and as protected
    with open(root / "metadata.csv", "a") as handle:
        handle.write("90.png,open\n91.png,closed\n")
    policy = {"version": 1, "name": "leak", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "open", "action": "clean", "where": "kind = 'open'"}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "keys"))}, "output": str(tmp_path / name)}
    return prepare(load_policy(write_policy(tmp_path / f"{name}.yaml", policy))).output


def test_no_embedding_or_original_derived_array_remains_in_the_prepared_directory(tmp_path: Path) -> None:
    output = _prepare(tmp_path)
    names = sorted(p.relative_to(output).as_posix() for p in output.rglob("*"))
    card = open_prepared(output).card
    assert names == sorted(["card.json", "manifest.parquet", "clean", "protected", *card.files]), names
    for name in card.files:  # the only arrays: uint8 clean originals and float16 noisy copies, one per record row
        array = np.load(output / name)
        assert array.dtype == (np.uint8 if name.startswith("clean/") else np.float16) and array.ndim == 4
    schema = pq.read_schema(output / "manifest.parquet")
    assert not [f.name for f in schema if pq.read_table(output / "manifest.parquet", columns=[f.name]).column(0).type
                in ("list<item: float>", "binary", "large_binary")], "no vector column in the manifest"
    assert not list(tmp_path.glob(".out.partial-*")), "no staging folder (with its embeddings) is left behind"


def test_a_failed_dedup_leaves_no_embeddings_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dedup failed")

    monkeypatch.setattr(dedup, "find_plan", broken)
    with pytest.raises(RuntimeError):
        _prepare(tmp_path)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.rglob("*") if ".dedup" in p.name or "partial" in p.name]


def _rows(output: Path) -> list[dict[str, Any]]:
    """The owner's full manifest (record ids of excluded records too), its sha256 as the `digest` verify compares
    (equal images, equal digests, keyed or not)."""
    table = lineage(output)
    return table.rename_columns(["digest" if n == "sha256" else n for n in table.column_names]).to_pylist()


def test_verify_catches_a_clean_row_that_shares_a_sha256_with_a_protected_one(tmp_path: Path) -> None:
    output = _prepare(tmp_path)
    rows = _rows(output)
    card = open_prepared(output).card
    assert check_duplicates(card, rows).passed
    protected = next(r for r in rows if r["partition"] == "protected")
    forged = [dict(r) for r in rows]
    clean = next(r for r in forged if r["partition"] == "clean")
    clean["digest"] = protected["digest"]  # e.g. dedup skipped, or the manifest edited and the card re-hashed
    check = check_duplicates(card, forged)
    assert not check.passed and "exact copy of protected" in check.detail

    forged = [dict(r) for r in rows]
    duplicate = next(r for r in forged if r["record_id"] == "91.png")
    assert duplicate["partition"] == "excluded" and duplicate["rule"] == "duplicate"
    duplicate["partition"] = "protected"  # two noisy copies of one image: their noise averages down
    check = check_duplicates(card, forged)
    assert not check.passed and "same image" in check.detail

    forged = [dict(r) for r in rows]
    demoted = next(r for r in forged if r["record_id"] == "90.png")
    demoted["partition"] = "clean"  # the re-upload put back in training
    assert not check_duplicates(card, forged).passed

    forged = [dict(r) for r in rows]
    optout = next(r for r in forged if r["record_id"] == "90.png")
    optout["dup_rule"] = "no-such-rule"  # a demoted row whose own rule is unknown counts as excluded
    protected_source = next(r for r in forged if r["record_id"] == "00.png")
    assert protected_source["digest"] == optout["digest"]
    assert not check_duplicates(card, forged).passed
