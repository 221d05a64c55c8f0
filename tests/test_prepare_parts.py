"""`guard prepare` a part at a time: many parts give the same records as one, streamed parts whose columns
differ are unified, record ids must be unique, and no more than a window of parts is in flight."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.synthetic import write_imagefolder
from helpers import key_file, lineage, write_policy
from sfbd_guard.curation import prepare as prepare_module
from sfbd_guard.curation.prepare import ordered_map, prepare
from sfbd_guard.curation.records import SchemaUnion, conform
from sfbd_guard.datasets import READERS, DatasetReader, Loaded, Part
from sfbd_guard.datasets import base as base_module
from sfbd_guard.errors import ImageDecodeError, InputError
from sfbd_guard.policy.model import load_policy


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(output: Path) -> dict[str, tuple[str, bytes | None]]:
    manifest = lineage(output).to_pylist()  # the owner's: error rows under their file names
    return {r["record_id"]: (r["partition"], np.load(output / r["file"])[r["row"]].tobytes() if r["file"] else None)
            for r in manifest}


def test_many_small_parts_give_the_records_of_one_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_imagefolder(tmp_path / "images", [{"file_name": f"{i:02d}.png", "kind": "open" if i % 3 else "closed"}
                                                   for i in range(23)])
    (root / "05.png").write_bytes(b"not a png")
    policy = {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": "open", "action": "clean", "where": "kind = 'open'"}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "keys"))}}

    def run(name: str, workers: int) -> Path:
        return prepare(load_policy(write_policy(tmp_path / f"{name}.yaml", {**policy, "output": str(tmp_path / name)})),
                       workers=workers).output

    one = run("one", 1)
    monkeypatch.setattr(base_module, "PART_RECORDS", 5)  # 5 parts, one record of the last
    spec = prepare_module.source_spec(load_policy(tmp_path / "one.yaml"), None)
    assert len(READERS["imagefolder"](spec).parts()) == 5
    many = {workers: run(f"many{workers}", workers) for workers in (1, 2)}
    assert _rows(one) == _rows(many[1]) == _rows(many[2])
    assert len(_rows(one)) == 23 and _rows(one)["05.png"] == ("error", None)
    files = {w: {k: v for k, v in _files(many[w]).items() if k != "card.json"} for w in (1, 2)}
    assert files[1] == files[2], "byte-identical whatever the worker count"
    assert sorted(files[1]) == sorted(["manifest.parquet", *(f"{p}/shard-{i:05d}.npy" for p in ("clean", "protected")
                                                      for i in range(5))]), "each part's shards, numbered in part order"
    assert not any(name.startswith(".") for name in _files(many[1])), "no temporary file is left"
    assert pq.ParquetFile(many[1] / "manifest.parquet").num_row_groups == 5, "the manifest is written a part at a time"


class _Streamed(DatasetReader):
    """A streamed reader whose parts disagree on their columns, as JSON metadata does."""

    format = "imagefolder"  # the policy schema's; the class itself is swapped in below
    listed = False
    tables: ClassVar[list[pa.Table]] = []

    def parts(self) -> list[Part]:
        return [Part(i, f"part {i}") for i in range(len(self.tables))]

    def part_metadata(self, part: Part) -> pa.Table:
        return self.tables[part.index]

    def metadata(self) -> pa.Table:
        raise AssertionError("a streamed reader's metadata is read a part at a time")

    def load(self, record_id: str) -> np.ndarray:
        if record_id.endswith("bad"):
            raise ImageDecodeError(f"{record_id}: broken member")
        import hashlib  # distinct pixels per record (equal pixels would be merged as copies by dedup)

        return np.frombuffer(hashlib.sha256(record_id.encode()).digest() * 2, np.uint8)[:48].reshape(3, 4, 4).copy()

    def read_part(self, part: Part, record_ids: Sequence[str]) -> Iterator[Loaded]:
        yield from reversed(list(self.load_many(record_ids)))  # any order


def _streamed_policy(tmp_path: Path, rules: list[dict[str, Any]]) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    return write_policy(tmp_path / "p.yaml", {
        "version": 1, "name": "streamed", "dataset": {"format": "imagefolder", "root": str(tmp_path / "data"), "resolution": 4},
        "rules": rules, "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "keys"))},
        "output": str(tmp_path / "out")})


def test_streamed_parts_with_different_columns_are_unified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(READERS, "imagefolder", _Streamed)
    monkeypatch.setattr(_Streamed, "tables", [
        pa.table({"record_id": ["a/1", "a/2"], "width": pa.array([64, 128], pa.int64()), "license": ["cc0", None]}),
        pa.table({"record_id": ["b/1", "b/bad"], "width": pa.array([32.5, None]), "caption": ["a cat", "a dog"]}),
        pa.table({"record_id": pa.array([], pa.string())}),
        pa.table({"record_id": ["d/1"], "license": pa.array([None], pa.null()), "width": ["wide"]}),
    ])
    policy = _streamed_policy(tmp_path, [{"name": "free", "action": "clean", "where": "license = 'cc0'"},
                                         {"name": "captioned", "action": "exclude", "where": "caption = 'a cat'"},
                                         {"name": "rest", "action": "protect"}])
    result = prepare(load_policy(policy))
    manifest = lineage(result.output)  # the owner's full manifest (the trainer's keeps no metadata by default)
    assert manifest.column("record_id").to_pylist() == ["a/1", "a/2", "b/1", "b/bad", "d/1"]
    assert manifest.schema.field("width").type == pa.string(), "int, float and string meet as string"
    assert manifest.column("width").to_pylist() == ["64", "128", "32.5", None, "wide"]
    assert manifest.column("caption").to_pylist() == [None, None, "a cat", "a dog", None]
    assert manifest.column("partition").to_pylist() == ["clean", "protected", "excluded", "error", "protected"]
    assert manifest.column("error").to_pylist()[3] == "b/bad: broken member"
    assert not any(p.name.startswith(".") for p in result.output.rglob("*")), "the records file is not published"


def test_numbers_widen_and_nulls_take_the_other_type() -> None:
    union = SchemaUnion()
    union.add(pa.schema([("record_id", pa.string()), ("n", pa.int32()), ("x", pa.null())]))
    union.add(pa.schema([("record_id", pa.string()), ("n", pa.float64()), ("x", pa.bool_()), ("y", pa.int64())]))
    assert union.schema == pa.schema([("record_id", pa.string()), ("n", pa.float64()), ("x", pa.bool_()), ("y", pa.int64())])
    table = conform(pa.table({"record_id": ["r"], "n": pa.array([3], pa.int32())}), union.schema)
    assert table.to_pylist() == [{"record_id": "r", "n": 3.0, "x": None, "y": None}]


def test_a_metadata_column_per_record_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile shard whose JSON has a new key per record would make the records table as wide as it is long."""
    monkeypatch.setitem(READERS, "imagefolder", _Streamed)
    monkeypatch.setattr(_Streamed, "tables", [pa.table({"record_id": [f"r/{i}"], f"key{i}": [1]}) for i in range(1100)])
    with pytest.raises(InputError, match=r"part 1024: the metadata has more than 1024 distinct columns"):
        prepare(load_policy(_streamed_policy(tmp_path, [{"name": "rest", "action": "protect"}])))


