"""What the trainer learns from the prepared directory's manifest about the records it does not train on.

Before: manifest.parquet kept every excluded record's file name, licence, metadata and plain pixel sha256 (an
opt-out's `portraits/anna.png ... opt_out: true`), and every protected record's file name and caption. Now the
excluded records are opaque, metadata passes only through the policy's allow-list, and every pixel digest is
keyed with the owner's digest subkey; the full lineage stays in the owner's folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from helpers import lineage, write_image_set, write_policy


def _prepare(cli: Callable[..., Any], tmp_path: Path, **extra: Any) -> Path:
    root = write_image_set(tmp_path / "images", 24, formats=("imagefolder",))["imagefolder"]
    policy = {"version": 1, "name": "opt-outs", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "opted-out", "action": "exclude", "where": "opt_out"},
                        {"name": "free", "action": "clean", "where": "license = 'CC0-1.0'"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "prepared"), **extra}
    result = cli("prepare", "--policy", write_policy(tmp_path / "policy.yaml", policy))
    assert result.code == 0, result.err
    return tmp_path / "prepared"


def test_the_trainer_learns_nothing_about_excluded_records_but_counts(tmp_path: Path, cli: Callable[..., Any]) -> None:
    from sfbd_guard.datasets import SourceSpec, open_reader
    from sfbd_guard.hashing import pixel_sha256

    prepared = _prepare(cli, tmp_path)
    root = tmp_path / "images" / "imagefolder"
    source = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    excluded = [r for r in source if r["opt_out"]]
    reader = open_reader(SourceSpec("imagefolder", root, "all", 16))
    data = (prepared / "manifest.parquet").read_bytes()
    manifest = pq.read_table(prepared / "manifest.parquet")
    cells = [str(v) for column in manifest.columns for v in column.to_pylist() if v is not None]  # as read, decompressed
    for row in excluded:
        plain = pixel_sha256(reader.load(row["file_name"]))
        for secret in (row["file_name"], row["caption"], plain):
            assert str(secret).encode() not in data, f"the trainer's manifest holds {secret!r} of an excluded record"
            assert not any(str(secret) in cell for cell in cells), f"the trainer's manifest holds {secret!r}"
    assert set(manifest.column_names) & {"caption", "opt_out", "file_name", "key", "sha256", "license"} == set(), (
        "no metadata without the policy's allow-list")
    rows = manifest.to_pylist()
    hidden = [r for r in rows if r["partition"] == "excluded"]
    assert len(hidden) == len(excluded) and all(r["record_id"].startswith("excluded-") for r in hidden)
    card = json.loads((prepared / "card.json").read_text())
    assert card["counts"]["excluded"] == len(excluded) and card["rule_counts"]["opted-out"] == len(excluded)
    full = lineage(prepared).to_pylist()  # the owner keeps the full lineage
    assert sorted(r["record_id"] for r in full if r["partition"] == "excluded") == sorted(r["file_name"] for r in excluded)


def test_every_digest_is_keyed_and_only_the_digest_key_checks_it(tmp_path: Path, cli: Callable[..., Any],
                                                                 owner_config: Path) -> None:
    from sfbd_guard.compliance.verify import check_clean_rows
    from sfbd_guard.hashing import keyed_digest
    from sfbd_guard.keys.digests import read_digest_key

    prepared = _prepare(cli, tmp_path, manifest={"metadata": ["license"]})
    plain = {r["record_id"]: r["sha256"] for r in lineage(prepared).to_pylist()}
    rows = pq.read_table(prepared / "manifest.parquet").to_pylist()
    assert not {r["digest"] for r in rows} & set(plain.values()), "a plain pixel sha256 confirms a guessed image"
    assert all(r["license"] is None for r in rows if r["partition"] == "excluded"), "no metadata of excluded records"
    assert {r["license"] for r in rows if r["partition"] == "protected"} - {None}, "allow-listed columns reach the trainer"
    assert cli("key", "export-digest", tmp_path / "digest.key").code == 0
    key = read_digest_key(tmp_path / "digest.key")
    assert (tmp_path / "digest.key").stat().st_mode & 0o777 == 0o600
    for row in rows:
        if row["partition"] in ("clean", "protected"):
            assert row["digest"] == keyed_digest(key, plain[row["record_id"]])
    from sfbd_guard.keys.secret import read_key_file

    owner = read_key_file(owner_config / "sfbd_guard" / "owner.key")
    exported = (tmp_path / "digest.key").read_text()
    assert owner.secret.hex() not in exported and owner.noise_subkey.hex() not in exported, "the digest subkey only"
    assert key == owner.digest_subkey != owner.noise_subkey
    # guard verify's pixel check: ATTENTION without the key; with it, a clean row replaced by an opted-out image fails
    with_rows = [{**r} for r in rows]
    assert check_clean_rows(prepared, with_rows, keyed=True).attention
    assert check_clean_rows(prepared, with_rows, keyed=True, digest_key=key).passed
    clean = next(r for r in rows if r["partition"] == "clean")
    optout = next(r for r in lineage(prepared).to_pylist() if r["partition"] == "excluded")
    from sfbd_guard.datasets import SourceSpec, open_reader

    reader = open_reader(SourceSpec("imagefolder", prepared / json.loads((prepared / "card.json").read_text())["root"],
                                    "all", 16))
    shard = prepared / clean["file"]
    array = np.load(shard)
    array[clean["row"]] = reader.load(optout["record_id"])
    np.save(shard, array)
    check = check_clean_rows(prepared, with_rows, keyed=True, digest_key=key)
    assert not check.passed and "holds the pixels of excluded-" in check.detail
    assert check_clean_rows(prepared, with_rows, keyed=True, digest_key=bytes(32)).passed is False, "a wrong key fails"


def test_an_unreadable_image_tells_the_trainer_neither_its_name_nor_the_reason(tmp_path: Path,
                                                                              cli: Callable[..., Any]) -> None:
    """An image that fails to decode may be an opt-out or a protected image: its file name (in the record id and in
    the decoder's message) stays in the owner's lineage; the trainer sees an opaque id and a count."""
    root = write_image_set(tmp_path / "images", 24, formats=("imagefolder",))["imagefolder"]
    (root / "portraits").mkdir()
    (root / "portraits" / "anna-private.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    policy = {"version": 1, "name": "errors", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "opted-out", "action": "exclude", "where": "opt_out"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "prepared")}
    assert cli("prepare", "--policy", write_policy(tmp_path / "policy.yaml", policy)).code == 0
    prepared = tmp_path / "prepared"
    manifest = pq.read_table(prepared / "manifest.parquet")
    cells = [str(v) for column in manifest.columns for v in column.to_pylist() if v is not None]
    assert not any("anna" in cell for cell in cells) and b"anna" not in (prepared / "manifest.parquet").read_bytes()
    errors = [r for r in manifest.to_pylist() if r["partition"] == "error"]
    assert len(errors) == 1 and errors[0]["record_id"].startswith("error-") and "lineage" in errors[0]["error"]
    assert json.loads((prepared / "card.json").read_text())["counts"]["error"] == 1
    owner = [r for r in lineage(prepared).to_pylist() if r["partition"] == "error"]
    assert owner[0]["record_id"] == "portraits/anna-private.png" and owner[0]["error"], "the owner keeps the reason"
