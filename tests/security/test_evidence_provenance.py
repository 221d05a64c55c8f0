"""Issue 12 §4: a prepared directory is trusted only with a ledger prepare event (or a signature), and its
card's counts must be those of its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.errors import VerificationError
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.card import Card
from sfbd_guard.prepared.reader import find_prepare_event, open_prepared


@pytest.fixture(scope="module")
def unrecorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared with the library function: no prepare event in any ledger."""
    tmp = tmp_path_factory.mktemp("unrecorded")
    return prepare(load_policy(write_policy(tmp / "p.yaml", digits_policy(tmp / "prepared", drop=0.75)))).output


def _train_events(ledger: Path) -> list[tuple[str, dict]]:
    rows = duckdb.sql(f"SELECT status, summary FROM read_parquet('{ledger}/train/*.parquet') ORDER BY started_at").fetchall()
    return [(status, json.loads(summary)) for status, summary in rows]


def test_unrecorded_directory_is_refused_then_accepted_with_the_flag(unrecorded: Path, tmp_path: Path, cli,  # type: ignore[no-untyped-def]
                                                                      _isolated_ledger: Path) -> None:
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(unrecorded, tmp_path / "run"))
    refused = cli("train", "--pipeline", pipeline)
    assert refused.code == 1 and "Traceback" not in refused.err  # the provenance check failed
    first = refused.err.splitlines()[0]
    assert first.startswith("error: ") and "no prepare event" in first and "--allow-unrecorded" in first
    assert not (tmp_path / "run").exists()
    assert [status for status, _ in _train_events(_isolated_ledger)] == ["failed"]

    accepted = cli("train", "--pipeline", pipeline, "--allow-unrecorded")
    assert accepted.code == 0, accepted.err
    status, summary = _train_events(_isolated_ledger)[-1]
    assert status == "ok" and summary["unrecorded_data"] is True and summary["prepare_event"] is None
    assert summary["verify_key_sha256"] is None and summary["noise_check"]["min_ratio"] > summary["noise_check"]["tau"]

    verified = cli("verify", "--run", tmp_path / "run")
    lines = {line.split(":")[0]: line for line in verified.out.splitlines()}
    assert verified.code == 1 and lines["FAIL  provenance"] and "--allow-unrecorded" in lines["FAIL  provenance"]
    assert "PASS  noise statistics" in lines


def test_resume_of_an_unrecorded_run_needs_the_flag_again(unrecorded: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(unrecorded, tmp_path / "run"))
    assert cli("train", "--pipeline", pipeline, "--allow-unrecorded").code == 0
    assert cli("train", "--resume", tmp_path / "run").code == 1
    assert cli("train", "--resume", tmp_path / "run", "--allow-unrecorded").code == 0


def test_prepare_then_train_in_one_ledger_is_recorded(tmp_path: Path, cli, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.75))
    assert cli("prepare", "--policy", policy).code == 0
    card = json.loads((tmp_path / "prepared" / "card.json").read_text())
    event = find_prepare_event(_isolated_ledger, Card.model_validate(card))
    assert event is not None
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "prepared", tmp_path / "run"))
    assert cli("train", "--pipeline", pipeline).code == 0
    _, summary = _train_events(_isolated_ledger)[-1]
    assert summary["prepare_event"] == event and summary["unrecorded_data"] is False
    # another team's ledger has no such event
    other = cli("train", "--pipeline", pipeline, "--out", tmp_path / "other", "--ledger", tmp_path / "other-ledger")
    assert other.code == 1 and "no prepare event" in other.err


def test_a_prepare_event_for_other_counts_or_sigma_does_not_match(tmp_path: Path, cli, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.75))
    assert cli("prepare", "--policy", policy).code == 0
    card = json.loads((tmp_path / "prepared" / "card.json").read_text())
    assert find_prepare_event(_isolated_ledger, Card.model_validate(card)) is not None
    for key, value in (("sigma", 0.7), ("counts", {**card["counts"], "clean": 0}), ("policy_sha256", "0" * 64),
                       ("files", {**card["files"], "clean/shard-00000.npy": "0" * 64})):
        assert find_prepare_event(_isolated_ledger, Card.model_validate({**card, key: value})) is None, key
    assert find_prepare_event(tmp_path / "no-ledger", Card.model_validate(card)) is None


def _copy_with_card(source: Path, out: Path, **changes: object) -> Path:
    copy = Path(shutil.copytree(source, out))
    card = json.loads((copy / "card.json").read_text())
    card.update(changes)
    (copy / "card.json").write_text(json.dumps(card))
    return copy


def test_card_counts_that_do_not_match_the_manifest_are_refused(unrecorded: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    card = json.loads((unrecorded / "card.json").read_text())
    counts = {**card["counts"], "protected": card["counts"]["protected"] + 5, "excluded": card["counts"]["excluded"] - 5}
    copy = _copy_with_card(unrecorded, tmp_path / "counts", counts=counts)
    with pytest.raises(VerificationError, match=r"counts .* do not match the manifest"):
        open_prepared(copy)
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(copy, tmp_path / "run"))
    result = cli("train", "--pipeline", pipeline, "--allow-unrecorded")
    assert result.code == 1 and "do not match the manifest" in result.err and "Traceback" not in result.err

    rules = {**card["rule_counts"], "licensed": card["rule_counts"]["licensed"] - 3, "rest": card["rule_counts"]["rest"] + 3}
    with pytest.raises(VerificationError, match="rule_counts"):
        open_prepared(_copy_with_card(unrecorded, tmp_path / "rules", rule_counts=rules))
    policy = {**card["policy"], "noise": {**card["policy"]["noise"], "sigma": 0.3}}
    with pytest.raises(VerificationError, match=r"is not its policy's noise\.sigma"):
        open_prepared(_copy_with_card(unrecorded, tmp_path / "sigma", policy=policy))
