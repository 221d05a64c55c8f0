"""Attacks on the ledger by someone with write access to it (issue 25 §1): an edited, removed, reordered or inserted
event of each kind; a count copied into an event changed against the file whose sha256 the event holds; a chain
rewritten after an edit; a forged head without the signing key; events from before the chain; 30 concurrent writers.

One signed `guard run` (plus an audit of a folder with a planted copy) per module; each test tampers with a copy."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import guard, plant_samples, write_chain

KINDS = ("prepare", "train", "sample", "audit")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("signed")
    pipeline = write_chain(folder)
    assert guard("signkey", "create", "--private", folder / "team.key", "--public", folder / "team.pub") == 0
    assert guard("run", pipeline, "--ledger", folder / "ledger", "--sign-key", folder / "team.key") == 0
    run = folder / "runs" / "chain"
    plant_samples(folder / "prepared", run / "planted", copies=1, novel=0)  # inside the run: an audit of the run
    code = guard("audit", "--samples", run / "planted", "--data", folder / "prepared", "--report", run / "audit-planted",
                 "--config", folder / "audit.yaml", "--ledger", folder / "ledger", "--sign-key", folder / "team.key")
    assert code == 3, "the planted copy is found"
    assert guard("key", "export-digest", folder / "digest.key") == 0
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "project"))


def _verify(project: Path, capsys: pytest.CaptureFixture[str], *extra: object) -> tuple[int, dict[str, tuple[str, str]]]:
    """verify's exit code and {check: (word, detail)}."""
    capsys.readouterr()
    code = guard("verify", "--run", project / "runs" / "chain", "--ledger", project / "ledger",
                 "--digest-key", project / "digest.key", *extra)
    found = {}
    for line in capsys.readouterr().out.splitlines():
        word, _, rest = line.partition("  ")
        if word in ("PASS", "FAIL", "ATTENTION"):
            name, _, detail = rest.partition(": ")
            found[name] = (word, detail)
    return code, found


