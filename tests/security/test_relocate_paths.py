"""Issue 14, evidence that survives a move: relative paths in run.json and the ledger, and finding a moved
prepared directory by its fingerprint, must not let `guard verify` / `guard report` read outside the project
or accept a directory with a forged card.

The project is the ledger's parent. A relative path in run.json (relative to the run directory) or in the
ledger (relative to the project) that leads outside the project, by `..` or through a symlink, is refused
where it would be opened: verify exits 2 naming run.json, the key, the value and `--data`; the report reads no
picture through it. The fingerprint fallback only takes a directory whose card passes the structural checks
(the fingerprint recomputed from its files and manifest); the arrays, the ledger and the provenance are then
checked as for any directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import digits_policy, tiny_pipeline, write_policy
from helpers import guard as _guard
from sfbd_guard.hashing import fingerprint, sha256_file


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared and a tiny run trained in a project folder (ledger inside it), as a user would."""
    folder = tmp_path_factory.mktemp("relocate") / "project"
    folder.mkdir()
    write_policy(folder / "policy.yaml", digits_policy(Path("prepared"), drop=0.9))
    write_policy(folder / "pipeline.yaml", tiny_pipeline(Path("prepared"), Path("runs/r")))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("GUARD_LEDGER", raising=False)
        assert _guard("prepare", "--policy", "policy.yaml", "--ledger", "ledger") == 0
        assert _guard("train", "--pipeline", "pipeline.yaml", "--ledger", "ledger") == 0
    return folder


def _copy(project: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(project, tmp_path / "work" / "project", symlinks=True))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _verify(copy: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = _guard("verify", "--run", copy / "runs" / "r", "--ledger", copy / "ledger")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _set_data(copy: Path, value: str) -> None:
    path = copy / "runs" / "r" / "run.json"
    record = json.loads(path.read_text())
    record["data"] = value
    path.write_text(json.dumps(record, indent=2))


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_run_json_path_leading_out_of_the_project_is_refused_and_nothing_is_written(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    copy = _copy(project, tmp_path)
    outside = Path(shutil.copytree(copy / "prepared", tmp_path / "work" / "outside"))  # an honest directory, outside
    shutil.rmtree(copy / "prepared")
    if how == "dotdot":
        value = "../../../outside"
    else:
        (copy / "runs" / "escape").symlink_to(outside)
        value = "../escape"
    _set_data(copy, value)
    before = _tree(tmp_path)
    code, out, err = _verify(copy, capsys)
    assert code == 2 and "PASS" not in out, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and "Traceback" not in err
    assert f"{copy / 'runs' / 'r' / 'run.json'}: data: {value!r} leads outside the project" in lines[0]
    assert lines[1].startswith("hint: ") and "--data" in lines[1]
    assert _tree(tmp_path) == before  # nothing written, nothing touched


def test_a_ledger_path_leading_out_of_the_project_is_never_opened(project: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A forged training event whose run is `../elsewhere`: the HTML report must not embed that folder's grid."""
    from sfbd_guard.ledger import Artifact, EventDraft, write_event

    copy = _copy(project, tmp_path)
    elsewhere = tmp_path / "work" / "elsewhere"
    (elsewhere / "samples").mkdir(parents=True)
    (elsewhere / "samples" / "grid.png").write_bytes(b"\x89PNG a file outside the project")
    draft = EventDraft(kind="train", command=["guard", "train"], outputs=[Artifact("run", "../elsewhere", None)],
                       summary={"method": "clean-only", "name": "forged", "resumed": False, "step": 1, "kimg": 0.1,
                                "seconds": 1.0, "device": "cpu", "world_size": 1})
    write_event(copy / "ledger", draft, status="ok")
    monkeypatch.chdir(copy)  # where `../elsewhere` would lead if it were read relative to the working directory
    assert _guard("report", "--ledger", copy / "ledger", "--html", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    import base64

    assert base64.b64encode((elsewhere / "samples" / "grid.png").read_bytes()).decode()[:16] not in page
    assert "Run chain: elsewhere" not in page and str(elsewhere) not in page


def _forge(prepared: Path, *, refingerprint: bool) -> None:
    """Replace a protected shard by zeros and re-hash it in the card; keep (or recompute) the card's fingerprint."""
    card = json.loads((prepared / "card.json").read_text())
    name = next(n for n in sorted(card["files"]) if n.startswith("protected/"))
    array = np.load(prepared / name)
    np.save(prepared / name, np.zeros_like(array))
    card["files"][name] = sha256_file(prepared / name)
    if refingerprint:
        card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    (prepared / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("forgery", ["card-keeps-the-fingerprint", "card-refingerprinted"])
def test_fingerprint_matching_takes_no_directory_with_a_forged_card(project: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str], forgery: str) -> None:
    copy = _copy(project, tmp_path)
    decoy = copy / "decoy" / "prepared"
    decoy.parent.mkdir()
    os.rename(copy / "prepared", decoy)
    _forge(decoy, refingerprint=forgery == "card-refingerprinted")
    code, out, err = _verify(copy, capsys)
    assert code == 2 and "PASS" not in out, (out, err)
    assert f"data: the prepared directory {copy / 'prepared'} is not there" in err and "--data" in err


def test_a_directory_found_by_its_fingerprint_is_still_verified(project: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Same card (same fingerprint), an edited array: found, then failed by the array checks (not accepted)."""
    copy = _copy(project, tmp_path)
    moved = copy / "elsewhere-in-the-project"
    os.rename(copy / "prepared", moved)
    card = json.loads((moved / "card.json").read_text())
    name = next(n for n in sorted(card["files"]) if n.startswith("protected/"))
    array = np.load(moved / name)
    np.save(moved / name, np.zeros_like(array))
    code, out, _ = _verify(copy, capsys)
    assert code == 1 and "FAIL  consumed arrays" in out and "FAIL  provenance" in out, out


def test_stored_paths_are_contained() -> None:
    from sfbd_guard.locations import resolve, store

    base = Path("/srv/project")
    assert resolve("../../etc", base) is None and resolve("runs/../../x", base) is None
    assert resolve("runs/r", base) == base / "runs" / "r" and resolve("/data/x", base) == Path("/data/x")
    assert store("/srv/project/prepared", base) == "prepared" and store("/srv/data", base) == "/srv/data"
    assert store("/srv/project", base) == "/srv/project"  # the project itself: never stored as "."
    assert resolve("../../prepared", base / "runs" / "r", project=base) == base / "prepared"
    assert resolve("../../../prepared", base / "runs" / "r", project=base) is None
