"""An opt-out is never lost by the Parquet and WebDataset readers (issue 22, part 1, the other readers).

Before: a Parquet list, struct, map or binary column was dropped, and so was a nested WebDataset JSON value; when
one file (or shard) stored `opt_out` that way and the others as a boolean, that file's records got a null opt-out
and were stored as protected (exit 0). A damaged metadata column chunk of a Parquet file gave its rows null
metadata the same way. A policy file (read_csv / read_json / read_parquet in a `where`) with two columns of one
name was read with the second silently renamed (`opt_out_1`). Now nested values reach the rules as their JSON text
(a boolean rule refuses to read `[true]`: exit 2), a column whose type differs between files is text (never null),
a damaged metadata column stops prepare, and a policy file with a repeated column name is refused. The property
tests at the end check the invariant on random per-file / per-shard types against an oracle written here.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import lineage, write_policy

BOOLEAN_RULES = ("opt_out IS TRUE", "coalesce(CAST(opt_out AS BOOLEAN), false)")  # the second: shipped policies'


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (37 * i) % 256, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _parquet(path: Path, columns: dict[str, pa.Array], first: int = 0) -> None:
    rows = len(next(iter(columns.values())))
    image = pa.array([{"bytes": _png(first + i), "path": f"{first + i}.png"} for i in range(rows)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": image, **columns}), path)


def _tar(path: Path, records: dict[str, Any], first: int = 0) -> None:
    """A shard of `records` (key -> the JSON object as text or value; ... for none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (key, meta) in enumerate(records.items()):
            members = [(f"{key}.png", _png(first + i))]
            if meta is not ...:
                members.append((f"{key}.json", (meta if isinstance(meta, str) else json.dumps(meta)).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _policy(tmp: Path, fmt: str, root: Path, where: str, out: str = "out", rules: list[dict] | None = None) -> Path:
    policy = {"version": 1, "name": "nested", "dataset": {"format": fmt, "root": str(root), "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": where},
                        *(rules or []), {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp / out), "dedup": {"enabled": False}}
    return write_policy(tmp / f"{out}.yaml", policy)


def _rows(out: Path) -> dict[str, dict]:
    return {row["record_id"]: row for row in lineage(out).to_pylist()}  # the owner's full manifest (keys/owner.py)


def _refused(result: Any, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.out[-400:], result.err)
    lines = result.err.strip().splitlines()
    assert "Traceback" not in result.err and lines[0].startswith("error: ") and len(lines) <= 2, result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return str(lines[0])


# ---- Parquet ---------------------------------------------------------------------------------------------------

NESTED = {"list": ([True], pa.list_(pa.bool_())), "struct": ({"v": True}, pa.struct([("v", pa.bool_())])),
          "map": ([("v", True)], pa.map_(pa.string(), pa.bool_()))}


@pytest.mark.parametrize("kind", list(NESTED))
def test_parquet_opt_out_nested_in_one_file_stops_a_boolean_rule(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    """The reproduction: b.parquet stores opt_out as [true] (or {"v": true}, a map) where a.parquet stores a
    boolean. Was: b's column dropped, b/0 protected, exit 0."""
    value, kind_type = NESTED[kind]
    root = tmp_path / "data"
    _parquet(root / "a.parquet", {"opt_out": pa.array([False, True, False])})
    _parquet(root / "b.parquet", {"opt_out": pa.array([value, None], kind_type)}, first=3)
    for where in BOOLEAN_RULES:
        _refused(cli("prepare", "--policy", _policy(tmp_path, "parquet", root, where)), "rules[0].where")
        assert not (tmp_path / "out").exists()
    text = {"list": "[true]", "struct": '{"v": true}', "map": '[["v", true]]'}[kind]
    result = cli("prepare", "--policy", _policy(tmp_path, "parquet", root, f"opt_out IN ('true', '{text}')"))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert rows["b.parquet/000000000"]["opt_out"] == text, "the rules saw the JSON text"
    assert {r for r, row in rows.items() if row["partition"] == "excluded"} == {"a.parquet/000000001",
                                                                                "b.parquet/000000000"}


def test_parquet_binary_opt_out_is_read_not_dropped(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A binary opt_out (b"true", as pandas writes bytes) beside boolean files: was dropped (protected)."""
    root = tmp_path / "data"
    _parquet(root / "a.parquet", {"opt_out": pa.array([False, False])})
    _parquet(root / "b.parquet", {"opt_out": pa.array([b"true", b"false"])}, first=2)
    result = cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "opt_out IS TRUE"))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert rows["b.parquet/000000000"]["partition"] == "excluded" and rows["b.parquet/000000000"]["opt_out"] == "true"
    assert rows["a.parquet/000000000"]["opt_out"] == "false", "the boolean file's values are text too, not null"


def test_parquet_second_image_column_reaches_the_rules_but_never_the_manifest(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A second image (a Hugging Face struct or binary) is a column the rules can name, never its bytes."""
    originals = [_png(100 + i) for i in range(3)]
    root = tmp_path / "data"
    _parquet(root / "a.parquet", {"mask": pa.array([{"bytes": png, "path": "m.png"} for png in originals]),
                                  "raw": pa.array(originals), "id": pa.array([b"ab", b"cd", None])})
    result = cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "raw IS NULL"))
    assert result.code == 0, result.err
    manifest = lineage(tmp_path / "out")  # the owner's full manifest: the trainer's keeps no metadata by default
    assert manifest.column("mask").to_pylist()[0] == json.dumps({"bytes": f"<{len(originals[0])} bytes>", "path": "m.png"})
    assert manifest.column("raw").to_pylist()[0] == f"<binary: {len(originals[0])} bytes, not kept>".encode()
    assert manifest.column("id").to_pylist() == [b"ab", b"cd", None], "short binary values are kept as they are"
    written = b"".join(str(v).encode() if not isinstance(v, bytes) else v
                       for column in manifest.columns for v in column.to_pylist())
    assert not any(png[8:40] in written for png in originals), "no source image bytes in the manifest"


def test_parquet_type_conflict_between_files_is_text_never_null(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """opt_out true (boolean) in a.parquet, "yes" (text) in b.parquet, 1 (integer) in c.parquet: the records table
    holds text, each value kept; DuckDB reads `opt_out IS TRUE` over the text; an unreadable value stops."""
    root = tmp_path / "data"
    _parquet(root / "a.parquet", {"opt_out": pa.array([True, False])})
    _parquet(root / "b.parquet", {"opt_out": pa.array(["yes", "no"])}, first=2)
    _parquet(root / "c.parquet", {"opt_out": pa.array([1, 0])}, first=4)
    result = cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "opt_out IS TRUE"))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert [row["opt_out"] for row in rows.values()] == ["true", "false", "yes", "no", "1", "0"]
    assert sorted(r for r, row in rows.items() if row["partition"] == "excluded") == [
        "a.parquet/000000000", "b.parquet/000000000", "c.parquet/000000000"]
    _parquet(root / "b.parquet", {"opt_out": pa.array(["opted out", "no"])}, first=2)
    _refused(cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "opt_out IS TRUE", "again")), "rules[0].where")


