"""`guard prepare` on the same images as an image folder, WebDataset shards and Parquet files: the same partitions
and pixels, byte-identical outputs whatever the worker count, broken members as error rows."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import guard, key_file, lineage, write_image_set, write_policy

FORMATS = ("imagefolder", "webdataset", "parquet")


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_image_set(tmp_path_factory.mktemp("images"), 30, size=12, per_shard=7)


def _policy(folder: Path, fmt: str, root: Path, out: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_policy(folder / "policy.yaml", {
        "version": 1, "name": f"same-{fmt}", "dataset": {"format": fmt, "root": str(root), "resolution": 8},
        "rules": [{"name": "opted-out", "action": "exclude", "where": "opt_out"},
                  {"name": "free", "action": "clean", "where": "license = 'CC0-1.0'"},
                  {"name": "rest", "action": "protect"}],
        "noise": {"sigma": 0.5, "key_file": str(key_file(folder.parent / "keys", secret=b"s" * 32))},
        "output": str(out)})


def _by_key(out: Path) -> dict[str, tuple[str, str | None, str | None, bytes | None]]:
    """key → (partition, rule, pixel sha256, stored array row)."""
    rows = lineage(out).to_pylist()  # the owner's full manifest: record keys and sha256
    return {r["key"]: (r["partition"], r["rule"], r["sha256"],
                       np.load(out / r["file"])[r["row"]].tobytes() if r["file"] else None) for r in rows}


def test_the_same_images_in_three_formats_prepare_alike(tmp_path: Path, image_set: dict[str, Path]) -> None:
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = tmp_path / f"out-{fmt}"
        # the same images under each format's own record ids: other draws of them (allowed here, see test_release_register)
        assert guard("prepare", "--policy", _policy(tmp_path / fmt, fmt, image_set[fmt], outs[fmt]), "--allow-rerelease") == 0
    records = {fmt: _by_key(outs[fmt]) for fmt in FORMATS}
    assert len(records["imagefolder"]) == 30
    partitions = {fmt: {k: v[:3] for k, v in rows.items()} for fmt, rows in records.items()}
    assert partitions["imagefolder"] == partitions["webdataset"] == partitions["parquet"]
    assert {p for p, *_ in partitions["parquet"].values()} == {"clean", "protected", "excluded"}
    clean = {fmt: {k: v[3] for k, v in rows.items() if v[0] == "clean"} for fmt, rows in records.items()}
    assert clean["imagefolder"] == clean["webdataset"] == clean["parquet"], "clean pixels stored alike"
    ids = lineage(outs["webdataset"]).column("record_id").to_pylist()
    assert ids[:2] == ["00000/000000", "00000/000001"], "webdataset record ids are <shard>/<key>"
    ids = lineage(outs["parquet"]).column("record_id").to_pylist()
    assert ids[0].endswith(".parquet/000000000")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_streamed_formats_are_byte_identical_whatever_the_worker_count(tmp_path: Path, image_set: dict[str, Path],
                                                                         fmt: str) -> None:
    outs = [tmp_path / f"w{workers}" for workers in (1, 2)]
    for workers, out in zip((1, 2), outs, strict=True):
        policy = _policy(tmp_path / f"p{workers}", fmt, image_set[fmt], out)
        assert guard("prepare", "--policy", policy, "--workers", workers) == 0

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "card.json"}

    assert files(outs[0]) == files(outs[1])


def test_broken_members_become_error_rows(tmp_path: Path) -> None:
    roots = write_image_set(tmp_path / "images", 8, size=12, formats=("webdataset", "parquet"), per_shard=4)
    shard = roots["webdataset"] / "00001.tar"
    with tarfile.open(shard, "a") as tar:  # a corrupt image under a new key
        payload = b"\x89PNG\r\n\x1a\n broken"
        info = tarfile.TarInfo("000099.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (roots["webdataset"] / "00002.tar").write_bytes(b"not a tar at all" * 64)
    data = sorted((roots["parquet"] / "data").glob("*.parquet"))[0]
    table = pq.read_table(data)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": b"garbage", "path": "x.png"}
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)), data)
    for fmt in ("webdataset", "parquet"):
        out = tmp_path / f"out-{fmt}"
        assert guard("prepare", "--policy", _policy(tmp_path / fmt, fmt, roots[fmt], out), "--allow-rerelease") == 0
        rows = lineage(out).to_pylist()  # the owner's full manifest: record keys and sha256
        errors = {r["record_id"]: r["error"] for r in rows if r["partition"] == "error"}
        ok = [r["record_id"] for r in rows if r["partition"] != "error"]
        if fmt == "webdataset":  # the added member (no JSON: null metadata) does not decode; a shard is no tar
            assert errors.keys() == {"00001/000099", "00002"} and "not a tar file" in errors["00002"]
            assert len(ok) == 8
        else:
            assert list(errors) == [f"data/{data.name}/000000001"] and len(ok) == 7


def test_channels_1_stores_the_luma_and_the_audit_reads_the_same(tmp_path: Path, image_set: dict[str, Path]) -> None:
    """`dataset.channels: 1`: every format stores one grey channel, PIL's "L" of the decoded RGB (the oracle), and
    the audit's reader of the protected originals gives the very pixels whose sha256 prepare recorded."""
    from PIL import Image

    from sfbd_guard.auditing.originals import iter_protected, read_prepared
    from sfbd_guard.datasets import SourceSpec, open_reader
    from sfbd_guard.prepared.card import read_card

    for fmt in FORMATS:
        policy = yaml.safe_load(_policy(tmp_path / fmt, fmt, image_set[fmt], tmp_path / f"grey-{fmt}").read_text())
        policy["dataset"]["channels"] = 1
        out = tmp_path / f"grey-{fmt}"
        assert guard("prepare", "--policy", write_policy(tmp_path / fmt / "policy.yaml", policy),
                     "--allow-rerelease") == 0
        assert read_card(out).channels == 1
        rgb = open_reader(SourceSpec(format=fmt, root=image_set[fmt], split="all", resolution=8))
        rows = lineage(out).to_pylist()
        clean = [r for r in rows if r["partition"] == "clean"]
        assert clean
        for row, (_rid, pixels) in zip(clean, rgb.load_many([r["record_id"] for r in clean]), strict=True):
            stored = np.load(out / row["file"])[row["row"]]
            assert stored.shape == (1, 8, 8)
            oracle = np.asarray(Image.fromarray(np.asarray(pixels).transpose(1, 2, 0)).convert("L"))
            assert np.array_equal(stored[0], oracle), f"{fmt} {row['record_id']}"
        originals = np.concatenate(list(iter_protected(read_prepared(out), None)))
        assert originals.shape[1:] == (1, 8, 8)


def test_channels_3_is_refused_for_the_grey_digits(tmp_path: Path) -> None:
    policy = {"version": 1, "name": "d", "dataset": {"format": "digits", "resolution": 8, "channels": 3},
              "rules": [{"name": "rest", "action": "protect"}], "output": str(tmp_path / "out")}
    assert guard("prepare", "--policy", write_policy(tmp_path / "policy.yaml", policy)) == 2
