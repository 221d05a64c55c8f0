"""Attacks through WebDataset shards and Parquet files: tar members that climb out (`../x`, absolute names),
links and devices inside a tar, shards symlinked out of the root, brace patterns that leave the root or name
millions of shards, and a Parquet image whose `path` names a file outside the dataset.

Nothing is ever extracted, no path a tar member or a Parquet cell names is ever opened: each such record is an
`error` row, and every other record is read as usual.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import write_policy
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.errors import ConfigError, ImageDecodeError, InputError
from sfbd_guard.hashing import pixel_sha256


@pytest.fixture
def watch_opens() -> Iterator[list[str]]:
    """Every path opened in this process while the fixture is active (an audit hook cannot be removed: it checks
    a flag)."""
    opened: list[str] = []
    state = {"on": True}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(hook)
    yield opened
    state["on"] = False


def _png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _secret(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secret.png"
    path.write_bytes(_png(999))
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _results(reader: Any) -> dict[str, Any]:
    out = {}
    for part in reader.parts():
        ids = reader.part_metadata(part).column("record_id").to_pylist()
        out.update(reader.read_part(part, ids))
    return out


def test_tar_members_named_dotdot_or_absolute_are_error_rows_and_nothing_is_extracted(tmp_path: Path) -> None:
    root = tmp_path / "data" / "wds"
    root.mkdir(parents=True)
    with tarfile.open(root / "s.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "../escape.png", _png(1))
        _add(tar, "../escape.json", b"{}")
        _add(tar, str(tmp_path / "abs.png"), _png(2))
        _add(tar, "ok.png", _png(3))
    before = sorted(p for p in tmp_path.rglob("*"))
    results = _results(open_reader(SourceSpec("webdataset", root, "all", 16)))
    errors = {rid: str(r) for rid, r in results.items() if isinstance(r, ImageDecodeError)}
    assert errors.keys() == {"s/../escape", f"s/{tmp_path}/abs"}
    assert all("absolute or climbs" in reason for reason in errors.values())
    assert results["s/ok"].shape == (3, 16, 16)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path / "data" / "escape.png").exists() and not (tmp_path / "abs.png").exists()


def test_links_and_devices_inside_a_tar_are_refused_and_their_targets_never_opened(tmp_path: Path,
                                                                                   watch_opens: list[str]) -> None:
    secret = _secret(tmp_path / "outside")
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "s.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "good.png", _png(1))
        _add(tar, "sym.png", kind=tarfile.SYMTYPE, link=str(secret))
        _add(tar, "rel.png", kind=tarfile.SYMTYPE, link="../outside/secret.png")
        _add(tar, "hard.png", kind=tarfile.LNKTYPE, link="good.png")
        _add(tar, "dev.png", kind=tarfile.CHRTYPE)
        _add(tar, "fifo.png", kind=tarfile.FIFOTYPE)
    watch_opens.clear()  # the set-up's own writes
    reader = open_reader(SourceSpec("webdataset", root, "all", 16))
    results = _results(reader)
    errors = {rid: str(r) for rid, r in results.items() if isinstance(r, ImageDecodeError)}
    assert errors.keys() == {"s/sym", "s/rel", "s/hard", "s/dev", "s/fifo"}
    assert "symbolic link" in errors["s/sym"] and "hard link" in errors["s/hard"] and "device" in errors["s/dev"]
    assert all("refused" in reason for reason in errors.values())
    assert pixel_sha256(results["s/good"]) == pixel_sha256(reader.load("s/good"))
    assert str(secret.resolve()) not in watch_opens and str((root / "s.tar").resolve()) in watch_opens


def test_a_shard_symlinked_out_of_the_root_is_an_error_record_and_never_opened(tmp_path: Path,
                                                                                watch_opens: list[str]) -> None:
    outside = tmp_path / "outside" / "x.tar"
    outside.parent.mkdir()
    with tarfile.open(outside, "w") as tar:
        _add(tar, "k.png", _png(1))
    root = tmp_path / "wds"
    root.mkdir()
    (root / "x.tar").symlink_to(outside)
    watch_opens.clear()
    results = _results(open_reader(SourceSpec("webdataset", root, "all", 16)))
    assert list(results) == ["x"] and "escapes the dataset root" in str(results["x"])
    assert str(outside.resolve()) not in watch_opens


def test_brace_patterns_that_leave_the_root_or_name_too_many_shards_are_refused(tmp_path: Path) -> None:
    from sfbd_guard.policy.model import load_policy

    (tmp_path / "wds").mkdir()
    for pattern, reason in [("../{0..3}.tar", "climbs"), ("shards/{a,../../etc}.tar", "climbs"),
                            ("/tmp/{0..3}.tar", "absolute"), ("{0..99999999}.tar", "more than"),
                            ("{0..9999}{0..9999}.tar", "more than"), ("s/{0..3}.tgz", "does not end with .tar"),
                            ("s/{{0..3}}.tar", "braces")]:
        policy = {"version": 1, "name": "w", "dataset": {"format": "webdataset", "root": "wds", "resolution": 8,
                                                         "shards": pattern},
                  "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 0.5}, "output": "out"}
        with pytest.raises(ConfigError, match=r"dataset\.shards") as caught:
            load_policy(write_policy(tmp_path / "p.yaml", policy))
        assert reason in str(caught.value), (pattern, str(caught.value))
        with pytest.raises(InputError, match=reason):  # a SourceSpec made without the policy: the reader refuses too
            open_reader(SourceSpec("webdataset", tmp_path / "wds", "all", 8, shards=pattern)).parts()


def test_a_tar_member_above_the_byte_budget_is_not_read(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "s.tar", "w") as tar:
        _add(tar, "big.png", _png(1, 200))
        _add(tar, "small.png", _png(2, 8))
    reader = open_reader(SourceSpec("webdataset", root, "all", 8, max_file_bytes=2000))
    results = _results(reader)
    assert "above the budget dataset.max_file_bytes" in str(results["s/big"])
    assert results["s/small"].shape == (3, 8, 8)


def test_a_parquet_image_path_naming_a_file_outside_is_never_opened(tmp_path: Path, watch_opens: list[str]) -> None:
    """The Hugging Face struct's `path` is only a name: a hostile file pointing it at a secret gets nothing."""
    secret = _secret(tmp_path / "outside")
    root = tmp_path / "pq"
    root.mkdir()
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": None, "path": str(secret)}, {"bytes": None, "path": "../outside/secret.png"},
              {"bytes": _png(5), "path": str(secret)}]
    pq.write_table(pa.table({"image": pa.array(images, kind), "n": [0, 1, 2]}), root / "a.parquet")
    watch_opens.clear()
    reader = open_reader(SourceSpec("parquet", root, "all", 16))
    results = _results(reader)
    assert "no image bytes" in str(results["a.parquet/000000000"])
    assert "no image bytes" in str(results["a.parquet/000000001"])
    from sfbd_guard.datasets.transforms import load_bytes

    assert pixel_sha256(results["a.parquet/000000002"]) == pixel_sha256(load_bytes(_png(5), "x", 16))  # its own bytes
    assert pixel_sha256(results["a.parquet/000000002"]) != pixel_sha256(load_bytes(secret.read_bytes(), "x", 16))
    watch_opens.remove(str(secret.resolve()))  # the positive control's own read just above
    assert str(secret.resolve()) not in watch_opens and str((root / "a.parquet").resolve()) in watch_opens