def test_parquet_unreadable_metadata_column_stops_prepare(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A damaged page header in a.parquet's opt_out column chunk (its images intact; b.parquet healthy): was null
    metadata for a.parquet's rows, so its opt-out was stored as protected."""
    root = tmp_path / "data"
    path = root / "a.parquet"
    _parquet(root / "b.parquet", {"opt_out": pa.array([False])}, first=3)
    table = pa.table({"image": pa.array([{"bytes": _png(i), "path": None} for i in range(3)]),
                      "opt_out": pa.array([True, False, False])})
    pq.write_table(table, path, compression="none", use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)  # image.bytes, image.path, opt_out
    assert chunk.path_in_schema == "opt_out"
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset: chunk.data_page_offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    line = _refused(cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "opt_out IS TRUE")),
                    "a.parquet", "metadata columns", "cannot be read")
    assert "rows 0-2" in line and not (tmp_path / "out").exists()


# ---- WebDataset ------------------------------------------------------------------------------------------------

def test_webdataset_nested_opt_out_stops_a_boolean_rule(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The reproduction: "opt_out": [true] or {"v": true} in one shard, booleans in the other. Was: the nested
    values dropped on purpose, the records protected, exit 0."""
    root = tmp_path / "shards"
    _tar(root / "00000.tar", {"a": {"opt_out": False}, "b": {"opt_out": True}})
    _tar(root / "00001.tar", {"c": {"opt_out": [True]}, "d": {"opt_out": {"v": True}}}, first=2)
    for where in BOOLEAN_RULES:
        _refused(cli("prepare", "--policy", _policy(tmp_path, "webdataset", root, where)), "rules[0].where")
    result = cli("prepare", "--policy", _policy(tmp_path, "webdataset", root,
                                                "opt_out IN ('true', '[true]', '{\"v\": true}')"))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert {r: row["opt_out"] for r, row in rows.items()} == {"00000/a": "false", "00000/b": "true",
                                                             "00001/c": "[true]", "00001/d": '{"v": true}'}
    assert [r for r, row in rows.items() if row["partition"] != "excluded"] == ["00000/a"]


def test_webdataset_type_conflict_within_and_between_shards_is_text(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "shards"
    _tar(root / "00000.tar", {"a": {"opt_out": True}, "b": {"opt_out": False}})
    _tar(root / "00001.tar", {"c": {"opt_out": "yes"}, "d": {"opt_out": 1}, "e": {"opt_out": None}, "f": ...}, first=2)
    result = cli("prepare", "--policy", _policy(tmp_path, "webdataset", root, "opt_out IS TRUE"))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert [row["opt_out"] for row in rows.values()] == ["true", "false", "yes", "1", None, None]
    assert [r for r, row in rows.items() if row["partition"] == "excluded"] == ["00000/a", "00001/c", "00001/d"]


# ---- policy files ------------------------------------------------------------------------------------------------

def _policy_file(folder: Path, kind: str) -> str:
    if kind in ("csv", "csv-case"):
        second = "opt_out" if kind == "csv" else "OPT_OUT"
        (folder / "optout.csv").write_text(f"file_name,opt_out,{second}\na.png,true,false\nb.png,false,true\n")
        return "read_csv('optout.csv')"
    if kind == "json-case":
        (folder / "optout.jsonl").write_text('{"file_name": "a.png", "opt_out": true}\n'
                                             '{"file_name": "b.png", "OPT_OUT": true}\n')
        return "read_json('optout.jsonl')"
    pq.write_table(pa.Table.from_arrays([pa.array(["a.png", "b.png"]), pa.array([True, False]), pa.array([False, True])],
                                        names=["file_name", "opt_out", "opt_out"]), folder / "optout.parquet")
    return "read_parquet('optout.parquet')"


@pytest.mark.parametrize("kind", ["csv", "csv-case", "json-case", "parquet"])
def test_policy_file_with_a_repeated_column_name_is_refused(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    """DuckDB renames the second `opt_out` (or `OPT_OUT`) to opt_out_1: the rule read only the first, and b.png,
    opted out in the second, was stored as protected."""
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / name)
    call = _policy_file(tmp_path, kind)
    where = f"record_id IN (SELECT file_name FROM {call} WHERE opt_out)"
    line = _refused(cli("prepare", "--policy", _policy(tmp_path, "imagefolder", root, where)),
                    "rules[0].where", repr(call.split("'")[1]), "given more than once")
    assert "opt_out" in line.lower() and not (tmp_path / "out").exists()


def test_policy_file_with_distinct_column_names_is_read(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate(["a.png", "b.png"]):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / name)
    (tmp_path / "optout.csv").write_text("file_name,opt_out,opt_out_1\na.png,false,true\nb.png,true,false\n")
    where = "record_id IN (SELECT file_name FROM read_csv('optout.csv') WHERE opt_out)"
    result = cli("prepare", "--policy", _policy(tmp_path, "imagefolder", root, where))
    assert result.code == 0, result.err
    assert {r: row["partition"] for r, row in _rows(tmp_path / "out").items()} == {"a.png": "protected",
                                                                                   "b.png": "excluded"}


# ---- guard report ----------------------------------------------------------------------------------------------

def test_report_json_is_strict_and_table_output_names_its_own_option(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """NaN was written as `NaN` (not JSON); `--format table --output` said "--format csv" in its error."""
    root = tmp_path / "data"
    _parquet(root / "a.parquet", {"n": pa.array([1, 2])})
    assert cli("prepare", "--policy", _policy(tmp_path, "parquet", root, "n = 1")).code == 0

    def strict(text: str) -> Any:
        def refuse(constant: str) -> None:
            raise ValueError(f"{constant} is not JSON")
        return json.loads(text, parse_constant=refuse)

    sql = "SELECT 'nan'::DOUBLE AS x, ['inf'::DOUBLE, 1.5] AS y, {'z': '-inf'::DOUBLE} AS s"
    result = cli("report", "--sql", sql, "--format", "json")
    assert result.code == 0, result.err
    assert strict(result.out) == [{"x": None, "y": [None, 1.5], "s": {"z": None}}]
    result = cli("report", "--format", "table", "--output", tmp_path / "t.csv")
    line = _refused(result, "--format table --out ", "writes one table")  # --output: the old name of --out
    assert "--format csv" not in line
    result = cli("report", "--sql", "SELECT '\\xff'::BLOB AS b", "--format", "table", "--output", tmp_path / "t.csv")
    line = _refused(result, "--format table --out ", "'b'")
    assert "--format csv" not in line


# ---- the invariant, on random per-file and per-shard types ------------------------------------------------------
# Random Parquet datasets (one to three files, each storing opt_out in a type of its own: boolean, text, integer,
# binary, list, struct, map, all null, or no such column, now and then as OPT_OUT) and random WebDataset datasets
# (one to three shards, each record's opt_out any JSON value: booleans, text, numbers, arrays, objects, null, or
# no key, or no JSON at all). The oracle below says, from the values as written, which records a person meant to
# opt out; `prepare` (the library call) with a boolean rule must refuse (InputError: exit 2) or leave every one of
# them out of clean and protected.

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

YES = ("true", "yes", "1", "t", "y")


def _means_yes(value: object) -> bool:
    """The oracle: a value a person wrote to say "opted out", however it is stored."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    if isinstance(value, bytes):
        return _means_yes(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return value.strip().lower() in YES
    if isinstance(value, dict):
        return any(_means_yes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_means_yes(item) for item in value)
    return False


SCALARS = (True, False, "true", "false", "yes", "no", "YES", "opted out", "", 1, 0, 2, None)
PARQUET_KINDS: dict[str, tuple[pa.DataType | None, Any]] = {  # kind -> (Arrow type, strategy of one value)
    "bool": (pa.bool_(), st.sampled_from([True, False, None])),
    "text": (pa.string(), st.sampled_from(["true", "false", "yes", "no", "Yes", "y", "opted out", "", None])),
    "int": (pa.int64(), st.sampled_from([1, 0, 2, None])),
    "binary": (pa.binary(), st.sampled_from([b"true", b"no", b"yes", None])),
    "list": (pa.list_(pa.bool_()), st.sampled_from([[True], [False], [], None])),
    "struct": (pa.struct([("v", pa.bool_())]), st.sampled_from([{"v": True}, {"v": False}, None])),
    "map": (pa.map_(pa.string(), pa.bool_()), st.sampled_from([[("v", True)], [("v", False)], None])),
    "null": (pa.null(), st.none()),
    "absent": (None, st.none()),
}
JSON_KINDS = {  # a shard's kind of opt_out values; "mixed" draws any value for each record
    "bool": st.sampled_from([True, False, None]), "text": st.sampled_from(["true", "no", "yes", "false", None]),
    "int": st.sampled_from([1, 0, None]), "nested": st.sampled_from([[True], [False], {"v": True}, {"v": "yes"}, []]),
    "mixed": st.sampled_from([*SCALARS, [True], {"v": True}, ...]),
}


@st.composite
def _parquet_data(draw: st.DrawFn) -> list[dict]:
    files = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(list(PARQUET_KINDS)))
        values = draw(st.lists(PARQUET_KINDS[kind][1], min_size=1, max_size=3))
        files.append({"kind": kind, "values": values, "name": draw(st.sampled_from(["opt_out"] * 6 + ["OPT_OUT"]))})
    return files


@st.composite
def _webdataset_data(draw: st.DrawFn) -> list[list[object]]:
    kinds = draw(st.lists(st.sampled_from(list(JSON_KINDS)), min_size=1, max_size=3))
    return [draw(st.lists(JSON_KINDS[kind], min_size=1, max_size=3)) for kind in kinds]


def _prepare_or_refuse(tmp: Path, fmt: str, root: Path, where: str) -> dict[str, str] | None:
    from sfbd_guard.curation.prepare import prepare
    from sfbd_guard.errors import InputError
    from sfbd_guard.policy.model import load_policy

    policy = _policy(tmp, fmt, root, where, rules=[{"name": "some", "action": "clean", "where": "record_id LIKE '%1'"}])
    try:
        prepare(load_policy(policy))
    except InputError as err:
        event(f"{fmt} refused: {str(err)[-70:]}")
        return None
    return {r: row["partition"] for r, row in _rows(tmp / "out").items()}


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_parquet_data(), st.sampled_from(BOOLEAN_RULES))
def test_no_parquet_opt_out_lands_in_clean_or_protected(files: list[dict], where: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nested-pq-") as folder:
        tmp, opted, first = Path(folder), set(), 0
        for index, spec in enumerate(files):
            kind, values = spec["kind"], spec["values"]
            arrow_type = PARQUET_KINDS[kind][0]
            columns = {} if arrow_type is None else {spec["name"]: pa.array(values, arrow_type)}
            columns["n"] = pa.array(range(len(values)))
            _parquet(tmp / "data" / f"{index}.parquet", columns, first)
            first += len(values)
            opted |= {f"{index}.parquet/{row:09d}" for row, value in enumerate(values)
                      if arrow_type is not None and _means_yes(value)}
        partitions = _prepare_or_refuse(tmp, "parquet", tmp / "data", where)
        if partitions is None:
            return
        leaked = sorted(r for r in opted if partitions[r] in ("clean", "protected"))
        assert not leaked, f"opted-out record(s) {leaked} stored as {[partitions[r] for r in leaked]}"
        event(f"parquet prepared, {'some' if opted else 'no'} opt-outs")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_webdataset_data(), st.sampled_from(BOOLEAN_RULES))
