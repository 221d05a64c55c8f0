"""Dataset readers on fixtures written in each real layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.synthetic import CELEBA_ATTRIBUTES, write_imagefolder
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.errors import ImageDecodeError, InputError


def test_celeba_columns_splits_and_crop(celeba_root: Path) -> None:
    reader = open_reader(SourceSpec("celeba", celeba_root, "train", 64))
    table = reader.metadata()
    assert table.column_names[:3] == ["record_id", "identity", "split"]
    assert table.column_names[3:] == CELEBA_ATTRIBUTES and len(CELEBA_ATTRIBUTES) == 40
    assert table.num_rows == 32 and set(table.column("split").to_pylist()) == {"train"}
    assert str(table.schema.field("Eyeglasses").type) == "bool"
    assert table.column("record_id")[0].as_py() == "000001.jpg"
    pixels = reader.load("000001.jpg")
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8
    with Image.open(celeba_root / "img_align_celeba" / "000001.jpg") as original:
        expected = original.convert("RGB").crop((19, 39, 159, 179)).resize((64, 64), Image.Resampling.LANCZOS)
    error = pixels.astype(float) - np.asarray(expected, dtype=float).transpose(2, 0, 1)
    assert 10 * np.log10(255**2 / np.mean(error**2)) > 35, "DCT-scaled decoding stays close to a full-size decode"
    everything = open_reader(SourceSpec("celeba", celeba_root, "all", 64)).metadata()
    assert everything.num_rows == 40 and set(everything.column("split").to_pylist()) == {"train", "valid", "test"}


def test_load_square_crops_the_centre_and_resizes_exactly(tmp_path: Path) -> None:
    from sfbd_guard.datasets.transforms import load_square

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as original:
        expected = original.resize((32, 32), Image.Resampling.LANCZOS, box=(19, 39, 159, 179))
    assert np.array_equal(np.asarray(load_square(tmp_path / "x.png", 32, 140)), np.asarray(expected))
    widest = load_square(tmp_path / "x.png", 200)  # largest square (178), enlarged with bicubic
    assert widest.size == (200, 200)


def test_celeba_missing_list_file_is_an_input_error(tmp_path: Path, celeba_root: Path) -> None:
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(InputError, match=r"missing .*list_eval_partition\.txt"):
        open_reader(SourceSpec("celeba", tmp_path, "train", 64)).metadata()


def test_unknown_split_is_an_input_error(celeba_root: Path) -> None:
    with pytest.raises(InputError, match="'validation' is not a split of format 'celeba'"):
        open_reader(SourceSpec("celeba", celeba_root, "validation", 64))


def test_cifar10_records_labels_and_pixels(cifar_root: Path) -> None:
    reader = open_reader(SourceSpec("cifar10", cifar_root, "all", 32))
    table = reader.metadata()
    assert table.num_rows == 36
    assert table.column_names == ["record_id", "index", "label", "label_name", "split"]
    assert table.column("record_id").to_pylist()[:2] == ["test-00000", "test-00001"]
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_2", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    row = table.column("record_id").to_pylist().index("train-00007")  # 2nd image of data_batch_2
    assert table.column("label")[row].as_py() == batch[b"labels"][1]
    names = [n.decode() for n in pickle.loads((cifar_root / "cifar-10-batches-py" / "batches.meta").read_bytes())[b"label_names"]]
    assert table.column("label_name")[row].as_py() == names[batch[b"labels"][1]]
    assert np.array_equal(reader.load("train-00007"), batch[b"data"][1].reshape(3, 32, 32))


def test_cifar10_refuses_pickles_that_build_objects(tmp_path: Path, cifar_root: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for path in (cifar_root / "cifar-10-batches-py").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [Path("x")]}))
    with pytest.raises(InputError, match="refusing to load pathlib"):
        open_reader(SourceSpec("cifar10", tmp_path, "train", 32)).metadata()


def test_imagefolder_metadata_is_exposed_and_joined(tmp_path: Path) -> None:
    rows = [
        {"file_name": "a/one.png", "license": "CC0-1.0", "opt_out": "false", "creator": "ann"},
        {"file_name": "two.jpg", "license": "CC-BY-NC-4.0", "opt_out": "true", "creator": "bob"},
    ]
    root = write_imagefolder(tmp_path, rows, extra_images=["b/three.webp"])
    (root / "gone.png").write_bytes(b"")  # listed below but removed
    (root / "gone.png").unlink()
    with open(root / "metadata.csv", "a") as handle:
        handle.write("gone.png,CC0-1.0,false,cy\n")
    reader = open_reader(SourceSpec("imagefolder", root, "all", 24))
    table = reader.metadata()
    assert table.column("record_id").to_pylist() == ["a/one.png", "b/three.webp", "gone.png", "two.jpg"]
    assert {"license", "opt_out", "creator", "file_name"} <= set(table.column_names)
    assert table.column("license").to_pylist()[1] is None  # image without a metadata row
    assert reader.load("b/three.webp").shape == (3, 24, 24)
    with pytest.raises(ImageDecodeError, match="file not found"):
        reader.load("gone.png")


def test_imagefolder_reads_metadata_jsonl_like_csv(tmp_path: Path) -> None:
    """The Hugging Face image-folder convention: one JSON object a line, with file_name."""
    import json

    rows = [{"file_name": "a/one.png", "license": "CC0-1.0", "opt_out": False},
            {"file_name": "two.png", "license": "CC-BY-4.0", "opt_out": True}]
    csv_root = write_imagefolder(tmp_path / "csv", rows)
    json_root = write_imagefolder(tmp_path / "json", rows)
    (json_root / "metadata.csv").unlink()
    (json_root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_csv = open_reader(SourceSpec("imagefolder", csv_root, "all", 16))
    from_json = open_reader(SourceSpec("imagefolder", json_root, "all", 16))
    table = from_json.metadata()
    assert table.column("record_id").to_pylist() == ["a/one.png", "two.png"]
    assert table.column("license").to_pylist() == ["CC0-1.0", "CC-BY-4.0"] and table.column("opt_out").to_pylist() == [False, True]
    assert table.column_names == from_csv.metadata().column_names
    assert from_json.load("two.png").tobytes() == from_csv.load("two.png").tobytes()


def test_a_where_on_a_column_the_metadata_lacks_names_it_and_the_columns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from helpers import write_policy

    policy = {"version": 1, "name": "folder", "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": "opt_out"}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.6}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    assert result.code == 2 and "column opt_out: not in the metadata of format digits; columns are: record_id, index, label" in result.err


def test_imagefolder_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "images", [{"file_name": "x.png", "license": "CC0-1.0"}])
    write_imagefolder(tmp_path, [], extra_images=["secret.png"])  # a real image just outside the root
    (root / "metadata.csv").write_text("file_name,license\n../secret.png,CC0-1.0\n")
    reader = open_reader(SourceSpec("imagefolder", root, "all", 16))
    assert reader.metadata().column("record_id").to_pylist() == ["../secret.png", "x.png"]
    with pytest.raises(ImageDecodeError, match="escapes the dataset root"):  # an error row, never a read
        reader.load("../secret.png")


def test_digits_values_and_upsampling() -> None:
    from sklearn.datasets import load_digits

    reader = open_reader(SourceSpec("digits", None, "all", 8))
    table = reader.metadata()
    assert table.num_rows == 1797 and reader.channels == 1
    native = reader.load("digits-0005")
    assert native.shape == (1, 8, 8)
    assert np.array_equal(native[0], np.rint(load_digits().images[5] * 255 / 16).astype(np.uint8))
    big = open_reader(SourceSpec("digits", None, "all", 16)).load("digits-0005")
    assert big.shape == (1, 16, 16) and big.max() > 200
