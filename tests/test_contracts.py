"""The contracts (sfbd_guard/contracts/): card.json, run.json, the audit summary and the ledger events.

For each contract, a corrupt file, a missing key and a mistyped key end, through the CLI command that reads
it, in exit 2 with one line naming the file and the key (never a traceback). The ledger's views are generated
from the event models: every view column of a real chain's events is filled where the event had the value,
and a field renamed in a model (a copy of it) leaves a column NULL, which the same check catches.
Hashing keeps its outputs byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import guard as _guard
from helpers import read_events, tiny_pipeline, write_policy
from sfbd_guard.contracts.events import SUMMARIES, ArtifactColumn, EventSummary, SummaryColumn, TrainSummary
from sfbd_guard.contracts.events import read_events as read_typed_events


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare → train → sample → audit through `guard run`, then guard membership: an event of every kind with a view."""
    folder = tmp_path_factory.mktemp("contracts-chain")
    policy = {"version": 1, "name": "digits-contracts", "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "dropped", "action": "exclude", "sample": {"fraction": 0.8, "seed": 5}},
                        {"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.6}, "output": "prepared"}
    write_policy(folder / "policy.yaml", policy)
    pipeline = tiny_pipeline(Path("prepared"), Path("run"), policy="policy.yaml", sample={"n": 4, "steps": 2, "batch": 4})
    write_policy(folder / "pipeline.yaml", pipeline)
    assert _guard("run", folder / "pipeline.yaml", "--ledger", folder / "ledger") == 0
    from PIL import Image

    unseen = folder / "unseen"  # a holdout for the membership test: images no run saw
    unseen.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(unseen / f"{i:02d}.png")
    assert _guard("membership", "--run", folder / "run", "--holdout", unseen, "--max-images", 24, "--report",
                  folder / "membership", "--ledger", folder / "ledger") in (0, 3)
    return folder


def _one_line(result: Any, *fragments: str) -> str:
    """Exit 2, `error: ...` on one line (and at most a hint), no traceback; the line holds every fragment."""
    lines = result.err.strip().splitlines()
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err and lines and lines[0].startswith("error: "), result.err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, result.err)
    return lines[0]


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None] | str) -> None:
    if isinstance(edit, str):
        path.write_text(edit)
        return
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# (id, edit, fragments of the error line besides the file name)
CARD_CASES = [
    ("corrupt", "{\"sigma\": 0.6,", ("not valid JSON",)),
    ("missing-key", lambda c: c.pop("sigma"), ("sigma: required key is missing",)),
    ("wrong-type", lambda c: c.update(resolution="eight"), ("resolution:", "'eight'")),
    ("nested-wrong-type", lambda c: c["counts"].update(clean="12"), ("counts.clean:",)),
    ("nested-missing", lambda c: c["policy"]["noise"].pop("sigma"), ("policy.noise.sigma: required key is missing",)),
]


@pytest.mark.parametrize("edit, fragments", [pytest.param(e, f, id=i) for i, e, f in CARD_CASES])
def test_card_faults_are_one_line_naming_file_and_key_for_train_and_audit(chain: Path, tmp_path: Path, cli,  # type: ignore[no-untyped-def]
                                                                           edit: Any, fragments: tuple[str, ...]) -> None:
    prepared = Path(shutil.copytree(chain / "prepared", tmp_path / "prepared"))
    _edit_json(prepared / "card.json", edit)
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run"))
    train = _one_line(cli("train", "--pipeline", pipeline, "--allow-unrecorded"), f"{prepared}/card.json: ", *fragments)
    audit = _one_line(cli("audit", "--samples", chain / "run" / "samples", "--data", prepared, "--report", tmp_path / "a"),
                      f"{prepared}/card.json: ", *fragments)
    assert train == audit, "training and the audit check a prepared directory with the same code"
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "a").exists()