def test_repeated_record_ids_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record ids key the noise: two records sharing one would share their noise, which the difference of their
    noisy copies cancels (y1 - y2 = x1 - x2)."""
    monkeypatch.setitem(READERS, "imagefolder", _Streamed)
    monkeypatch.setattr(_Streamed, "tables", [pa.table({"record_id": ["s/1", "s/2"]}), pa.table({"record_id": ["s/2"]})])
    with pytest.raises(InputError, match=r"record id\(s\) 's/2' occur more than once"):
        prepare(load_policy(_streamed_policy(tmp_path, [{"name": "rest", "action": "protect"}])))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "nothing is left behind"


class _CountingPool:
    """Stands in for multiprocessing.Pool: runs jobs when their result is asked for, and counts how many wait."""

    def __init__(self) -> None:
        self.waiting = 0
        self.most = 0

    def apply_async(self, work: Any, args: tuple[Any, ...]) -> Any:
        pool = self
        pool.waiting += 1
        pool.most = max(pool.most, pool.waiting)

        class Result:
            def get(self) -> Any:
                pool.waiting -= 1
                return work(*args)

        return Result()


def test_at_most_a_window_of_parts_is_in_flight() -> None:
    pool = _CountingPool()
    jobs = iter(range(1000))
    assert list(ordered_map(pool, lambda n: n * n, lambda n: -1, jobs, window=4)) == [n * n for n in range(1000)]  # type: ignore[arg-type]
    assert pool.most == 4
