"""Issue 22 §3: inputs that crashed or surprised. Each ends in exit 0 with the data intact, or in one line on
stderr, exit 2 and a `failed` ledger event; never a traceback, never a hang, never a silent overwrite.

- Parquet metadata of types DuckDB cannot read (float16, decimal256) is converted without loss; two columns of
  one name (also without case) are refused as ambiguous; other odd Arrow types never crash.
- `guard report --format csv|parquet` writes list/struct/map/union/interval columns as JSON text.
- A FIFO given as a key, a config or a file of a prepared/sample folder is refused at once (subprocesses with
  a timeout, so a regression fails instead of hanging the suite).
- `guard sample --out` refuses a folder holding images unless `--overwrite`.
- Report folders are created owner-only; an existing audit report folder others can open is refused.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import digits_policy, guard, lineage, read_events, tiny_pipeline, write_policy

ROWS = 4


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _images() -> pa.Array:
    return pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(ROWS)])


def _parquet_policy(root: Path, table: pa.Table, out: Path, where: str = "record_id LIKE '%000000000'") -> Path:
    """A Parquet dataset of one file (`table`) and a policy whose exclude rule runs `where` in DuckDB."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / "a.parquet")
    policy = {"version": 1, "name": "pq", "dataset": {"format": "parquet", "root": str(root / "data"), "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": where}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(out)}
    return write_policy(root / "policy.yaml", policy)


