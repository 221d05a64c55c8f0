"""Attacks through metadata column names: a dataset's columns cannot shadow the tool's own columns.

Today's failure: an image folder whose metadata.csv has a `_guard_row` column (the rule evaluator's internal
row number) made the opt-out rule pick the wrong rows, and an opted-out record was prepared as `protected`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures.synthetic import write_celeba, write_imagefolder
from helpers import lineage, write_policy


def _imagefolder_policy(root: Path, out: Path) -> dict:
    return {
        "version": 1, "name": "shadow", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
        "rules": [{"name": "opt-out", "action": "exclude", "where": "opt_out"},
                  {"name": "rest", "action": "protect"}],
        "noise": {"sigma": 0.5}, "output": str(out),
    }


def _assert_clash(result, column: str, metadata_file: Path) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.err
    assert column in lines[0] and str(metadata_file) in lines[0], lines[0]
    assert "Traceback" not in result.err


def test_guard_row_column_cannot_move_an_opt_out_into_protected(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [{"file_name": "a.png", "opt_out": "true", "_guard_row": 1},
            {"file_name": "b.png", "opt_out": "false", "_guard_row": 0}]
    root = write_imagefolder(tmp_path / "images", rows)
    path = write_policy(tmp_path / "p.yaml", _imagefolder_policy(root, tmp_path / "out"))
    result = cli("prepare", "--policy", path)
    if result.code == 0:  # what the old code did: say which record ended where, for the failure message
        manifest = lineage(tmp_path / "out").to_pylist()  # the owner's full manifest (real ids of excluded records)
        pytest.fail(f"prepared with a shadowing _guard_row: {[(r['record_id'], r['partition']) for r in manifest]}")
    _assert_clash(result, "_guard_row", root / "metadata.csv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("column", ["_GUARD_ROW", "record_id", "partition", "Sigma", "canonical_sha256",
                                    "dup_cluster", "dup_of", "dup_kind", "dup_similarity", "dup_rule"])
def test_imagefolder_metadata_cannot_use_a_reserved_column(cli, tmp_path: Path, column: str) -> None:  # type: ignore[no-untyped-def]
    rows = [{"file_name": "a.png", "opt_out": "true", column: "x"},
            {"file_name": "b.png", "opt_out": "false", column: "y"}]
    root = write_imagefolder(tmp_path / "images", rows)
    path = write_policy(tmp_path / "p.yaml", _imagefolder_policy(root, tmp_path / "out"))
    _assert_clash(cli("prepare", "--policy", path), column, root / "metadata.csv")
    assert not (tmp_path / "out").exists()


def test_imagefolder_parquet_metadata_is_checked_too(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    root = write_imagefolder(tmp_path / "images", [{"file_name": "a.png"}, {"file_name": "b.png"}])
    (root / "metadata.csv").unlink()
    pq.write_table(pa.table({"file_name": ["a.png", "b.png"], "opt_out": [True, False], "_guard_row": [1, 0]}),
                   root / "metadata.parquet")
    path = write_policy(tmp_path / "p.yaml", _imagefolder_policy(root, tmp_path / "out"))
    _assert_clash(cli("prepare", "--policy", path), "_guard_row", root / "metadata.parquet")


@pytest.mark.parametrize("attribute", ["identity", "split", "record_id", "_guard_row", "partition"])
def test_celeba_attribute_cannot_shadow_the_readers_columns(cli, tmp_path: Path, attribute: str) -> None:  # type: ignore[no-untyped-def]
    root = write_celeba(tmp_path / "celeba", 8, identities=2)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    names[0] = attribute  # e.g. an attribute list whose first attribute is called `identity`
    lines[1] = " ".join(names)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    policy = {
        "version": 1, "name": "shadow", "dataset": {"format": "celeba", "root": str(root), "split": "all", "resolution": 8},
        "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.5, "by": "identity"}},
                  {"name": "rest", "action": "protect"}],
        "noise": {"sigma": 0.5}, "output": str(tmp_path / "out"),
    }
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    if result.code == 0:
        card = json.loads((tmp_path / "out" / "card.json").read_text())
        pytest.fail(f"prepared with an attribute named {attribute!r}: {card['counts']}")
    _assert_clash(result, attribute, root / "list_attr_celeba.txt")


def test_user_columns_that_shadow_nothing_still_work(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An image folder's own `identity` or `split` column shadows nothing (the reader has none) and groups."""
    rows = [{"file_name": f"{i}.png", "opt_out": "true" if i == 0 else "false", "identity": i // 2, "split": "x"}
            for i in range(6)]
    root = write_imagefolder(tmp_path / "images", rows)
    policy = _imagefolder_policy(root, tmp_path / "out")
    policy["rules"].insert(1, {"name": "licensed", "action": "clean", "sample": {"count": 1, "by": "identity"}})
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    assert result.code == 0, result.err
    manifest = lineage(tmp_path / "out").to_pylist()  # the owner's full manifest (real ids of excluded records)
    assert [r["partition"] for r in manifest if r["record_id"] == "0.png"] == ["excluded"]