def _events(ledger: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file, row) of every event, in chain order."""
    rows = [(path, pq.read_table(path).to_pylist()[0]) for path in ledger.glob("*/*.parquet")]
    return sorted(rows, key=lambda r: r[1]["seq"])


def _write(path: Path, row: dict[str, Any]) -> None:
    pq.write_table(pa.Table.from_pylist([row], schema=pq.read_schema(path)), path)


def _first(ledger: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    return next(e for e in _events(ledger) if e[1]["kind"] == kind)


def _edit(ledger: Path, kind: str) -> str:
    path, row = _first(ledger, kind)
    summary = json.loads(row["summary"])
    summary["seconds"] = 0.5 if kind != "audit" else summary.get("seconds")
    if kind == "audit":
        summary["references"] += 1
    summary = {k: v for k, v in summary.items() if v is not None}
    row["summary"] = json.dumps(summary, sort_keys=True)
    _write(path, row)
    return row["event_id"][:12]


def _delete(ledger: Path, kind: str) -> str:
    path, row = _first(ledger, kind)
    path.unlink()
    return row["event_id"][:12]


def _reorder(ledger: Path, kind: str) -> str:
    """Swap the event's place in the chain (seq, prev_sha256) with its neighbour's."""
    events = _events(ledger)
    i = next(i for i, e in enumerate(events) if e[1]["kind"] == kind)
    j = i + 1 if i + 1 < len(events) else i - 1
    (a, ra), (b, rb) = events[i], events[j]
    for key in ("seq", "prev_sha256"):
        ra[key], rb[key] = rb[key], ra[key]
    _write(a, ra)
    _write(b, rb)
    return ra["event_id"][:12]


def _insert(ledger: Path, kind: str) -> str:
    """A second event of `kind` at the same place in the chain (a copy with a new id)."""
    path, row = _first(ledger, kind)
    row["event_id"] = "f" * 32
    target = path.with_name(f"20200101T000000-{'f' * 12}.parquet")
    shutil.copy(path, target)
    _write(target, row)
    return row["event_id"][:12]


TAMPER = {"edit": _edit, "delete": _delete, "reorder": _reorder, "insert": _insert}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tamper", list(TAMPER))
def test_verify_names_a_tampered_event(signed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       tamper: str, kind: str) -> None:
    project = _copy(signed, tmp_path)
    event_id = TAMPER[tamper](project / "ledger", kind)
    code, checks = _verify(project, capsys)
    word, detail = checks["ledger chain"]
    assert code == 1 and word == "FAIL", detail
    if tamper != "delete":
        assert event_id in detail or (tamper == "reorder" and kind in detail), detail
    words = {"edit": "edited", "delete": "removed", "reorder": ("reordered", "edited"), "insert": "inserted"}[tamper]
    assert any(w in detail for w in ([words] if isinstance(words, str) else words)), detail
    print(f"TABLE | {tamper} | {kind} | {detail}")  # the table of the closing note (pytest -s)


def test_count_edit_in_the_audit_event_fails(signed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reproduction of issue 25: the audit event's summary.counts.copy changed from 1 to 0."""
    project = _copy(signed, tmp_path)
    ledger = project / "ledger"
    path, row = [e for e in _events(ledger) if e[1]["kind"] == "audit"][-1]
    summary = json.loads(row["summary"])
    assert summary["counts"]["copy"] == 1
    summary["counts"]["copy"], summary["counts"]["novel"] = 0, summary["counts"]["novel"] + 1
    row["summary"] = json.dumps(summary, sort_keys=True)
    _write(path, row)
    code, checks = _verify(project, capsys)
    assert code == 1
    assert checks["audit"][0] == "FAIL" and "found 1 copy" in checks["audit"][1]
    word, detail = checks["ledger counts"]
    assert word == "FAIL" and row["event_id"][:12] in detail and "summary.counts.copy is 0" in detail
    assert "summary.json says 1" in detail
    assert checks["ledger chain"][0] == "FAIL" and "edited" in checks["ledger chain"][1]
    capsys.readouterr()
    assert guard("report", "--ledger", ledger) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "counts from" in out, "the audits table says its files do not back the event"
    assert guard("report", "--ledger", ledger, "--html", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    assert "summary.counts.copy is 0" in page, "the report's verify table fails the audit's counts"
    assert "the audit&#39;s counts do not match its files" in page or "the audit's counts do not match its files" in page


def test_rewriting_the_chain_after_an_edit_is_caught_by_the_recorded_heads(signed: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An attacker who edits the train event and re-links every later event (and HEAD.json): the chain is whole
    again, but summary.json recorded the head it saw when the audit began."""
    from sfbd_guard.hashing import sha256_file

    project = _copy(signed, tmp_path)
    ledger = project / "ledger"
    shutil.rmtree(ledger / "signatures")
    _edit(ledger, "train")
    events = _events(ledger)
    for (previous, _), (path, row) in itertools.pairwise(events):
        row["prev_sha256"] = sha256_file(previous)
        row["signer"] = None
        _write(path, row)
    last = events[-1][0]
    (ledger / "HEAD.json").write_text(json.dumps({"seq": len(events), "sha256": sha256_file(last),
                                                  "file": last.relative_to(ledger).as_posix()}))
    code, checks = _verify(project, capsys)
    word, detail = checks["ledger chain"]
    assert code == 1 and word == "FAIL" and "summary.json" in detail and "rewritten" in detail, detail


def test_forged_head_without_the_key_fails(signed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The newest event edited and HEAD.json rewritten: the chain alone cannot tell (it says so), the signature can;
    re-signed with another key, the --ledger-key check refuses it."""
    from sfbd_guard.hashing import sha256_file
    from sfbd_guard.keys.signing import create_keypair, load_private_key
    from sfbd_guard.ledger import Head, sign_head

    project = _copy(signed, tmp_path)
    ledger = project / "ledger"
    path, row = _events(ledger)[-1]
    summary = json.loads(row["summary"])
    summary["counts"]["copy"], summary["counts"]["novel"] = 0, summary["counts"]["novel"] + 1
    row["summary"] = json.dumps(summary, sort_keys=True)
    _write(path, row)
    head = Head(row["seq"], sha256_file(path))
    (ledger / "HEAD.json").write_text(json.dumps({**head.as_dict(), "file": path.relative_to(ledger).as_posix()}))
    code, checks = _verify(project, capsys)
    assert code == 1 and checks["ledger chain"][0] == "PASS"
    assert "cannot detect someone who rewrites every event after an edit" in checks["ledger chain"][1]
    assert checks["ledger signatures"][0] == "FAIL" and "edited after it was signed" in checks["ledger signatures"][1]
    create_keypair(tmp_path / "forger.key", tmp_path / "forger.pub")  # the forger signs with a key of their own
    forger = load_private_key(tmp_path / "forger.key")
    from sfbd_guard.keys.signing import key_fingerprint

    row["signer"] = key_fingerprint(forger.public_key())
    _write(path, row)
    head = Head(row["seq"], sha256_file(path))
    (ledger / "HEAD.json").write_text(json.dumps({**head.as_dict(), "file": path.relative_to(ledger).as_posix()}))
    sign_head(ledger, head, forger)
    _, checks = _verify(project, capsys)
    assert checks["ledger signatures"][0] == "ATTENTION", "verified only with the key it carries"
    code, checks = _verify(project, capsys, "--ledger-key", project / "team.pub")
    word, detail = checks["ledger signatures"]
    assert code == 1 and word == "FAIL" and "not one of the --ledger-key keys" in detail, detail


def test_untouched_signed_ledger_passes_with_the_team_key(signed: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = _verify(signed, capsys, "--ledger-key", signed / "team.pub")
    assert checks["ledger chain"][0] == "PASS" and checks["ledger signatures"][0] == "PASS", checks
    assert checks["ledger counts"][0] == "PASS" and checks["audit"][0] == "FAIL" and code == 1  # the planted copy
    rows = [row for _, row in _events(signed / "ledger")]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)) and all(r["signer"] for r in rows)
    run = json.loads((signed / "runs" / "chain" / "run.json").read_text())
    assert run["ledger_head"]["seq"] == 1, "the head when training began: the prepare event"
    card = json.loads((signed / "prepared" / "card.json").read_text())
    assert card["ledger_head"] == {"seq": 0, "sha256": ""}, "prepare began on an empty ledger"
    capsys.readouterr()
    assert guard("report", "--ledger", signed / "ledger", "--model-card", tmp_path / "card", "--run", signed / "runs" / "chain") == 0
    head = json.loads((signed / "ledger" / "HEAD.json").read_text())
    assert f"sha256: {head['sha256']}" in (tmp_path / "card" / "README.md").read_text(), "the model card names the head"


def _legacy_event(ledger: Path, kind: str = "sample", when: str = "2020-01-01") -> Path:
    """An event as written before the chain: the old schema, without seq, prev_sha256 and signer."""
    from datetime import UTC, datetime

    from sfbd_guard.ledger import event_schema

    schema = pa.schema([f for f in event_schema() if f.name not in ("seq", "prev_sha256", "signer")])
    at = datetime.fromisoformat(when).replace(tzinfo=UTC)
    row = {"event_id": f"{kind}{when}".replace("-", "").ljust(32, "0"), "kind": kind, "started_at": at,
           "finished_at": at, "status": "failed", "tool_version": "0", "command": ["guard", kind], "inputs": [],
           "outputs": [], "summary": json.dumps({"error": "x"})}
    path = ledger / kind / f"{at:%Y%m%dT%H%M%S}-{row['event_id'][:12]}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row], schema=schema), path)
    return path


def test_events_before_the_chain_are_attention_and_one_slipped_in_later_fails(tmp_path: Path) -> None:
    from sfbd_guard.compliance.tamper import check_chain
    from sfbd_guard.contracts.events import read_events
    from sfbd_guard.ledger import EventDraft, write_event

    ledger = tmp_path / "ledger"
    _legacy_event(ledger, "sample", "2020-01-01")
    check = check_chain(ledger, read_events(ledger))
    assert check.word == "ATTENTION" and "before the ledger's hash chain existed" in check.detail
    write_event(ledger, EventDraft(kind="run", command=["guard", "run"]), status="failed")
    check = check_chain(ledger, read_events(ledger))
    assert check.word == "ATTENTION" and "older event(s) written before the chain existed" in check.detail
    _legacy_event(ledger, "train", "2099-01-01")  # no chain fields, written after the chain began
    check = check_chain(ledger, read_events(ledger))
    assert check.word == "FAIL" and "inserted" in check.detail and "train event" in check.detail


def _append(ledger: str, i: int) -> None:
    from sfbd_guard.ledger import EventDraft, write_event

    write_event(Path(ledger), EventDraft(kind="run", command=["guard", "run", str(i)]), status="failed")


def test_thirty_concurrent_writers_keep_the_chain(tmp_path: Path) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from sfbd_guard.compliance.tamper import check_chain
    from sfbd_guard.contracts.events import read_events

    ledger = tmp_path / "ledger"
    with ProcessPoolExecutor(30, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_append, [str(ledger)] * 30, range(30)))
    events = read_events(ledger)
    assert sorted(e.seq for e in events) == list(range(1, 31))
    check = check_chain(ledger, events)
    assert check.word == "PASS" and "30 events linked" in check.detail, check.detail


