"""An unexpected error (a bug, MemoryError) or Ctrl-C in a recorded command still leaves its ledger event."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import read_events


def _events(ledger: Path) -> list[dict]:
    table = read_events(ledger)
    return [] if table is None else table.to_pylist()


def test_a_bug_inside_the_recorded_work_is_a_failed_event(cli, tmp_path: Path, _isolated_ledger: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import service

    def bug(*_: object, **__: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(service, "sample", bug)
    with pytest.raises(RuntimeError, match="boom"):  # a bug still surfaces as itself
        cli("sample", "--run", tmp_path, "--n", 1, "--out", tmp_path / "s")
    (event,) = _events(_isolated_ledger)
    assert event["kind"] == "sample" and event["status"] == "failed"
    assert json.loads(event["summary"])["error"] == "RuntimeError: boom"


def test_memory_error_before_the_work_starts_is_a_failed_event(cli, tmp_path: Path, _isolated_ledger: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import service

    def exhausted(*_: object, **__: object) -> None:
        raise MemoryError

    monkeypatch.setattr(service, "pipeline_for_new_run", exhausted)
    with pytest.raises(MemoryError):
        cli("train", "--pipeline", tmp_path / "p.yaml")
    (event,) = _events(_isolated_ledger)
    assert event["kind"] == "train" and event["status"] == "failed"
    assert json.loads(event["summary"])["error"] == "MemoryError"


def test_ctrl_c_is_an_interrupted_event_and_exit_130(cli, tmp_path: Path, _isolated_ledger: Path,  # type: ignore[no-untyped-def]
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import service

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "sample", interrupted)
    result = cli("sample", "--run", tmp_path, "--n", 1, "--out", tmp_path / "s")
    assert result.code == 130 and "Traceback" not in result.err
    (event,) = _events(_isolated_ledger)
    assert event["kind"] == "sample" and event["status"] == "interrupted"
    assert json.loads(event["summary"])["error"] == "KeyboardInterrupt"


def test_one_event_per_failure(cli, tmp_path: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    """A GuardError inside `recorded` is written there once, not again by the CLI."""
    result = cli("sample", "--run", tmp_path, "--n", 1, "--out", tmp_path / "s")
    assert result.code == 2
    assert [e["status"] for e in _events(_isolated_ledger)] == ["failed"]
