"""Attacks on `guard membership`'s report and inputs.

- Exfiltration: the report is made from the protected originals, and must hold nothing of their pixels: a few
  numbers per image (one error per noise level, a score), in an owner-only folder, and no picture.
- Forgery: a consistent forgery (scores rewritten to look like chance and membership.json recomputed from them, so
  the files agree with each other) is caught by guard verify against the sha256 the ledger's event holds.
- Hostile inputs: a weights file that is not the run's network, a control trained on other data, a report folder
  others can read: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import digits_run_with_holdout

SIGMAS = 5  # the default noise levels


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return digits_run_with_holdout(tmp_path_factory.mktemp("membership-attacks"))


@pytest.fixture(scope="module")
def report(digits_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sfbd_guard.auditing.config import resolve_audit_config
    from sfbd_guard.auditing.model_audit import membership_recorded

    folder = tmp_path_factory.mktemp("membership-report")
    config = resolve_audit_config(None, {"membership.max_images": 48, "membership.bootstrap": 200})
    membership_recorded(run=digits_run[1], report=folder / "report", config=config, ledger=folder / "ledger",
                        command=["guard", "membership"])
    return folder / "report"


def test_the_report_holds_no_pixels_of_a_protected_original(report: Path) -> None:
    assert stat.S_IMODE(report.stat().st_mode) == 0o700
    table = pq.read_table(report / "membership.parquet")
    assert table.schema.names == ["model", "group", "record_id", "errors", "score"]
    assert pa.types.is_list(table.schema.field("errors").type)
    assert {len(row) for row in table.column("errors").to_pylist()} == {SIGMAS}  # 5 numbers, never an image (64)
    assert all(pa.types.is_floating(table.schema.field(name).type) for name in ("score",))
    page = (report / "membership.html").read_text()
    assert "<img" not in page and "data:image" not in page
    summary = json.loads((report / "membership.json").read_text())
    numbers = [len(v) for v in _lists(summary)]
    assert max(numbers) <= SIGMAS  # no long array hidden in the summary either


def _lists(value: object) -> list[list[object]]:
    if isinstance(value, dict):
        return [found for v in value.values() for found in _lists(v)]
    if isinstance(value, list):
        return [value, *[found for v in value for found in _lists(v)]]
    return []


def test_a_consistent_forgery_is_caught_against_the_ledger(report: Path, tmp_path: Path) -> None:
    from sfbd_guard.auditing.config import MembershipSpec
    from sfbd_guard.auditing.model_audit import group_results, recompute, scores_of
    from sfbd_guard.compliance.verify import check_membership
    from sfbd_guard.contracts.events import read_events
    from sfbd_guard.hashing import sha256_file

    forged = tmp_path / "report"
    shutil.copytree(report, forged)
    ledger = report.parent / "ledger"
    events = read_events(ledger)
    table = pq.read_table(forged / "membership.parquet")
    rng = np.random.default_rng(0)
    table = table.set_column(4, "score", pa.array(rng.standard_normal(table.num_rows)))  # every group like chance
    pq.write_table(table, forged / "membership.parquet")
    summary = json.loads((forged / "membership.json").read_text())
    spec = MembershipSpec(sigmas=summary["sigmas"], draws=summary["draws"], seed=summary["seed"],
                          bootstrap=summary["bootstrap"], margin=summary["margin"], max_images=summary["max_images"])
    again = group_results(scores_of(table), spec, summary["groups"][1]["control_note"])
    summary["groups"] = [g.model_dump(mode="json") for g in again]
    summary["scores_sha256"] = sha256_file(forged / "membership.parquet")
    (forged / "membership.json").write_text(json.dumps(summary))
    assert recompute(forged) == []  # the two files agree with each other: put the forgery where the ledger says
    shutil.move(str(report), str(tmp_path / "original"))
    shutil.copytree(forged, report)
    try:
        [check] = check_membership(events, Path(json.loads((report / "membership.json").read_text())["model"]["run"]),
                                   ledger.parent)
        assert not check.passed and "sha256" in check.detail
    finally:
        shutil.rmtree(report)
        shutil.move(str(tmp_path / "original"), str(report))


def test_hostile_inputs_are_one_line_and_exit_2(digits_run: tuple[Path, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _data, run = digits_run
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped)
    for weights in swapped.glob("checkpoints/*/ema.safetensors"):
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty safetensors header
    result = cli("membership", "--run", swapped, "--report", tmp_path / "r1")
    assert result.code == 2 and "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 2

    other = tmp_path / "other-data"
    shutil.copytree(run, other)
    record = json.loads((other / "run.json").read_text())
    record["data_fingerprint"] = "0" * 64
    (other / "run.json").write_text(json.dumps(record))
    result = cli("membership", "--run", run, "--control", other, "--report", tmp_path / "r2")
    assert result.code == 2 and "trained on prepared data" in result.err

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    result = cli("membership", "--run", run, "--report", shared)
    assert result.code == 2 and "group or others can open this folder" in result.err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists() and not any(shared.iterdir())
