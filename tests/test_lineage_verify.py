"""guard verify of a lineage (compliance/lineage.py), on three generations recorded in one ledger:

A (clean-only on the digits' licensed tenth) → B (--init A) → C (SFBD from B on a policy that holds the licensed
tenth out and protects the rest: no clean record). Then:
- verify C with the owner's digest key: the lineage passes (no ancestor trained on a record C's policy protects,
  nor on a near copy of one: the digits' originals are readable here);
  without the key: ATTENTION, saying what was not compared;
- A's weights changed after B started from them: verify C fails naming A;
- D (--init B) on a policy that protects the licensed tenth: verify D fails, naming an image A and B trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import digits_policy, key_file, tiny_pipeline, write_policy
from helpers import guard as _guard

SFBD = {"pretrain_kimg": 0, "rounds": 1, "round_kimg": 0.032, "pretrain_until": "kimg"}


@pytest.fixture(scope="module")
def generations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("generations")
    ledger = tmp / "ledger"
    keys = key_file(tmp / "keys")
    prepared = {}
    for name, licensed in (("licensed", "clean"), ("held", "holdout"), ("protecting", None)):
        policy = digits_policy(tmp / f"prepared-{name}", drop=0.8)
        policy["name"] = f"digits-{name}"
        policy["noise"]["key_file"] = str(keys)
        rules = [r for r in policy["rules"] if r["name"] != "licensed" or licensed is not None]
        for rule in rules:
            if rule["name"] == "licensed":
                rule["action"] = licensed
        policy["rules"] = rules
        assert _guard("prepare", "--policy", write_policy(tmp / f"{name}.yaml", policy), "--ledger", ledger) == 0
        prepared[name] = tmp / f"prepared-{name}"

    def run(name: str, data: Path, *init: object, **overrides: object) -> Path:
        pipeline = write_policy(tmp / f"pipe-{name}.yaml", tiny_pipeline(data, tmp / "runs" / name, **overrides))
        assert _guard("train", "--pipeline", pipeline, "--ledger", ledger, *init) == 0
        return tmp / "runs" / name

    a = run("a", prepared["licensed"])
    b = run("b", prepared["licensed"], "--init", a)
    c = run("c", prepared["held"], "--init", b, method="sfbd", schedule=SFBD)
    d = run("d", prepared["protecting"], "--init", b, method="sfbd", schedule=SFBD)
    weights = a / "checkpoints" / (a / "checkpoints" / "latest").read_text().strip() / "ema.safetensors"
    assert _guard("import-weights", weights, "--licence", "CC-BY-4.0", "--source", "a model from elsewhere",
                  "--out", tmp / "imported", "--ledger", ledger) == 0
    e = run("e", prepared["held"], "--init", tmp / "imported", method="sfbd", schedule=SFBD)
    assert _guard("key", "export-digest", tmp / "digest.key", "--noise-key", keys) == 0
    return {"a": a, "b": b, "c": c, "d": d, "e": e, "ledger": ledger, "digest": tmp / "digest.key", "tmp": tmp}


def _lineage_check(run: Path, ledger: Path, *args: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = _guard("verify", "--run", run, "--ledger", ledger, "--json", *args)
    checks = json.loads(capsys.readouterr().out)["checks"]
    return code, next(c for c in checks if c["name"] == "lineage")


def test_a_clean_lineage_verifies_with_the_owners_key(generations: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    g = generations
    _code, check = _lineage_check(g["c"], g["ledger"], "--digest-key", g["digest"], capsys=capsys)
    assert check["status"] == "PASS", check["detail"]
    assert check["detail"].startswith("2 generation(s), parent first: b (PASS") and "a (PASS" in check["detail"]
    assert check["detail"].count("no near copy of a protected original") == 2  # the digits' originals are readable
    _, without = _lineage_check(g["c"], g["ledger"], capsys=capsys)
    assert without["status"] == "ATTENTION" and "needs the owner's digest key" in without["detail"]


def test_an_ancestor_trained_on_a_protected_record_fails(generations: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    g = generations
    code, check = _lineage_check(g["d"], g["ledger"], "--digest-key", g["digest"], capsys=capsys)
    assert code == 1 and check["status"] == "FAIL"
    assert "b (FAIL: " in check["detail"] and "that this policy protects or excludes" in check["detail"]


def test_a_changed_ancestor_checkpoint_fails_naming_it(generations: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    g = generations
    latest = g["a"] / "checkpoints" / (g["a"] / "checkpoints" / "latest").read_text().strip() / "ema.safetensors"
    kept = g["tmp"] / "kept.safetensors"
    shutil.copy(latest, kept)
    try:
        data = bytearray(latest.read_bytes())
        data[-1] ^= 1
        latest.write_bytes(bytes(data))
        code, check = _lineage_check(g["c"], g["ledger"], "--digest-key", g["digest"], capsys=capsys)
        assert code == 1 and check["status"] == "FAIL"
        assert "a (FAIL: its weights" in check["detail"] and "sha256 differs" in check["detail"]
    finally:
        shutil.copy(kept, latest)


def test_imported_weights_are_a_root_shown_as_declared(generations: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from sfbd_guard.contracts.run_record import read_run_record

    g = generations
    [link] = read_run_record(g["e"]).lineage
    assert link.declared == {"licence": "CC-BY-4.0", "source": "a model from elsewhere"} and link.data_fingerprint is None
    _code, check = _lineage_check(g["e"], g["ledger"], "--digest-key", g["digest"], capsys=capsys)
    assert check["status"] == "ATTENTION" and "imported weights, declared" in check["detail"] and "not verified" in check["detail"]


def test_import_weights_refuses_what_it_cannot_vouch_for(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    import pickle

    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"w": 1}))
    result = cli("import-weights", pickled, "--licence", "MIT", "--source", "x", "--out", tmp_path / "p")
    assert result.code == 2 and "cannot read it as safetensors" in result.err
    torch_file = tmp_path / "model.pt"
    torch_file.write_bytes(b"PK")
    result = cli("import-weights", torch_file, "--licence", "MIT", "--source", "x", "--out", tmp_path / "t")
    assert result.code == 2 and "safetensors only" in result.err
    result = cli("import-weights", pickled, "--licence", "not a licence!", "--source", "x", "--out", tmp_path / "l")
    assert result.code == 2 and "not an SPDX licence expression" in result.err
    assert not any((tmp_path / name).exists() for name in ("p", "t", "l"))


def test_the_model_card_lists_the_lineage(generations: dict[str, Path], tmp_path: Path) -> None:
    g = generations
    assert _guard("report", "--ledger", g["ledger"], "--model-card", tmp_path / "c", "--run", g["c"]) == 0
    card = (tmp_path / "c" / "README.md").read_text()
    lineage = card.split("## Lineage", 1)[1].split("##", 1)[0]
    assert lineage.index("`b`") < lineage.index("`a`") and lineage.count("method `clean-only`") == 2
    assert "weights_sha256" in card.split("---")[1]  # in the card's metadata too
    assert _guard("report", "--ledger", g["ledger"], "--model-card", tmp_path / "e", "--run", g["e"]) == 0
    assert "as declared by the user, not verified" in (tmp_path / "e" / "README.md").read_text()
    assert _guard("report", "--ledger", g["ledger"], "--model-card", tmp_path / "a", "--run", g["a"]) == 0
    assert "Trained from random weights" in (tmp_path / "a" / "README.md").read_text()


def test_the_compliance_report_lists_the_chain_with_a_verdict_per_link(generations: dict[str, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    g = generations
    capsys.readouterr()
    _guard("verify", "--run", g["c"], "--ledger", g["ledger"], "--json", "--digest-key", g["digest"])
    check = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "lineage")
    assert [item.split(" (")[0] for item in check["items"]] == ["b", "a"]
    assert _guard("report", "--ledger", g["ledger"], "--html", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    assert "<li>b (" in page and "<li>a (" in page
