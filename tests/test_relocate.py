"""Evidence that survives a move: a project (policy, prepared directory, run, ledger) copied elsewhere, the
original deleted, still verifies and reports; a run whose prepared directory is gone names it and `--data`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import guard as _guard
from helpers import write_chain


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the moved project, where it was): run in its own folder, as a user would, then copied and deleted."""
    original = tmp_path_factory.mktemp("original") / "project"
    original.mkdir()
    pipeline = write_chain(original, "digits-moved")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(original)
        patch.delenv("GUARD_LEDGER", raising=False)
        assert _guard("run", pipeline.name, "--ledger", "ledger") == 0
    target = tmp_path_factory.mktemp("elsewhere") / "deeper" / "copy"
    shutil.copytree(original, target, symlinks=True)
    shutil.rmtree(original)
    return target, original


def _verify(project: Path, capsys: pytest.CaptureFixture[str], *extra: object) -> tuple[int, dict[str, str]]:
    code = _guard("verify", "--run", project / "runs" / "chain", "--ledger", project / "ledger", *extra)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL", "ATTENTION"))]
    return code, {line.split(":")[0].split("  ", 1)[1]: line for line in lines}


def _all_pass(checks: dict[str, str]) -> bool:
    """Every check passes; the pixel check needs the owner's digest key, which these runs are not given (ATTENTION)."""
    return all(line.startswith("ATTENTION" if name == "no protected pixels" else "PASS") for name, line in checks.items())


def test_a_copied_and_moved_project_verifies(moved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    project, original = moved
    assert not original.exists()
    code, checks = _verify(project, capsys)
    assert code == 0 and len(checks) == 11 and _all_pass(checks), checks
    assert str(project / "prepared") in checks["consumed arrays"]


def test_a_moved_project_reports_and_its_datasheet_names_the_method_and_the_audit(
        moved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project, _ = moved
    ledger = project / "ledger"
    assert _guard("report", "--ledger", ledger, "--sql", "SELECT run FROM trainings", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == [{"run": str(project / "runs" / "chain")}]  # where it is now
    assert _guard("report", "--ledger", ledger, "--html", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and page.count("<svg") == 3  # the grid; partitions, loss, histogram
    assert _guard("report", "--ledger", ledger, "--datasheet", tmp_path / "d.md", "--run", project / "runs" / "chain") == 0
    sheet = (tmp_path / "d.md").read_text()
    assert "method `clean-only` (1 recorded training session(s))" in sheet, sheet
    assert "Latest audit (" in sheet and "0 copy" in sheet and "No audit" not in sheet
    assert f"`{project / 'prepared'}`" in sheet


def test_the_evidence_names_no_path_of_where_the_project_was(moved: tuple[Path, Path]) -> None:
    project, original = moved
    evidence = [project / "runs" / "chain" / "run.json", project / "prepared" / "card.json",
                *sorted((project / "ledger").rglob("*.parquet"))]
    for path in evidence:
        assert str(original).encode() not in path.read_bytes(), path
    assert json.loads((project / "runs" / "chain" / "run.json").read_text())["data"] == "../../prepared"
    card = json.loads((project / "prepared" / "card.json").read_text())
    assert card["policy_path"] == "../policy.yaml" and card["root"] is None  # digits: built in


def _copy(moved: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(moved[0], tmp_path / "again", symlinks=True))


def test_a_prepared_directory_moved_inside_the_project_is_found_by_its_fingerprint(
        moved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = _copy(moved, tmp_path)
    (project / "data").mkdir()
    os.rename(project / "prepared", project / "data" / "prepared-v1")
    code, checks = _verify(project, capsys)
    assert code == 0 and _all_pass(checks), checks
    assert str(project / "data" / "prepared-v1") in checks["consumed arrays"]


def test_a_moved_run_without_its_prepared_directory_names_the_path_and_the_flag(
        moved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = _copy(moved, tmp_path)
    shutil.move(project / "prepared", tmp_path / "kept-apart")
    for args in (("verify", "--run", project / "runs" / "chain", "--ledger", project / "ledger"),
                 ("report", "--datasheet", tmp_path / "d.md", "--run", project / "runs" / "chain", "--ledger", project / "ledger")):
        capsys.readouterr()
        assert _guard(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[0].startswith("error: ") and err[1].startswith("hint: "), err
        assert f"{project / 'runs' / 'chain' / 'run.json'}: data: the prepared directory {project / 'prepared'} is not there" in err[0]
        assert "--data" in err[1] and "Traceback" not in "".join(err)
    code, checks = _verify(project, capsys, "--data", tmp_path / "kept-apart")
    assert code == 0 and _all_pass(checks), checks
    assert "(outside the project)" in checks["consumed arrays"]
    assert _guard("report", "--datasheet", tmp_path / "d.md", "--run", project / "runs" / "chain", "--ledger",
                  project / "ledger", "--data", tmp_path / "kept-apart") == 0


def test_a_moved_project_runs_again_and_a_moved_run_resumes_with_data(
        moved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    project = _copy(moved, tmp_path)
    monkeypatch.chdir(project)
    assert _guard("run", "pipeline.yaml", "--ledger", "ledger") == 0  # the saved config names the deleted original
    assert "train: done" in capsys.readouterr().out.replace("  ", " ")
    shutil.move(project / "prepared", tmp_path / "kept-apart")
    assert _guard("train", "--resume", "runs/chain", "--ledger", "ledger") == 2
    err = capsys.readouterr().err
    assert f"{project / 'runs' / 'chain' / 'run.json'}: data: the prepared directory" in err and "--data" in err
    assert _guard("train", "--resume", "runs/chain", "--ledger", "ledger", "--data", tmp_path / "kept-apart") == 0
