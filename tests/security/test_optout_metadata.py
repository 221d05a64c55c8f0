"""Attacks on opt-outs through an image folder's metadata file (issue 22, part 1): an opt-out is never lost.

Before: a `file_name` that was a number made DuckDB read every name as quoted JSON, so no row met its image and
the opted-out image was stored as protected (exit 0, "opt-out exclude 1"); a metadata.jsonl beside a metadata.csv
silently replaced it; an opt-out row naming no image (a typo, another Unicode form of the name) became an error
row while the image it meant was prepared. Now a metadata problem either stops `guard prepare` (exit 2, naming the
file and line) or leaves every opted-out image excluded; see curation/listing.py and datasets/metadata_file.py.
The property test at the end checks that invariant on random metadata files against a reader written here.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import write_policy
from sfbd_guard.prepared import open_prepared

OPT_OUT = "coalesce(TRY_CAST(opt_out AS BOOLEAN), false)"  # the shipped policies/imagefolder.yaml rule


def _images(root: Path, names: list[str], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return root


def _policy(tmp_path: Path, root: Path, out: str = "out", where: str = "opt_out IS TRUE") -> Path:
    policy = {"version": 1, "name": "optout", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": where},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / out)}
    return write_policy(tmp_path / f"{out}.yaml", policy)


def _rows(out: Path) -> dict[str, dict]:
    return {row["record_id"]: row for row in pq.read_table(out / "manifest.parquet").to_pylist()}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


EIGHT = [f"{i:03d}.png" for i in range(8)]


@pytest.mark.parametrize("bad", [5, ["001.png"]], ids=["number", "list"])
def test_a_mistyped_file_name_does_not_unlist_the_other_opt_outs(cli, tmp_path: Path, bad: object) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    rows = [{"file_name": name, "opt_out": name == "002.png"} for name in EIGHT]
    rows[1]["file_name"] = bad
    (root / "metadata.jsonl").write_text(_jsonl(rows))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["002.png"]["partition"] == "excluded", "the opt-out row still meets its image"
    assert all(manifest[name]["file_name"] == name for name in EIGHT if name != "001.png"), "names are not quoted"
    bad_row = manifest["metadata.jsonl:2"]
    assert bad_row["partition"] == "error" and bad_row["error"].startswith("metadata.jsonl line 2: file_name is")
    assert manifest["001.png"]["partition"] == "protected" and manifest["001.png"]["opt_out"] is None
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["rule_counts"] == {"opt-out": 1, "rest": 7}
    assert card["listing"] == {"metadata_files": ["metadata.jsonl"], "metadata_rows": 8, "images_without_row": 1,
                               "rows_without_image": 1, "unreadable_rows": 0}
    assert "1 image(s) have no row in metadata.jsonl" in " ".join(result.out.split())


def test_a_mistyped_row_that_opts_out_stops_prepare(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    rows = [{"file_name": name, "opt_out": False} for name in EIGHT]
    rows[5] = {"file_name": 5, "opt_out": True}  # which image it meant cannot be known: it may be 005.png
    (root / "metadata.jsonl").write_text(_jsonl(rows))
    for strict in ((), ("--strict",)):
        result = cli("prepare", "--policy", _policy(tmp_path, root), *strict)
        assert result.code == 2 and "metadata row(s) that an exclude rule matches name no image" in result.err
        assert "metadata.jsonl line 6" in result.err and "Traceback" not in result.err
        assert not (tmp_path / "out").exists()


def test_metadata_jsonl_beside_metadata_csv_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    (root / "metadata.csv").write_text("file_name,opt_out\n" + "".join(
        f"{name},{str(name in ('001.png', '004.png', '006.png')).lower()}\n" for name in EIGHT))
    (root / "metadata.jsonl").write_text(_jsonl([{"file_name": "000.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 2 and "both metadata.csv and metadata.jsonl: keep one" in result.err
    assert not (tmp_path / "out").exists()
    (root / "metadata.jsonl").unlink()
    assert cli("prepare", "--policy", _policy(tmp_path, root)).code == 0
    assert [r for r, row in _rows(tmp_path / "out").items() if row["partition"] == "excluded"] == [
        "001.png", "004.png", "006.png"]


def test_a_root_metadata_file_and_split_folder_files_stay_allowed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", ["train/a.png", "train/b.png", "test/c.png"])
    (root / "metadata.csv").write_text("file_name,opt_out\ntest/c.png,true\n")
    (root / "train" / "metadata.jsonl").write_text(_jsonl([{"file_name": "a.png", "opt_out": True},
                                                           {"file_name": "b.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    partitions = {r: row["partition"] for r, row in _rows(tmp_path / "out").items()}
    assert partitions == {"test/c.png": "excluded", "train/a.png": "excluded", "train/b.png": "protected"}
    (root / "train" / "metadata.csv").write_text("file_name,opt_out\na.png,true\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root, "again"))
    assert result.code == 2 and "train: both metadata.csv and metadata.jsonl: keep one" in result.err


@pytest.mark.parametrize("written", ["missing.png", "Photo.png", "./photo.png", "photo.png ", "photo.PNG"])
def test_an_opt_out_row_naming_no_image_stops_prepare(cli, tmp_path: Path, written: str) -> None:  # type: ignore[no-untyped-def]
    """Case, `./` and trailing spaces are not folded: the row names no image, and it is an opt-out."""
    root = _images(tmp_path / "data", ["photo.png", "other.png"])
    (root / "metadata.csv").write_text(f'file_name,opt_out\nother.png,false\n"{written}",true\n')
    for strict in ((), ("--strict",)):
        result = cli("prepare", "--policy", _policy(tmp_path, root, where=OPT_OUT), *strict)
        assert result.code == 2, result.out
        assert "1 metadata row(s) that an exclude rule matches name no image: metadata.csv line 3" in result.err
        assert repr(written) in result.err and not (tmp_path / "out").exists()


def test_a_row_naming_no_image_that_no_exclude_rule_matches_is_an_error_row(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", ["photo.png"])
    (root / "metadata.csv").write_text("file_name,opt_out\nphoto.png,false\n./photo.png,false\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["photo.png"]["partition"] == "protected"
    assert manifest["./photo.png"]["partition"] == "error" and "no image has exactly this name" in manifest["./photo.png"]["error"]
    assert "1 metadata row(s) name no image" in " ".join(result.out.split())


@pytest.mark.parametrize("on_disk,written", [("NFD", "NFC"), ("NFC", "NFD")])
def test_names_are_compared_in_unicode_nfc(cli, tmp_path: Path, on_disk: str, written: str) -> None:  # type: ignore[no-untyped-def]
    name = "Beyoncé/Zoë.png"
    disk = unicodedata.normalize(on_disk, name)
    root = _images(tmp_path / "data", [disk, "other.png"])
    (root / "metadata.jsonl").write_text(_jsonl([{"file_name": unicodedata.normalize(written, name), "opt_out": True},
                                                 {"file_name": "other.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert set(manifest) == {disk, "other.png"}, "the row met the image, under the image's own name"
    assert manifest[disk]["partition"] == "excluded" and manifest["other.png"]["partition"] == "protected"


def test_an_unreadable_line_stops_prepare_when_the_policy_excludes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    lines = [json.dumps({"file_name": name, "opt_out": False}) for name in EIGHT]
    lines[3] = '{"file_name": "003.png", "opt_out": true'  # cut short: its opt-out cannot be read
    (root / "metadata.jsonl").write_text("\r\n".join(lines) + "\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 2 and "cannot be read" in result.err and "metadata.jsonl line 4: not valid JSON" in result.err
    no_exclude = {"version": 1, "name": "all", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
                  "rules": [{"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5},
                  "output": str(tmp_path / "plain")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "plain.yaml", no_exclude))
    assert result.code == 0, result.err
    assert _rows(tmp_path / "plain")["metadata.jsonl:4"]["error"] == "metadata.jsonl line 4: not valid JSON"


def test_the_summary_counts_records_actually_excluded(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An opted-out image that cannot be read is an error row, not an exclusion: the rule count says 0."""
    root = _images(tmp_path / "data", ["a.png", "b.png"])
    (root / "broken.png").write_bytes(b"not a png")
    (root / "metadata.csv").write_text("file_name,opt_out\na.png,false\nb.png,false\nbroken.png,true\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    assert _rows(tmp_path / "out")["broken.png"]["partition"] == "error"
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["rule_counts"] == {"rest": 2} and card["counts"]["excluded"] == 0
    assert "│ opt-out │ exclude │ 0       │" in result.out
    open_prepared(tmp_path / "out")  # the card's counts are those of the manifest (VerificationError otherwise)