RUN_CASES = [
    ("corrupt", "{not json", ("not valid JSON",)),
    ("missing-key", lambda r: r.pop("data_fingerprint"), ("data_fingerprint: required key is missing",)),
    ("wrong-type", lambda r: r.update(image_shape=[1, "8", 8]), ("image_shape[1]:",)),
    ("wrong-length", lambda r: r.update(image_shape=[1, 8]), ("image_shape:",)),
]


@pytest.mark.parametrize("edit, fragments", [pytest.param(e, f, id=i) for i, e, f in RUN_CASES])
def test_run_record_faults_are_one_line_naming_file_and_key(chain: Path, tmp_path: Path, cli, edit: Any,  # type: ignore[no-untyped-def]
                                                            fragments: tuple[str, ...]) -> None:
    run = Path(shutil.copytree(chain / "run", tmp_path / "run"))
    _edit_json(run / "run.json", edit)
    _one_line(cli("sample", "--run", run, "--n", 1, "--steps", 2, "--out", tmp_path / "s"), f"{run}/run.json: ", *fragments)
    _one_line(cli("report", "--ledger", chain / "ledger", "--datasheet", tmp_path / "d.md", "--run", run),
              f"{run}/run.json: ", *fragments)


AUDIT_CASES = [
    ("corrupt", "{\"counts\": ", ("not valid JSON",)),
    ("missing-key", lambda s: s.pop("thresholds"), ("thresholds: required key is missing",)),
    ("wrong-type", lambda s: s["flagged"].update(count="none"), ("flagged.count:",)),
]


@pytest.mark.parametrize("edit, fragments", [pytest.param(e, f, id=i) for i, e, f in AUDIT_CASES])
def test_audit_summary_faults_are_one_line_naming_file_and_key(chain: Path, tmp_path: Path, cli, edit: Any,  # type: ignore[no-untyped-def]
                                                               fragments: tuple[str, ...]) -> None:
    """`guard run` skips an audited sample set only when the audit's summary.json reads as one."""
    summary = chain / "run" / "audit" / "summary.json"
    original = summary.read_bytes()
    try:
        _edit_json(summary, edit)
        result = cli("run", chain / "pipeline.yaml", "--ledger", tmp_path / "ledger", "--allow-unrecorded")
    finally:
        summary.write_bytes(original)
    _one_line(result, f"{summary}: ", *fragments)


def test_audit_summary_reads_back_as_written(chain: Path) -> None:
    from sfbd_guard.contracts.audit_summary import read_audit_summary
    from sfbd_guard.contracts.base import dump

    summary = read_audit_summary(chain / "run" / "audit")
    assert dump(summary) == json.loads((chain / "run" / "audit" / "summary.json").read_text())
    assert summary.copy_count == summary.counts["copy"] and summary.thresholds.copy_ > 0