def _one_line(result: Any, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert "Traceback" not in result.err and lines[0].startswith("error: "), result.err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return str(lines[0])


def _failed_event(ledger: Path, line: str) -> None:
    events = read_events(ledger)
    assert events is not None, "no ledger event"
    failed = [e for e in events.to_pylist() if e["status"] == "failed"]
    assert failed and json.loads(failed[-1]["summary"])["error"] in line, events.to_pylist()


# --- Parquet metadata --------------------------------------------------------------------------------------------

def test_parquet_float16_and_decimal256_metadata_reach_the_rules(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Was a DuckDB NotImplementedException traceback ("Unsupported Internal Arrow Type e" / "d:40,2,256")."""
    table = pa.table({"image": _images(), "score": pa.array(np.arange(ROWS, dtype=np.float16)),
                      "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(ROWS)], pa.decimal256(30, 2)),
                      "huge": pa.array([decimal.Decimal("1" * 41 + ".5")] * ROWS, pa.decimal256(45, 1))})
    policy = _parquet_policy(tmp_path, table, tmp_path / "out", where="score > 1.5 AND price > 1 AND huge IS NOT NULL")
    result = cli("prepare", "--policy", policy)
    assert result.code == 0, result.err
    manifest = lineage(tmp_path / "out")  # the owner's full manifest: the trainer's keeps no metadata by default
    assert manifest.schema.field("score").type == pa.float32()
    assert manifest.schema.field("price").type == pa.decimal128(30, 2)
    assert manifest.schema.field("huge").type == pa.string()  # 45 digits: more than DuckDB's 38, kept exactly as text
    rows = {r["record_id"]: r for r in manifest.to_pylist()}
    assert [rows[f"a.parquet/{i:09d}"]["partition"] for i in range(ROWS)] == ["protected", "protected", "excluded", "excluded"]
    assert rows["a.parquet/000000003"]["price"] == decimal.Decimal("3.25")
    assert rows["a.parquet/000000000"]["huge"] == "1" * 41 + ".5"


@pytest.mark.parametrize("names", [("label", "label"), ("image", "image"), ("opt_out", "OPT_OUT"), ("sha256", "source_sha256")],
                         ids=["same-name", "two-image-columns", "names-differing-in-case", "name-and-its-renamed-twin"])
def test_parquet_columns_of_one_name_are_refused(cli, tmp_path: Path, _isolated_ledger: Path,  # type: ignore[no-untyped-def]
                                                  names: tuple[str, str]) -> None:
    """Two columns of one name: which one is the opt-out? Was a KeyError traceback (or the later twin silently dropped)."""
    columns = {"image": _images(), "first": pa.array([False, True, False, False]), "second": pa.array([True] * ROWS)}
    table = pa.Table.from_arrays(list(columns.values()), names=["image", *names]) if names[0] != "image" else \
        pa.Table.from_arrays([_images(), _images()], names=list(names))
    line = _one_line(cli("prepare", "--policy", _parquet_policy(tmp_path, table, tmp_path / "out")),
                     "a.parquet", repr(names[0]), "ambiguous")
    assert not (tmp_path / "out").exists()
    _failed_event(_isolated_ledger, line)


ODD_COLUMNS: dict[str, Callable[[], pa.Array]] = {
    "float16": lambda: pa.array(np.arange(ROWS, dtype=np.float16)),
    "decimal256": lambda: pa.array([decimal.Decimal("1.5")] * ROWS, pa.decimal256(40, 2)),
    "dictionary": lambda: pa.array(["a", "b", "a", "b"]).dictionary_encode(),
    "large_string": lambda: pa.array(["a", "b", "c", "d"], pa.large_string()),
    "null": lambda: pa.nulls(ROWS),
    "time64": lambda: pa.array([1, 2, 3, 4], pa.time64("ns")),
    "timestamp-tz": lambda: pa.array([1, 2, 3, 4], pa.timestamp("ns", tz="Europe/Paris")),
    "duration": lambda: pa.array([1, 2, 3, 4], pa.duration("s")),
    "struct": lambda: pa.array([{"a": np.float16(i), "b": [1]} for i in range(ROWS)]),
    "list-float16": lambda: pa.array([[1.0]] * ROWS, pa.list_(pa.float16())),
    "uuid-extension": lambda: pa.ExtensionArray.from_storage(pa.uuid(), pa.array([bytes(16)] * ROWS, pa.binary(16))),
}


@pytest.mark.parametrize("kind", list(ODD_COLUMNS))
def test_odd_arrow_metadata_types_never_crash_prepare(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Scalar columns reach the rules (converted if DuckDB cannot read them); nested ones as JSON text; none crash."""
    table = pa.table({"image": _images(), "x": ODD_COLUMNS[kind]()})
    result = cli("prepare", "--policy", _parquet_policy(tmp_path, table, tmp_path / "out"))
    assert result.code == 0, result.err
    manifest = lineage(tmp_path / "out")  # the owner's full manifest: the trainer's keeps no metadata by default
    assert manifest.num_rows == ROWS and manifest.column("partition").to_pylist().count("excluded") == 1


@pytest.mark.parametrize("kind", ["float16", "decimal256", "dictionary", "struct", "list-float16", "uuid-extension"])
def test_records_table_of_any_reader_is_readable_by_the_rules(kind: str) -> None:
    """The records table's conversion (every reader's metadata goes through it) leaves nothing DuckDB refuses,
    and loses no value."""
    import duckdb

    from sfbd_guard.curation.records import _check_part
    from sfbd_guard.datasets import Part

    column = ODD_COLUMNS[kind]()
    table = _check_part(pa.table({"record_id": [f"r{i}" for i in range(ROWS)], "x": column}), Part(0, "p"), "test")
    con = duckdb.connect()
    con.register("records", table)
    assert con.sql("SELECT count(*) FROM records WHERE x IS NOT NULL").fetchall() == [(ROWS,)]
    original = column.storage if isinstance(column, pa.ExtensionArray) else column
    expected = [str(v) for v in original.to_pylist()] if kind == "decimal256" else original.to_pylist()  # 40 digits: text
    assert table.column("x").to_pylist() == expected


# --- a small prepared directory and its ledger, shared by the tests below ----------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet dataset prepared once (its ledger at root/ledger); the tests copy what they damage."""
    root = tmp_path_factory.mktemp("issue22")
    policy = _parquet_policy(root, pa.table({"image": _images(), "label": list(range(ROWS))}), root / "prepared")
    assert guard("prepare", "--policy", policy, "--ledger", root / "ledger") == 0
    samples = root / "samples"
    samples.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # noise: nothing like the flat originals
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(samples / f"s{i}.png")
    return root / "prepared"


# --- guard report formats -------------------------------------------------------------------------------------------

ODD_SQL = ("SELECT INTERVAL 1 DAY AS i, union_value(k := 1) AS u, MAP {'k': 1} AS m, {'a': [1, 2]} AS s, "
           "[INTERVAL 2 DAY] AS li, 1.5::DECIMAL(38, 3) AS d")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json", "table"])
@pytest.mark.parametrize("sql", ["SELECT * FROM events", ODD_SQL], ids=["events", "odd-types"])
def test_report_writes_every_column_type_in_every_format(cli, tmp_path: Path, prepared: Path, fmt: str, sql: str) -> None:  # type: ignore[no-untyped-def]
    """Was a traceback: pyarrow writes no list column as CSV, no interval or union as CSV or Parquet."""
    ledger = prepared.parent / "ledger"
    output = tmp_path / "new" / f"out.{fmt}"
    result = cli("report", "--ledger", ledger, "--sql", sql, "--format", fmt, "--output", output)
    assert result.code == 0 and "Traceback" not in result.err, result.err
    printed = cli("report", "--ledger", ledger, "--sql", sql, "--format", fmt) if fmt != "parquet" else None
    assert printed is None or printed.code == 0, printed.err if printed else None
    if fmt in ("csv", "table"):
        rows = list(csv.DictReader(io.StringIO(output.read_text())))
    elif fmt == "parquet":
        rows = pq.read_table(output).to_pylist()
    else:
        rows = json.loads(output.read_text())
    assert rows
    if sql == ODD_SQL and fmt in ("csv", "table"):  # CSV: nested values as JSON text
        assert json.loads(rows[0]["s"]) == {"a": [1, 2]} and json.loads(rows[0]["m"]) == [["k", 1]]
    if sql == ODD_SQL and fmt == "parquet":  # Parquet keeps lists, structs and maps; unions and intervals as JSON
        assert rows[0]["s"] == {"a": [1, 2]} and json.loads(rows[0]["u"]) == 1 and json.loads(rows[0]["i"]) == [0, 1, 0]
    elif sql != ODD_SQL:
        inputs = rows[0]["inputs"]
        assert isinstance(json.loads(inputs) if isinstance(inputs, str) else inputs, list)
    assert stat.S_IMODE(output.parent.stat().st_mode) == 0o700  # a folder the report creates is owner-only


def test_report_column_that_cannot_be_written_is_named(cli, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("report", "--ledger", prepared.parent / "ledger", "--sql", "SELECT 1 AS ok, '\\xff'::BLOB AS b",
                 "--format", "csv")
    _one_line(result, "'b'", "CSV")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("issue22-run")
    write_policy(root / "policy.yaml", digits_policy(root / "prepared", drop=0.8))
    write_policy(root / "pipeline.yaml", tiny_pipeline(root / "prepared", root / "run"))
    assert guard("prepare", "--policy", root / "policy.yaml", "--ledger", root / "ledger") == 0
    assert guard("train", "--pipeline", root / "pipeline.yaml", "--ledger", root / "ledger") == 0
    return root / "run"


# --- FIFOs ------------------------------------------------------------------------------------------------------------

def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _pipeline(prepared: Path, tmp: Path, **extra: object) -> Path:
    return write_policy(tmp / "pipeline.yaml", tiny_pipeline(prepared, tmp / "run", **extra))


def _damaged_prepared(prepared: Path, tmp: Path, name: str) -> Path:
    copy = Path(shutil.copytree(prepared, tmp / "prepared"))
    (copy / name).unlink()
    _fifo(copy / name)
    return copy


def _samples_with_fifo_listing(prepared: Path, tmp: Path) -> Path:
    samples = Path(shutil.copytree(prepared.parent / "samples", tmp / "samples"))
    _fifo(samples / "samples.json")
    return samples


def _run_copy(run: Path, tmp: Path, fifo: str | None = None) -> Path:
    copy = Path(shutil.copytree(run, tmp / "run"))
    if fifo:
        (copy / fifo).unlink()
        _fifo(copy / fifo)
    return copy


# (id, build(prepared, tmp) -> argv, a fragment of the error line); each FIFO used to be opened and waited on.
# A case that needs the trained run takes it from tmp / "trained" (a copy).
FIFO_CASES: list[tuple[str, Callable[[Path, Path], list[object]], str]] = [
    ("train-verify-key", lambda p, t: ["train", "--pipeline", _pipeline(p, t), "--verify-key", _fifo(t / "owner.pub")],
     "owner.pub"),
    ("pipeline-verify-key", lambda p, t: (_fifo(t / "owner.pub"), ["train", "--pipeline", _pipeline(p, t, verify_key="owner.pub")])[1],
     "owner.pub"),
    ("verify-verify-key", lambda p, t: ["verify", "--run", t.parent / "trained" / "run", "--verify-key", _fifo(t / "owner.pub")],
     "owner.pub"),
    ("sample-run-json", lambda p, t: ["sample", "--run", _run_copy(t.parent / "trained" / "run", t, "run.json"), "--n", 1,
                                      "--out", t / "drawn"], "run.json"),
    ("train-pipeline", lambda p, t: ["train", "--pipeline", _fifo(t / "pipeline.yaml")], "pipeline.yaml"),
    ("run-pipeline", lambda p, t: ["run", _fifo(t / "pipeline.yaml")], "pipeline.yaml"),
    ("prepare-policy", lambda p, t: ["prepare", "--policy", _fifo(t / "policy.yaml")], "policy.yaml"),
    ("prepare-noise-key", lambda p, t: ["prepare", "--policy", p.parent / "policy.yaml", "--out", t / "o",
                                        "--noise-key", _fifo(t / "noise.key")], "noise.key"),
    ("prepare-sign-key", lambda p, t: ["prepare", "--policy", p.parent / "policy.yaml", "--out", t / "o",
                                       "--sign-key", _fifo(t / "owner.key")], "owner.key"),
    ("audit-config", lambda p, t: ["audit", "--samples", p.parent / "samples", "--data", p, "--report", t / "r",
                                   "--config", _fifo(t / "audit.yaml")], "audit.yaml"),
    ("audit-samples-json", lambda p, t: ["audit", "--samples", _samples_with_fifo_listing(p, t), "--data", p,
                                         "--report", t / "r"], "samples.json"),
    ("audit-card-json", lambda p, t: ["audit", "--samples", p.parent / "samples", "--data",
                                      _damaged_prepared(p, t, "card.json"), "--report", t / "r"], "card.json"),
    ("audit-manifest", lambda p, t: ["audit", "--samples", p.parent / "samples", "--data",
                                     _damaged_prepared(p, t, "manifest.parquet"), "--report", t / "r"], "manifest.parquet"),
]


RUN_CASES = ("verify-verify-key", "sample-run-json")


@pytest.mark.parametrize("case, build, fragment", [pytest.param(i, b, f, id=i) for i, b, f in FIFO_CASES])
def test_fifo_is_refused_not_waited_on(tmp_path: Path, prepared: Path, trained: Path, case: str,
                                       build: Callable[[Path, Path], list[object]], fragment: str) -> None:
    work = tmp_path / "case"
    work.mkdir()
    ledger = tmp_path / "ledger"
    if case in RUN_CASES:  # the trained run, its prepared directory and its ledger, at their relative places
        shutil.copytree(trained.parent, tmp_path / "trained", symlinks=True)
        shutil.copytree(tmp_path / "trained" / "ledger", ledger)
    else:
        shutil.copytree(prepared.parent / "ledger", ledger)  # the prepared directory's provenance
    argv = [str(a) for a in build(prepared, work)]
    env = {**os.environ, "GUARD_LEDGER": str(ledger), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "sfbd_guard.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"guard {' '.join(argv[:2])} waited on a FIFO")
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), done.stderr
    if argv[0] != "verify":  # verify is read-only: it records no event
        _failed_event(ledger, lines[0])


# --- guard sample --out, and audit report folders ------------------------------------------------------------------

def test_sample_refuses_a_folder_of_images_without_overwrite(cli, tmp_path: Path, trained: Path,  # type: ignore[no-untyped-def]
                                                             _isolated_ledger: Path) -> None:
    """Was exit 0 with the user's 000000.png replaced by a sample."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "000000.png").write_bytes(_png(1))
    (photos / "trip").mkdir()
    (photos / "trip" / "beach.jpg").write_bytes(b"a holiday")
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    line = _one_line(cli("sample", "--run", trained, "--n", 2, "--steps", 2, "--out", photos), str(photos), "--overwrite")
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before
    _failed_event(_isolated_ledger, line)


def test_sample_overwrite_replaces_its_own_previous_set(cli, tmp_path: Path, trained: Path) -> None:  # type: ignore[no-untyped-def]
    """An empty folder is fine; a re-run needs --overwrite, rewrites the set and removes what the old set had more."""
    out = tmp_path / "drawn"
    out.mkdir()
    assert cli("sample", "--run", trained, "--n", 4, "--steps", 2, "--out", out).code == 0
    (out / "notes.txt").write_text("mine")
    assert cli("sample", "--run", trained, "--n", 2, "--steps", 2, "--out", out).code == 2
    assert len(list(out.glob("0*.png"))) == 4
    result = cli("sample", "--run", trained, "--n", 2, "--steps", 2, "--out", out, "--overwrite")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png", "notes.txt", "samples.json"]
    assert json.loads((out / "samples.json").read_text())["images"] == ["000000.png", "000001.png"]


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701])
def test_audit_refuses_a_report_folder_others_can_open(cli, tmp_path: Path, prepared: Path, _isolated_ledger: Path,  # type: ignore[no-untyped-def]
                                                       mode: int) -> None:
    """The report page shows protected originals: was written into the shared folder, exit 0."""
    report = tmp_path / "shared"
    report.mkdir()
    os.chmod(report, mode)
    result = cli("audit", "--samples", prepared.parent / "samples", "--data", prepared, "--report", report)
    line = _one_line(result, str(report), f"chmod 700 {report}")
    assert list(report.iterdir()) == []
    _failed_event(_isolated_ledger, line)


def test_audit_report_folder_and_its_new_parents_are_owner_only(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    report = tmp_path / "reports" / "today"
    result = cli("audit", "--samples", prepared.parent / "samples", "--data", prepared, "--report", report)
    assert result.code == 0, result.err
    assert stat.S_IMODE(report.stat().st_mode) == 0o700 and stat.S_IMODE(report.parent.stat().st_mode) == 0o700
    os.chmod(report, 0o700)
    assert cli("audit", "--samples", prepared.parent / "samples", "--data", prepared, "--report", report).code == 0
