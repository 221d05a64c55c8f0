"""Image folders laid out as the Hugging Face `imagefolder` builder expects: split folders, class folders,
metadata.jsonl per split; and the message for a `where` column the metadata lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from fixtures.synthetic import write_imagefolder
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.errors import ConfigError, InputError


def _images(root: Path, names: list[str]) -> Path:
    write_imagefolder(root, [], extra_images=names)
    (root / "metadata.csv").unlink(missing_ok=True)
    return root


def test_split_folders_give_splits_and_class_folders_give_labels(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", ["train/cat/a.png", "train/dog/b.png", "validation/cat/c.png", "test/dog/d.png",
                                    "test/cat/e.png"])
    everything = open_reader(SourceSpec("imagefolder", root, "all", 16)).metadata()
    assert everything.column("record_id").to_pylist() == ["test/cat/e.png", "test/dog/d.png", "train/cat/a.png",
                                                          "train/dog/b.png", "validation/cat/c.png"]
    assert everything.column("split").to_pylist() == ["test", "test", "train", "train", "validation"]
    assert everything.column("label").to_pylist() == ["cat", "dog", "cat", "dog", "cat"]
    train = open_reader(SourceSpec("imagefolder", root, "train", 16))
    table = train.metadata()
    assert table.column("record_id").to_pylist() == ["train/cat/a.png", "train/dog/b.png"]
    assert table.column("label").to_pylist() == ["cat", "dog"]
    assert train.load("train/dog/b.png").shape == (3, 16, 16)
    assert open_reader(SourceSpec("imagefolder", root, "test", 16)).metadata().num_rows == 2


def test_labels_only_when_every_image_sits_in_a_class_folder_and_metadata_wins(tmp_path: Path) -> None:
    flat = _images(tmp_path / "flat", ["cat/a.png", "b.png"])
    assert "label" not in open_reader(SourceSpec("imagefolder", flat, "all", 16)).metadata().column_names
    classes = _images(tmp_path / "classes", ["cat/a.png", "dog/b.png"])
    assert open_reader(SourceSpec("imagefolder", classes, "all", 16)).metadata().column("label").to_pylist() == ["cat", "dog"]
    (classes / "metadata.jsonl").write_text(json.dumps({"file_name": "cat/a.png", "label": 7}) + "\n")
    table = open_reader(SourceSpec("imagefolder", classes, "all", 16)).metadata()
    assert table.column("label").to_pylist() == [7, None] and "split" not in table.column_names


def test_metadata_jsonl_inside_split_folders_is_relative_to_them(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", ["train/a.png", "train/b.png", "test/c.png"])
    (root / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "opt_out": True}) + "\n" + json.dumps({"file_name": "b.png", "opt_out": False}) + "\n")
    (root / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "opt_out": False}) + "\n")
    table = open_reader(SourceSpec("imagefolder", root, "all", 16)).metadata()
    assert table.column("record_id").to_pylist() == ["test/c.png", "train/a.png", "train/b.png"]
    assert table.column("opt_out").to_pylist() == [False, True, False]
    train = open_reader(SourceSpec("imagefolder", root, "train", 16)).metadata()
    assert train.column("opt_out").to_pylist() == [True, False] and "label" not in train.column_names


def test_a_named_split_without_split_folders_says_so(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", ["a.png"])
    with pytest.raises(InputError, match=r"dataset\.split: 'train': .* has no train/, validation/ or test/ folder"):
        open_reader(SourceSpec("imagefolder", root, "train", 16)).metadata()
    with pytest.raises(InputError, match="not a split of format 'imagefolder'"):
        open_reader(SourceSpec("imagefolder", root, "valid", 16))


def test_a_where_on_a_missing_column_names_the_format(tmp_path: Path) -> None:
    from sfbd_guard.policy.model import Rule
    from sfbd_guard.policy.rules import decide

    metadata = pa.table({"record_id": ["a.png"], "license": ["CC0-1.0"]})
    rules = [Rule(name="opt-out", action="exclude", where="opt_out"), Rule(name="rest", action="protect")]
    with pytest.raises(ConfigError, match="column opt_out: not in the metadata of format imagefolder; columns are: "
                                          "record_id, license"):
        decide(metadata, rules, base_dir=tmp_path, source="p.yaml", format_name="imagefolder")
    with pytest.raises(ConfigError, match="column opt_out: not in the dataset's metadata"):
        decide(metadata, rules, base_dir=tmp_path, source="p.yaml")


def test_the_audit_holdout_reads_the_other_split_folders(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from helpers import write_policy
    from sfbd_guard.auditing.originals import holdout_from_splits, holdout_splits, iter_protected, read_prepared

    root = _images(tmp_path / "d", [f"train/{i}.png" for i in range(6)] + [f"test/{i}.png" for i in range(3)]
                   + ["validation/v.png"])
    rows = [{"file_name": f"{split}/{i}.png", "opt_out": split == "test" and i == 0}
            for split, count in (("train", 6), ("test", 3)) for i in range(count)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))  # one file, all splits
    policy = {"version": 1, "name": "folders", "dataset": {"format": "imagefolder", "root": str(root), "split": "train",
                                                           "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": "opt_out IS TRUE"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    assert result.code == 0, result.err
    info = read_prepared(tmp_path / "out")
    assert holdout_splits(info) == ["validation", "test"]
    holdout = holdout_from_splits(info, None, limit=10, seed=0)
    assert holdout is not None and holdout.pixels.shape == (3, 3, 8, 8)  # v.png, test/1.png, test/2.png
    assert holdout.dropped["excluded_by_policy"] == 1 and holdout.source == "split:validation,test"
    assert sum(len(chunk) for chunk in iter_protected(info, None, chunk=4)) == 6
