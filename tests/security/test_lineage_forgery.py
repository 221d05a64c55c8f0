"""Attacks on a run's lineage (init): hiding where its weights came from, or swapping an ancestor.

A child (B, started from A) is verified after each forgery; each must fail the lineage check:
- run.json's lineage deleted (the run claims random weights): the ledger's train event recorded the lineage;
- the ancestor's weights replaced and run.json's recorded sha256 rewritten to match: the ledger still holds the
  original lineage;
- an ancestor whose training the ledger does not record (trained into another ledger): the chain cannot be
  checked, which is a FAIL, not a pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import digits_policy, key_file, tiny_pipeline, write_policy
from helpers import guard as _guard


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("family")
    ledger = tmp / "ledger"
    policy = digits_policy(tmp / "prepared", drop=0.8)
    policy["noise"]["key_file"] = str(key_file(tmp / "keys"))
    assert _guard("prepare", "--policy", write_policy(tmp / "policy.yaml", policy), "--ledger", ledger) == 0
    for name, init in (("a", ()), ("b", ("--init", tmp / "runs" / "a"))):
        pipeline = write_policy(tmp / f"{name}.yaml", tiny_pipeline(tmp / "prepared", tmp / "runs" / name))
        assert _guard("train", "--pipeline", pipeline, "--ledger", ledger, *init) == 0
    return {"a": tmp / "runs" / "a", "b": tmp / "runs" / "b", "ledger": ledger, "tmp": tmp}


def _lineage(run: Path, ledger: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    _guard("verify", "--run", run, "--ledger", ledger, "--json")
    return next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "lineage")


def test_deleting_the_lineage_is_caught_against_the_ledger(family: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = family["b"] / "run.json"
    kept = run.read_text()
    try:
        record = json.loads(kept)
        record["lineage"] = []  # "trained from random weights"
        run.write_text(json.dumps(record))
        check = _lineage(family["b"], family["ledger"], capsys)
        assert check["status"] == "FAIL" and "run.json's lineage (0 generation(s))" in check["detail"]
        assert "is not the one the ledger's train event recorded (1 generation(s))" in check["detail"]
    finally:
        run.write_text(kept)
    assert _lineage(family["b"], family["ledger"], capsys)["status"] != "FAIL"


def test_a_swapped_ancestor_with_a_rewritten_sha256_is_caught(family: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from sfbd_guard.hashing import sha256_file

    run = family["b"] / "run.json"
    kept = run.read_text()
    record = json.loads(kept)
    weights = Path(record["lineage"][0]["weights"])
    original = weights.read_bytes()
    try:
        forged = bytearray(original)
        forged[-1] ^= 1  # other weights (a model trained on anything)
        weights.write_bytes(bytes(forged))
        record["lineage"][0]["weights_sha256"] = sha256_file(weights)  # and run.json made to agree with them
        run.write_text(json.dumps(record))
        check = _lineage(family["b"], family["ledger"], capsys)
        assert check["status"] == "FAIL" and "ledger's train event recorded" in check["detail"]
    finally:
        weights.write_bytes(original)
        run.write_text(kept)


def test_an_ancestor_this_ledger_never_saw_trained_cannot_pass(family: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-ledger"  # a run from A recorded into a ledger that never saw A trained
    pipeline = write_policy(tmp_path / "c.yaml", tiny_pipeline(family["tmp"] / "prepared", tmp_path / "c"))
    assert _guard("train", "--pipeline", pipeline, "--ledger", other, "--init", family["a"], "--allow-unrecorded") == 0
    check = _lineage(tmp_path / "c", other, capsys)
    assert check["status"] == "FAIL" and "records no finished training" in check["detail"]