def test_no_webdataset_opt_out_lands_in_clean_or_protected(shards: list[list[object]], where: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nested-wds-") as folder:
        tmp, opted, first = Path(folder), set(), 0
        for index, values in enumerate(shards):
            records: dict[str, Any] = {}
            for row, value in enumerate(values):
                records[f"k{row}"] = ... if value is ... else {"opt_out": value, "n": row}
                if value is not ... and _means_yes(value):
                    opted.add(f"{index:05d}/k{row}")
            _tar(tmp / "shards" / f"{index:05d}.tar", records, first)
            first += len(values)
        partitions = _prepare_or_refuse(tmp, "webdataset", tmp / "shards", where)
        if partitions is None:
            return
        leaked = sorted(r for r in opted if partitions[r] in ("clean", "protected"))
        assert not leaked, f"opted-out record(s) {leaked} stored as {[partitions[r] for r in leaked]}"
        event(f"webdataset prepared, {'some' if opted else 'no'} opt-outs")


# ---- CelebA and CIFAR-10: no metadata value becomes null on the way -----------------------------------------------

@pytest.mark.parametrize("change", ["attributes missing", "odd partition"])
def test_celeba_lists_that_would_leave_a_null_value_are_refused(cli, tmp_path: Path, change: str) -> None:  # type: ignore[no-untyped-def]
    """A file without a row in list_attr_celeba.txt got null attributes (`Eyeglasses` excluded nothing); a
    partition value other than 0/1/2 got a null split (a held-out `split = 'test'` rule missed it)."""
    from fixtures.synthetic import write_celeba

    root = write_celeba(tmp_path / "celeba", 4, identities=2)
    if change == "attributes missing":
        lines = (root / "list_attr_celeba.txt").read_text().splitlines()
        (root / "list_attr_celeba.txt").write_text("\n".join(lines[:-1]) + "\n")
        where, fragment = "Eyeglasses OR NOT Eyeglasses", "no attributes for 1 file(s)"
    else:
        lines = (root / "list_eval_partition.txt").read_text().splitlines()
        lines[-1] = lines[-1].split()[0] + " 3"
        (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
        where, fragment = "split = 'test' OR split <> 'test'", "partition '3'"
    policy = {"version": 1, "name": "celeba", "dataset": {"format": "celeba", "root": str(root), "split": "all",
                                                          "resolution": 8},
              "rules": [{"name": "held-out", "action": "exclude", "where": where}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    _refused(cli("prepare", "--policy", write_policy(tmp_path / "c.yaml", policy)), fragment)


def test_cifar10_label_names_for_every_label(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """batches.meta naming fewer than 10 classes gave those labels a null label_name (`label_name = 'truck'`
    excluded nothing)."""
    import pickle

    from fixtures.synthetic import write_cifar10

    root = write_cifar10(tmp_path / "cifar", 20)
    meta_path = next(root.rglob("batches.meta"))
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": 20, b"num_vis": 3072}
    meta_path.write_bytes(pickle.dumps(meta, protocol=2))
    policy = {"version": 1, "name": "cifar", "dataset": {"format": "cifar10", "root": str(root), "split": "test",
                                                         "resolution": 8},
              "rules": [{"name": "trucks", "action": "exclude", "where": "label_name = 'truck' OR label > 1"},
                        {"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    _refused(cli("prepare", "--policy", write_policy(tmp_path / "c.yaml", policy)), "names 2 classes, not 10")
