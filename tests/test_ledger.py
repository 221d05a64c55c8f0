"""The compliance ledger: each prepare appends one event, readable with DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from helpers import celeba_policy, write_policy
from sfbd_guard.hashing import sha256_file


def test_prepare_appends_events_readable_with_duckdb(cli, tmp_path: Path, celeba_root: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "p.yaml", celeba_policy(celeba_root, tmp_path / "out"))
    assert cli("prepare", "--policy", path).code == 0
    assert cli("prepare", "--policy", path).code == 2  # output exists: a failed attempt, recorded too
    rows = duckdb.sql(
        f"SELECT kind, status, inputs, outputs, summary, tool_version, command FROM read_parquet('{_isolated_ledger}/**/*.parquet') "
        "ORDER BY started_at"
    ).fetchall()
    assert [(kind, status) for kind, status, *_ in rows] == [("prepare", "ok"), ("prepare", "failed")]
    _kind, _status, inputs, outputs, summary, _version, command = rows[0]
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    # paths inside the project (the ledger's parent, tmp_path) are stored relative to it; the dataset elsewhere absolute
    assert {"role": "policy", "path": "p.yaml", "sha256": sha256_file(path)} in inputs
    assert next(i for i in inputs if i["role"] == "source")["path"] == str(celeba_root.resolve())
    prepared = next(o for o in outputs if o["role"] == "prepared")
    assert prepared["sha256"] == card["fingerprint"] and prepared["path"] == "out"
    arrays = {o["path"].removeprefix("out/"): o["sha256"] for o in outputs if o["role"] == "array"}
    assert arrays == card["files"]
    assert json.loads(summary)["counts"] == card["counts"] and command[:2] == ["guard", "prepare"]
    assert "already exists" in json.loads(rows[1][4])["error"]


def test_ledger_flag_overrides_the_environment(cli, tmp_path: Path, celeba_root: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "p.yaml", celeba_policy(celeba_root, tmp_path / "out"))
    assert cli("prepare", "--policy", path, "--ledger", tmp_path / "mine").code == 0
    assert list((tmp_path / "mine" / "prepare").glob("*.parquet")) and not _isolated_ledger.exists()
