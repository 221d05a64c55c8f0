"""Issue 12 §4: Ed25519 signatures of card.json for prepared directories handed to another team."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import duckdb
import pytest

from helpers import digits_policy, tiny_pipeline, write_policy
from helpers import guard as _guard


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The data owner's key pair and a signed prepared directory (prepared into the owner's own ledger)."""
    folder = tmp_path_factory.mktemp("owner")
    assert _guard("signkey", "create", "--private", folder / "owner.key", "--public", folder / "owner.pub") == 0
    policy = write_policy(folder / "policy.yaml", digits_policy(folder / "prepared", drop=0.75))
    assert _guard("prepare", "--policy", policy, "--sign-key", folder / "owner.key", "--ledger", folder / "owner-ledger") == 0
    return folder / "owner.key", folder / "owner.pub", folder / "prepared"


def _summary(ledger: Path, kind: str) -> dict:
    (summary,) = duckdb.sql(f"SELECT summary FROM read_parquet('{ledger}/{kind}/*.parquet') ORDER BY started_at DESC LIMIT 1").fetchall()[0]
    return json.loads(summary)


def test_keys_and_signature_files(owner: tuple[Path, Path, Path]) -> None:
    key, public, prepared = owner
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    signature = json.loads((prepared / "card.sig").read_text())
    assert set(signature) == {"algorithm", "public_key_sha256", "signature"} and signature["algorithm"] == "ed25519"
    secret = key.read_bytes()
    for path in prepared.rglob("*"):  # nothing of the private key in the directory that is handed out
        assert not path.is_file() or secret not in path.read_bytes()
    assert _summary(key.parent / "owner-ledger", "prepare")["signed_by"] == signature["public_key_sha256"]


def test_a_signed_directory_trains_for_another_team(owner, tmp_path: Path, cli, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    _, public, prepared = owner
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run"))
    assert cli("train", "--pipeline", pipeline).code == 1, "the other team's ledger has no prepare event"
    trained = cli("train", "--pipeline", pipeline, "--verify-key", public)
    assert trained.code == 0, trained.err
    summary = _summary(_isolated_ledger, "train")
    signer = json.loads((prepared / "card.sig").read_text())["public_key_sha256"]
    assert summary["verify_key_sha256"] == signer and summary["unrecorded_data"] is False and summary["prepare_event"] is None
    verified = cli("verify", "--run", tmp_path / "run", "--verify-key", public)
    assert "PASS  provenance" in verified.out and "PASS  signature" in verified.out and "PASS  noise statistics" in verified.out
    unkeyed = cli("verify", "--run", tmp_path / "run")
    assert unkeyed.code == 1 and "FAIL  provenance" in unkeyed.out


def test_the_pipeline_names_the_verify_key(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _, public, prepared = owner
    shutil.copy(public, tmp_path / "owner.pub")
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run", verify_key="owner.pub"))
    assert cli("train", "--pipeline", pipeline).code == 0
    assert cli("train", "--resume", tmp_path / "run").code == 0  # the saved config keeps the key


def _altered(prepared: Path, out: Path, **changes: object) -> Path:
    copy = Path(shutil.copytree(prepared, out))
    card = json.loads((copy / "card.json").read_text())
    card.update(changes)
    (copy / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return copy


def test_an_altered_card_fails_the_signature(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _, public, prepared = owner
    altered = _altered(prepared, tmp_path / "altered", policy_name="something else")
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(altered, tmp_path / "run"))
    result = cli("train", "--pipeline", pipeline, "--verify-key", public)
    assert result.code == 1 and "does not verify" in result.err and "card.json was changed" in result.err
    assert not (tmp_path / "run").exists()
    # --allow-unrecorded does not excuse a bad signature when a key is given
    assert cli("train", "--pipeline", pipeline, "--verify-key", public, "--allow-unrecorded").code == 1


def test_a_re_fingerprinted_forgery_fails_the_signature(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from test_evidence_forgery import forge

    _, public, prepared = owner
    forged = forge(prepared, tmp_path / "forged")
    shutil.copy(prepared / "card.sig", forged / "card.sig")  # the forger keeps the owner's signature file
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(forged, tmp_path / "run"))
    result = cli("train", "--pipeline", pipeline, "--verify-key", public)
    assert result.code == 1 and "signature of card.json does not verify" in result.err


def test_a_wrong_public_key_or_a_missing_signature_fails(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _, _, prepared = owner
    assert cli("signkey", "create", "--private", tmp_path / "other.key", "--public", tmp_path / "other.pub").code == 0
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run"))
    wrong = cli("train", "--pipeline", pipeline, "--verify-key", tmp_path / "other.pub")
    assert wrong.code == 1 and "made by another key" in wrong.err
    unsigned = Path(shutil.copytree(prepared, tmp_path / "unsigned"))
    (unsigned / "card.sig").unlink()
    pipeline = write_policy(tmp_path / "q.yaml", tiny_pipeline(unsigned, tmp_path / "run"))
    missing = cli("train", "--pipeline", pipeline, "--verify-key", tmp_path / "other.pub")
    assert missing.code == 1 and "no card.sig" in missing.err
    not_a_key = cli("train", "--pipeline", pipeline, "--verify-key", pipeline)
    assert not_a_key.code == 2 and "not a PEM public key" in not_a_key.err and "Traceback" not in not_a_key.err


def test_verify_fails_the_signature_check_of_an_altered_card(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _, public, prepared = owner
    copy = Path(shutil.copytree(prepared, tmp_path / "copy"))
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(copy, tmp_path / "run"))
    assert cli("train", "--pipeline", pipeline, "--verify-key", public).code == 0
    card = json.loads((copy / "card.json").read_text())
    (copy / "card.json").write_text(json.dumps({**card, "policy_name": "x"}, indent=2, sort_keys=True) + "\n")
    result = cli("verify", "--run", tmp_path / "run", "--verify-key", public)
    assert result.code == 1 and "FAIL  signature" in result.out and "FAIL  provenance" in result.out


def test_a_private_key_readable_by_others_is_refused(owner, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    key, _, _ = owner
    loose = tmp_path / "loose.key"
    shutil.copy(key, loose)
    os.chmod(loose, 0o644)
    policy = write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.75))
    result = cli("prepare", "--policy", policy, "--sign-key", loose)
    assert result.code == 2 and "readable by group or others (mode 0644)" in result.err and "chmod 600" in result.err
    assert not (tmp_path / "prepared").exists()
    assert cli("signkey", "create", "--private", loose, "--public", tmp_path / "new.pub").code == 2  # never overwritten
    assert not (tmp_path / "new.pub").exists()