def test_dropping_the_newest_event_is_caught_by_head_and_signature(signed: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    project = _copy(signed, tmp_path)
    ledger = project / "ledger"
    path, row = _events(ledger)[-1]
    path.unlink()
    code, checks = _verify(project, capsys)
    assert code == 1 and "were removed: HEAD.json names" in checks["ledger chain"][1], checks["ledger chain"]
    assert "which the ledger no longer has (removed)" in checks["ledger signatures"][1]
    (ledger / "HEAD.json").unlink()  # the attacker removes the evidence too: the signature still names it
    (ledger / "signatures" / f"{row['seq']:08d}.json").unlink()
    code, checks = _verify(project, capsys)
    assert checks["ledger chain"][0] == "PASS" and "drops the newest events" in checks["ledger chain"][1]


def test_a_copied_ledger_that_cannot_resolve_the_run_is_an_error(signed: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--ledger` at a copy elsewhere (its paths resolve against the copy's folder): no card or datasheet of unknowns."""
    copy = Path(shutil.copytree(signed / "ledger", tmp_path / "elsewhere" / "ledger"))
    run = signed / "runs" / "chain"
    capsys.readouterr()
    for flag in ("--model-card", "--datasheet"):
        target = tmp_path / ("card" if flag == "--model-card" else "sheet.md")
        assert guard("report", "--ledger", copy, flag, target, "--run", run, "--data", signed / "prepared") == 2
        err = capsys.readouterr().err
        assert f"records no finished training of {run}" in err and "Traceback" not in err, err
        assert not (target / "README.md").exists() and not (target.is_file())


def test_head_and_signature_files_as_fifos_are_never_waited_on(tmp_path: Path) -> None:
    import os

    from sfbd_guard.compliance.tamper import check_chain, check_signatures
    from sfbd_guard.contracts.events import read_events
    from sfbd_guard.ledger import EventDraft, write_event

    ledger = tmp_path / "ledger"
    write_event(ledger, EventDraft(kind="run", command=["guard", "run"]), status="failed")
    (ledger / "HEAD.json").unlink()
    os.mkfifo(ledger / "HEAD.json")
    (ledger / "signatures").mkdir()
    os.mkfifo(ledger / "signatures" / "00000001.json")
    write_event(ledger, EventDraft(kind="run", command=["guard", "run"]), status="failed")  # the head found by a scan
    events = read_events(ledger)
    assert sorted(e.seq for e in events) == [1, 2] and check_chain(ledger, events).word == "PASS"
    check = check_signatures(ledger, events)
    assert check.word == "FAIL" and "not a signature file" in check.detail


def test_removing_every_signature_file_is_caught(signed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The events name their signers: deleting the whole signatures folder (so no signature is left to check) fails."""
    project = _copy(signed, tmp_path)
    shutil.rmtree(project / "ledger" / "signatures")
    code, checks = _verify(project, capsys)
    assert code == 1 and checks["ledger signatures"][0] == "FAIL", checks.get("ledger signatures")
    assert "its signature file is missing" in checks["ledger signatures"][1]