def _one_event_file(chain: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    ledger = Path(shutil.copytree(chain / "ledger", tmp_path / "ledger"))
    return ledger, sorted((ledger / kind).glob("*.parquet"))[0]


def _rewrite(path: Path, edit: Callable[[dict[str, Any]], None], schema: pa.Schema | None = None) -> None:
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        edit(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _drop_status(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["status"]), path)


def _summary_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(row: dict[str, Any]) -> None:
        summary = json.loads(row["summary"])
        change(summary)
        row["summary"] = json.dumps(summary)
    return edit


EVENT_CASES: list[tuple[str, str, Callable[[Path], None], tuple[str, ...]]] = [
    ("corrupt", "train", lambda p: p.write_bytes(b"PAR1 not parquet PAR1"), ("not a ledger event file",)),
    ("missing-key", "train", _drop_status, ("status:",)),
    ("missing-summary-key", "prepare", lambda p: _rewrite(p, _summary_edit(lambda s: s.pop("policy_name"))),
     ("summary.policy_name: required key is missing",)),
    ("wrong-type", "train", lambda p: _rewrite(p, _summary_edit(lambda s: s.update(step="eight"))), ("summary.step:",)),
    ("wrong-envelope-type", "sample", lambda p: _rewrite(p, lambda r: r.update(event_id=7),
                                                          pq.read_schema(p).set(0, pa.field("event_id", pa.int64()))),
     ("event_id:",)),
]


@pytest.mark.parametrize("kind, damage, fragments", [pytest.param(k, d, f, id=i) for i, k, d, f in EVENT_CASES])
def test_ledger_event_faults_are_one_line_naming_file_and_key(chain: Path, tmp_path: Path, cli, kind: str,  # type: ignore[no-untyped-def]
                                                              damage: Callable[[Path], None], fragments: tuple[str, ...]) -> None:
    ledger, path = _one_event_file(chain, tmp_path, kind)
    damage(path)
    _one_line(cli("report", "--ledger", ledger), f"{path}: ", *fragments)
    _one_line(cli("verify", "--run", chain / "run", "--ledger", ledger), f"{path}: ", *fragments)


def test_the_writer_refuses_a_summary_that_is_not_its_kinds(tmp_path: Path) -> None:
    from sfbd_guard.ledger import EventDraft, write_event

    draft = EventDraft(kind="sample", command=["guard", "sample"])
    draft.summary.update(count=4, seconds=1.0, steps=2, seed=0, batch=4, sample_count=4)  # a key the model lacks
    with pytest.raises(ValueError, match="sample_count"):
        write_event(tmp_path, draft, status="ok")
    draft.summary = {"seconds": 1.0}  # `count` missing
    with pytest.raises(ValueError, match="count: required key is missing"):
        write_event(tmp_path, draft, status="ok")
    draft.summary = {"seconds": 1.0, "error": "stopped"}  # a failed event holds what it had
    write_event(tmp_path, draft, status="failed")
    (event,) = read_typed_events(tmp_path)
    assert event.status == "failed" and event.summary.error == "stopped" and event.summary.count is None
    other = EventDraft(kind="sample", command=["guard", "sample"])
    other.summary.update(count="many", error="disk full")  # a failure is recorded even if its notes do not fit
    write_event(tmp_path, other, status="failed")
    assert [e.summary.error for e in read_typed_events(tmp_path)] == ["stopped", "disk full"]


# --- the views ---------------------------------------------------------------------------------------------------

def _dig(summary: dict[str, Any], path: str) -> Any:
    value: Any = summary
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def unfilled_cells(ledger: Path, models: dict[str, type[EventSummary]] | None = None) -> list[str]:
    """View cells that are NULL although the event, as written in the ledger's files, has the value (its key
    at the path the shipped model declares). The views are built from `models` (default: the shipped ones)."""
    from sfbd_guard.compliance.views import connect

    raw = {row["event_id"]: row for row in read_events(ledger).to_pylist()}
    con = connect(ledger, models=models)
    problems = []
    for kind, model in SUMMARIES.items():
        if not model.VIEW:
            continue
        rows = {r["event_id"]: r for r in con.sql(f"SELECT * FROM {model.VIEW}").to_arrow_table().to_pylist()}
        expected = [e for e in raw.values() if e["kind"] == kind]
        assert sorted(rows) == sorted(e["event_id"] for e in expected), model.VIEW
        for event in expected:
            summary = json.loads(event["summary"])
            for column in model.COLUMNS:
                if isinstance(column, SummaryColumn):
                    had = _dig(summary, column.field_path)
                elif isinstance(column, ArtifactColumn):
                    found = [a for a in event[column.column] if a["role"] == column.role]
                    had = found[0][column.attribute] if found else None
                else:
                    had = event.get(column.name, "computed")
                if had is not None and rows[event["event_id"]][column.name] is None:
                    problems.append(f"{model.VIEW}.{column.name} is NULL for event {event['event_id'][:8]} ({kind})")
    return problems


def test_every_view_column_is_filled_where_the_event_has_the_value(chain: Path) -> None:
    from sfbd_guard.compliance.views import VIEWS, connect

    assert set(VIEWS) == {"prepares", "trainings", "samplings", "audits", "memberships"}
    assert not unfilled_cells(chain / "ledger")
    con = connect(chain / "ledger")
    for model in SUMMARIES.values():
        if model.VIEW:  # every declared column exists, and the chain's ok event fills every summary column it wrote
            names = [c.name for c in model.COLUMNS]
            (row,) = con.execute(f"SELECT {', '.join(names)} FROM {model.VIEW} WHERE status = 'ok' "
                                 "ORDER BY started_at LIMIT 1").fetchall()
            assert len(row) == len(names)
    (prepare,) = con.execute("SELECT policy, sigma, clean + protected + excluded + error, fingerprint FROM prepares").fetchall()
    card = json.loads((chain / "prepared" / "card.json").read_text())
    assert prepare == ("digits-contracts", 0.6, sum(card["counts"].values()), card["fingerprint"])
    (training,) = con.execute("SELECT method, steps, resumed, run FROM trainings").fetchall()
    assert training == ("clean-only", 8, False, str((chain / "run").resolve()))
    (audit,) = con.execute("SELECT copy + suspect + novel, threshold_method, summary_file FROM audits").fetchall()
    assert audit[0] == 4 and audit[1] == "default" and audit[2].endswith("/audit/summary.json")


def _renamed(model: type[EventSummary], old: str, new: str) -> type[EventSummary]:
    """A copy of `model` whose field `old` is called `new` (and its view columns follow the rename)."""
    from pydantic import create_model

    fields = {(new if name == old else name): (info.annotation, info) for name, info in model.model_fields.items()}
    columns = tuple(SummaryColumn(c.name, new + c.field_path[len(old):]) if isinstance(c, SummaryColumn)
                    and c.field_path.split(".")[0] == old else c for c in model.COLUMNS)
    copy = create_model(f"Renamed{model.__name__}", __base__=EventSummary, **fields)  # type: ignore[call-overload]
    copy.KIND, copy.VIEW, copy.COLUMNS = model.KIND, model.VIEW, columns
    return copy


@pytest.mark.parametrize("kind, old, new", [("train", "step", "steps_done"), ("prepare", "counts", "partition_counts"),
                                            ("audit", "thresholds", "limits"), ("sample", "seed", "sample_seed")])
def test_a_field_renamed_in_a_model_fails_the_views_check(chain: Path, kind: str, old: str, new: str) -> None:
    models = {**SUMMARIES, kind: _renamed(SUMMARIES[kind], old, new)}
    problems = unfilled_cells(chain / "ledger", models)
    assert problems and all(f"({kind})" in p for p in problems), problems


def test_a_view_column_naming_no_field_of_its_model_is_refused() -> None:
    from sfbd_guard.compliance.views import generate_views

    class Broken(TrainSummary):
        COLUMNS: ClassVar = (*TrainSummary.COLUMNS, SummaryColumn("total_steps", "steps_total"))

    with pytest.raises(KeyError, match="steps_total"):
        generate_views({"train": Broken})


# --- card bytes, the tolerant card check, hashing ---------------------------------------------------------------

def test_the_card_writer_writes_the_bytes_of_the_card(chain: Path, tmp_path: Path) -> None:
    from sfbd_guard.prepared.card import read_card, write_card

    card = read_card(chain / "prepared")
    write_card(tmp_path, card)
    assert (tmp_path / "card.json").read_bytes() == (chain / "prepared" / "card.json").read_bytes()
    assert card.image_shape == (1, 8, 8) and not card.invertible_noise and card.exclude_rules() == ["dropped"]


def test_a_card_of_an_earlier_version_is_read(chain: Path, tmp_path: Path) -> None:
    """Cards written before the noise was keyed (noise_seed, no noise_key_*) still read: their noise is invertible."""
    from sfbd_guard.prepared.card import read_card, write_card

    old = json.loads((chain / "prepared" / "card.json").read_text())
    for key in ("noise_key_id", "noise_key_source", "noise_generator"):
        old.pop(key)
    old["noise_seed"] = 0
    (tmp_path / "card.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    card = read_card(tmp_path)
    assert card.invertible_noise and card.noise_key_id is None
    before = (tmp_path / "card.json").read_bytes()
    write_card(tmp_path, card)
    assert (tmp_path / "card.json").read_bytes() == before


def test_the_overwrite_check_uses_the_card_contract_in_its_tolerant_mode(tmp_path: Path) -> None:
    from sfbd_guard.prepared.card import card_problem

    (tmp_path / "card.json").write_text(json.dumps({"fingerprint": "x", "files": {}, "tool_version": "0", "policy_sha256": "y"}))
    assert card_problem(tmp_path) is None  # a card of any version: its identity keys are enough
    (tmp_path / "card.json").write_text(json.dumps({"fingerprint": "x", "files": [], "tool_version": "0", "policy_sha256": "y"}))
    assert "files" in str(card_problem(tmp_path))
    (tmp_path / "card.json").write_text("{")
    assert "does not parse" in str(card_problem(tmp_path))
    (tmp_path / "card.json").unlink()
    (tmp_path / "card.json").symlink_to(tmp_path / "elsewhere.json")
    assert card_problem(tmp_path) == "its card.json is not a card"


def test_hashing_keeps_its_outputs_byte_for_byte(tmp_path: Path) -> None:
    """Values computed with the functions as they were before they moved to hashing.py."""
    from sfbd_guard import hashing

    assert hashing.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "f").write_bytes(b"abc")
    assert hashing.sha256_file(tmp_path / "f") == hashing.sha256_bytes(b"abc")
    fp = "5d3181b47a435655c836ebff07fce92e2afb1c700a8151720b42e5f62fd6d3c8"
    assert hashing.fingerprint({"b": "x", "a": "y", "manifest.parquet": "z"}) == fp
    assert hashing.fingerprint({"manifest.parquet": "z", "a": "y", "b": "x"}) == fp, "independent of the order"
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    digest = "1d64add2a6388367c9bc2d1f1b384b069a6ef382cdaaa89771dd103e28613a25"
    assert hashing.pixel_sha256(pixels) == digest
    assert hashing.pixel_sha256(np.asfortranarray(pixels)) == digest
    assert hashing.unit_rank(7, "rec-1").hex() == "3f5ed7e1e86cc79d05ea65d613f2dc6860c2391f63634586e067dc9be1e51942"
    assert hashing.image_seed(3, 5) == 4005430000755285262
    assert hashing.seeded_subset(["e", "d", "c", "b", "a"], 2, 1) == ["a", "d"]
    assert hashing.json_sha256({"b": 1, "a": [1, 2]}) == "3813f9409eb0095bf9c8e1225c627acf867d89bd18b8856fc38588a0c8c490f3"
    import hmac

    assert hashing.keyed_digest(b"k" * 32, digest) == hmac.new(b"k" * 32, bytes.fromhex(digest), "sha256").hexdigest()


def test_only_hashing_imports_hashlib() -> None:
    """One place for sha256 (the HMACs that key the noise excepted: they are keyed MACs, not hashes)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "sfbd_guard"
    allowed = {package / "hashing.py", package / "curation" / "noise.py", package / "keys" / "secret.py"}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if "hashlib" in names and path not in allowed:
            pytest.fail(f"{path.relative_to(package)} imports hashlib; use sfbd_guard.hashing")
    for path in (package / "curation" / "noise.py", package / "keys" / "secret.py"):
        assert "hashlib.sha256(" not in path.read_text(), path


def test_the_contracts_import_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys, sfbd_guard.contracts, sfbd_guard.hashing; "
            "print(sorted(m for m in ('torch', 'numpy', 'pyarrow', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out

