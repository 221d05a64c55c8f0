"""The streamed readers: WebDataset tar shards and Parquet files, read part by part like guard prepare reads them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import write_image_set
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.datasets.base import DatasetReader
from sfbd_guard.errors import ImageDecodeError, InputError
from sfbd_guard.hashing import pixel_sha256


def _png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read_all(reader: DatasetReader) -> tuple[pa.Table, dict[str, np.ndarray | ImageDecodeError]]:
    """Every record, read the way guard prepare reads a streamed dataset: parts, part_metadata, read_part."""
    tables, results = [], {}
    for part in reader.parts():
        table = reader.part_metadata(part)
        tables.append(table)
        ids = table.column("record_id").to_pylist()
        loaded = list(reader.read_part(part, ids))
        assert sorted(rid for rid, _ in loaded) == sorted(ids)  # each id once
        results.update(loaded)
    return pa.concat_tables(tables, promote_options="permissive"), results


def _errors(results: dict[str, np.ndarray | ImageDecodeError]) -> dict[str, str]:
    return {rid: str(r) for rid, r in results.items() if isinstance(r, ImageDecodeError)}


def test_the_same_images_give_the_same_pixels_in_every_format(tmp_path: Path) -> None:
    roots = write_image_set(tmp_path, 11, size=24, per_shard=4)
    by_format = {}
    for name, root in roots.items():
        reader = open_reader(SourceSpec(name, root, "all", 16))
        assert reader.listed == (name == "imagefolder")
        table, results = _read_all(reader)
        assert not _errors(results)
        keys = table.column("key").to_pylist()
        ids = table.column("record_id").to_pylist()
        by_format[name] = {key: pixel_sha256(results[rid]) for key, rid in zip(keys, ids, strict=True)}
        shuffled = ids[::-1]  # random access (the audit's originals), grouped by part inside the reader
        assert {rid: pixel_sha256(p) for rid, p in reader.load_many(shuffled)} == {  # type: ignore[arg-type]
            rid: by_format[name][key] for key, rid in zip(keys, ids, strict=True)}
        assert pixel_sha256(reader.load(ids[5])) == by_format[name][keys[5]]
        assert reader.metadata().column("record_id").to_pylist() == ids
    assert len(by_format["imagefolder"]) == 11
    assert by_format["imagefolder"] == by_format["webdataset"] == by_format["parquet"]


def test_webdataset_record_ids_metadata_columns_and_caption(tmp_path: Path) -> None:
    roots = write_image_set(tmp_path, 6, formats=("webdataset",), per_shard=4)
    _tar(roots["webdataset"] / "00002.tar", [
        ("sub/x1.jpg", _png(1)), ("sub/x1.json", json.dumps({"caption": "from json", "nested": {"a": 1},
                                                             "tags": [1, 2], "error": None, "URL": "u"}).encode()),
        ("x2.webp", b"RIFF....WEBP broken"),  # a corrupt image: an error row
    ])
    reader = open_reader(SourceSpec("webdataset", roots["webdataset"], "all", 16))
    assert [p.name for p in reader.parts()] == ["00000.tar", "00001.tar", "00002.tar"]
    table, results = _read_all(reader)
    ids = table.column("record_id").to_pylist()
    assert ids == ["00000/000000", "00000/000001", "00000/000002", "00000/000003", "00001/000004", "00001/000005",
                   "00002/sub/x1", "00002/x2"]
    rows = dict(zip(ids, table.to_pylist(), strict=True))
    assert rows["00000/000001"]["caption"] == "image number 1"  # from KEY.txt
    assert rows["00002/sub/x1"]["caption"] == "from json"  # no KEY.txt: the JSON's caption
    assert rows["00000/000001"]["source_sha256"] and "sha256" not in table.column_names  # img2dataset's sha256 renamed
    assert "source_error" in table.column_names  # nested values are their JSON text, never dropped (a null opt-out)
    assert rows["00002/sub/x1"]["nested"] == '{"a": 1}' and rows["00002/sub/x1"]["tags"] == "[1, 2]"
    assert rows["00000/000001"]["nested"] is None
    assert rows["00000/000002"]["license"] == "proprietary" and rows["00000/000003"]["width"] == 24
    assert _errors(results).keys() == {"00002/x2"} and "cannot decode" in _errors(results)["00002/x2"]
    assert results["00002/sub/x1"].shape == (3, 16, 16)  # type: ignore[union-attr]


def test_webdataset_broken_members_are_error_rows_and_the_rest_is_read(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    _tar(root / "a.tar", [
        ("k1.png", _png(1)), ("k1.json", b'{"n": 1}'),
        ("k2.png", b"\x89PNG not really"), ("k2.json", b'{"n": 2}'),  # corrupt image
        ("k3.png", _png(3)), ("k3.json", b'{"n": '),  # JSON that does not parse
        ("k4.json", b'{"n": 4}'), ("k4.txt", b"no image"),  # no image member
        ("k5.png", _png(5)),  # no JSON: null metadata, fine
        ("k1.png", _png(6)), ("k1.json", b'{"n": 6}'),  # the key again
        ("k7.png", _png(7)), ("k7.json", b'{"n": 7}'),
    ])
    reader = open_reader(SourceSpec("webdataset", root, "all", 16))
    table, results = _read_all(reader)
    assert table.column("record_id").to_pylist() == ["a/k1", "a/k2", "a/k3", "a/k4", "a/k5", "a/k1#2", "a/k7"]
    assert table.column("n").to_pylist() == [1, 2, None, 4, None, None, 7]
    errors = _errors(results)
    assert errors.keys() == {"a/k2", "a/k3", "a/k4", "a/k1#2"}
    assert "cannot decode" in errors["a/k2"] and "not valid JSON" in errors["a/k3"]
    assert "no image member" in errors["a/k4"] and "appears again" in errors["a/k1#2"]
    with pytest.raises(ImageDecodeError, match="not valid JSON"):
        reader.load("a/k3")


def test_webdataset_truncated_tar_keeps_the_records_before_the_break(tmp_path: Path) -> None:
    members = []
    for i in range(4):
        members += [(f"k{i}.png", _png(i, 40)), (f"k{i}.json", json.dumps({"i": i}).encode())]
    whole = _tar(tmp_path / "whole" / "s.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole" / "s.tar") as tar:
        third = tar.getmember("k2.png")
        fourth = tar.getmember("k3.png")
    for cut, broken in [(third.offset_data + 100, "s/k2"),  # inside the third image's bytes
                        (fourth.offset + 200, "s/k2")]:  # inside the fourth record's header: the third is cut short
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        (root / "s.tar").write_bytes(whole[:cut])
        table, results = _read_all(open_reader(SourceSpec("webdataset", root, "all", 16)))
        ids = table.column("record_id").to_pylist()
        assert ids[:2] == ["s/k0", "s/k1"] and ids[-1] == broken
        assert _errors(results).keys() == {broken}, (cut, _errors(results))
        assert "truncated" in _errors(results)[broken]


def test_a_shard_that_is_not_a_tar_is_one_error_record(tmp_path: Path) -> None:
    roots = write_image_set(tmp_path, 4, formats=("webdataset",), per_shard=4)
    (roots["webdataset"] / "00001.tar").write_bytes(b"this is not a tar file" * 100)
    (roots["webdataset"] / "00002.tar").write_bytes(b"")
    reader = open_reader(SourceSpec("webdataset", roots["webdataset"], "all", 16))
    table, results = _read_all(reader)
    assert table.column("record_id").to_pylist()[-2:] == ["00001", "00002"]
    assert _errors(results).keys() == {"00001", "00002"} and "not a tar" in _errors(results)["00001"]
    assert sum(not isinstance(r, ImageDecodeError) for r in results.values()) == 4
    with pytest.raises(ImageDecodeError, match="not a tar"):
        reader.load("00001")


def test_webdataset_brace_pattern_and_a_missing_shard(tmp_path: Path) -> None:
    roots = write_image_set(tmp_path, 12, formats=("webdataset",), per_shard=4)
    shards = roots["webdataset"] / "shards"
    shards.mkdir()
    for tar in sorted(roots["webdataset"].glob("*.tar")):
        tar.rename(shards / tar.name)
    reader = open_reader(SourceSpec("webdataset", roots["webdataset"], "all", 16, shards="shards/{00001..00003}.tar"))
    table, results = _read_all(reader)
    ids = table.column("record_id").to_pylist()
    assert ids[0] == "shards/00001/000004" and ids[-1] == "shards/00003" and len(ids) == 9
    assert _errors(results).keys() == {"shards/00003"} and "not found" in _errors(results)["shards/00003"]
    with pytest.raises(InputError, match=r"no \*\.tar shards"):
        open_reader(SourceSpec("webdataset", tmp_path, "all", 16)).parts()


def test_webdataset_metadata_pass_reads_no_image_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.datasets.webdataset import WebDatasetReader

    roots = write_image_set(tmp_path, 8, formats=("webdataset",), per_shard=4)
    read: list[str] = []
    member = WebDatasetReader._member

    def spy(self, tar, info):  # type: ignore[no-untyped-def]
        read.append(info.name)
        return member(self, tar, info)

    monkeypatch.setattr(WebDatasetReader, "_member", spy)
    reader = open_reader(SourceSpec("webdataset", roots["webdataset"], "all", 16))
    assert reader.part_metadata(reader.parts()[1]).num_rows == 4
    assert read and not [name for name in read if name.endswith(".png")]


def _hf_parquet(path: Path, images: list[object], row_group_size: int = 2, **columns: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, kind), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_corrupt_and_null_images_are_error_rows(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    _hf_parquet(root / "a.parquet", [{"bytes": _png(0), "path": "0.png"}, {"bytes": b"garbage", "path": "1.png"},
                                     None, {"bytes": None, "path": "3.png"}, {"bytes": _png(4), "path": None}],
                n=[0, 1, 2, 3, 4], sha256=["x"] * 5, nested=[[1]] * 5, raw=[b"b"] * 5)
    (root / "b.parquet").write_bytes(b"PAR1 not really PAR1")
    reader = open_reader(SourceSpec("parquet", root, "all", 16))
    table, results = _read_all(reader)
    assert table.column("record_id").to_pylist() == [f"a.parquet/{i:09d}" for i in range(5)] + ["b.parquet"]
    assert table.column_names == ["record_id", "n", "source_sha256", "nested", "raw"]  # no column dropped
    assert table.column("nested").to_pylist() == ["[1]"] * 5 + [None]  # a list as its JSON text
    assert table.column("raw").to_pylist() == [b"b"] * 5 + [None]  # short binary as it is
    errors = _errors(results)
    assert errors.keys() == {"a.parquet/000000001", "a.parquet/000000002", "a.parquet/000000003", "b.parquet"}
    assert "cannot decode" in errors["a.parquet/000000001"] and "no image bytes" in errors["a.parquet/000000003"]
    assert "not a readable Parquet file" in errors["b.parquet"]
    assert results["a.parquet/000000004"].shape == (3, 16, 16)  # type: ignore[union-attr]


def test_parquet_parts_are_runs_of_row_groups_and_binary_image_columns_work(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import sfbd_guard.datasets.parquet as parquet_module

    monkeypatch.setattr(parquet_module, "PART_RECORDS", 4)
    root = tmp_path / "pq"
    pq.write_table(pa.table({"img": [_png(i) for i in range(7)], "label": list(range(7))}), root / "x" / "t.parquet"
                   if (root / "x").mkdir(parents=True) is None else root, row_group_size=2)
    reader = open_reader(SourceSpec("parquet", root, "all", 16, image_column="img"))
    assert [(p.start, p.stop) for p in reader.parts()] == [(0, 4), (4, 7)]
    table, results = _read_all(reader)
    assert table.column("label").to_pylist() == list(range(7)) and not _errors(results)
    assert pixel_sha256(reader.load("x/t.parquet/000000005")) == pixel_sha256(results["x/t.parquet/000000005"])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no image column 'image'"):
        _read_all(open_reader(SourceSpec("parquet", root, "all", 16)))
