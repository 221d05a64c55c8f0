"""Attacks on the output path: `--overwrite` aimed at the user's files or the dataset, and two runs at once.

`--overwrite` may only replace a prepared directory made by `guard prepare`; anything else is refused
with exit 2 and left byte for byte as it was. The output may not be, contain or lie inside the dataset
root, nor be or contain the policy's folder. A second `guard prepare` into an output another run is
writing stops at once with exit 2.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from fixtures.synthetic import write_imagefolder
from helpers import write_policy


def _policy(root: Path, out: Path) -> dict:
    return {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
            "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 1.0}, "output": str(out)}


def _snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under `folder` (itself included) with its bytes (files) and mtime."""
    entries = {".": (None, folder.stat().st_mtime_ns)}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        entries[path.relative_to(folder).as_posix()] = (path.read_bytes() if path.is_file() else None, info.st_mtime_ns)
    return entries


def _one_line(result, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: ") and fragment in lines[0], lines
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")) and "Traceback" not in result.err


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "data", [], extra_images=["a.png", "b.png", "c.png"])


@pytest.mark.parametrize("kind", ["thesis", "card-and-thesis", "fake-card", "bad-json"])
def test_overwrite_refuses_a_folder_that_is_not_a_prepared_directory(cli, tmp_path: Path, dataset: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work\n")
    if kind == "card-and-thesis":  # a real-looking card does not make the thesis replaceable
        (folder / "card.json").write_text(json.dumps({"fingerprint": "x", "files": {}, "tool_version": "0", "policy_sha256": "y"}))
        (folder / "clean").mkdir()
    elif kind == "fake-card":  # only prepared-directory names, but the card is not a card
        (folder / "thesis.txt").unlink()
        (folder / "card.json").write_text(json.dumps({"title": "my notes"}))
        (folder / "manifest.parquet").write_bytes(b"not parquet either")
    elif kind == "bad-json":
        (folder / "thesis.txt").unlink()
        (folder / "card.json").write_text("{ unfinished")
    before = _snapshot(folder)
    policy = write_policy(tmp_path / "p.yaml", _policy(dataset, tmp_path / "unused"))
    _one_line(cli("prepare", "--policy", policy, "--out", folder, "--overwrite"), "not a prepared directory")
    assert _snapshot(folder) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".documents.")], "no staging or lock left behind"


def test_overwrite_still_replaces_a_prepared_directory(cli, tmp_path: Path, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "p.yaml", _policy(dataset, tmp_path / "out"))
    assert cli("prepare", "--policy", policy).code == 0
    first = json.loads((tmp_path / "out" / "card.json").read_text())
    assert cli("prepare", "--policy", policy, "--overwrite").code == 0
    second = json.loads((tmp_path / "out" / "card.json").read_text())
    assert second["created_at"] >= first["created_at"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_output_that_is_inside_or_above_the_dataset_root_is_refused(cli, tmp_path: Path, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    before = _snapshot(tmp_path / "data")
    policy = write_policy(tmp_path / "policies" / "p.yaml", _policy(dataset, tmp_path / "unused"))
    _one_line(cli("prepare", "--policy", policy, "--out", dataset, "--overwrite"), "is the dataset root")
    _one_line(cli("prepare", "--policy", policy, "--out", dataset / "prepared"), "is inside the dataset root")
    _one_line(cli("prepare", "--policy", policy, "--out", tmp_path, "--overwrite"), "contains the dataset root")
    assert _snapshot(tmp_path / "data") == before
    # the dataset root reached through a symlink is still the dataset root
    (tmp_path / "link").symlink_to(dataset, target_is_directory=True)
    _one_line(cli("prepare", "--policy", policy, "--out", tmp_path / "link", "--overwrite"), "is the dataset root")
    assert _snapshot(tmp_path / "data") == before


def test_output_that_is_the_policy_folder_is_refused(cli, tmp_path: Path, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "policies" / "p.yaml", _policy(dataset, tmp_path / "unused"))
    (tmp_path / "policies" / "optout.csv").write_text("id\n1\n")
    before = _snapshot(tmp_path / "policies")
    _one_line(cli("prepare", "--policy", policy, "--out", tmp_path / "policies", "--overwrite"), "policy's folder")
    assert _snapshot(tmp_path / "policies") == before


def test_a_second_prepare_into_a_locked_output_exits_2_before_any_work(cli, tmp_path: Path, dataset: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.datasets.imagefolder import ImageFolderReader

    policy = write_policy(tmp_path / "p.yaml", _policy(dataset, tmp_path / "out"))
    lock = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT, 0o600)  # as a running guard prepare holds it
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with monkeypatch.context() as patch:
            def no_work(self: object) -> None:
                raise AssertionError("the second run read the dataset before checking the lock")

            patch.setattr(ImageFolderReader, "metadata", no_work)
            _one_line(cli("prepare", "--policy", policy), "another guard prepare is writing")
        assert not (tmp_path / "out").exists()
        _one_line(cli("prepare", "--policy", policy, "--overwrite"), "another guard prepare is writing")
    finally:
        os.close(lock)
    assert cli("prepare", "--policy", policy).code == 0  # released: the next run goes ahead
    assert not (tmp_path / ".out.lock").exists(), "the lock file is removed at the end"
    lock = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT, 0o600)  # held again: the output stays as it is
    fcntl.flock(lock, fcntl.LOCK_EX)
    before = _snapshot(tmp_path / "out")
    try:
        _one_line(cli("prepare", "--policy", policy, "--overwrite"), "another guard prepare is writing")
    finally:
        os.close(lock)
    assert _snapshot(tmp_path / "out") == before


def test_stale_cleanup_removes_only_what_a_run_of_this_tool_left(cli, tmp_path: Path, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "p.yaml", _policy(dataset, tmp_path / "out"))
    dead = tmp_path / ".out.partial-999999999-deadbeef"  # a killed run's leftover: removed
    (dead / "clean").mkdir(parents=True)
    (dead / ".card.json.abc123.tmp").write_text("{")
    foreign = tmp_path / ".out.partial-999999998-0000cafe"  # the same name, but the user's files: kept
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine\n")
    assert cli("prepare", "--policy", policy).code == 0
    assert not dead.exists()
    assert (foreign / "thesis.txt").read_text() == "mine\n"
