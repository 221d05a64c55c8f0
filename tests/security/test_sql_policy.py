"""Attacks through a policy's `where`: it is an expression over the records, nothing else.

Each payload goes through the real CLI (`guard prepare`) on the bundled digits (no dataset files), with the
policy in its own folder under tmp_path. A refused payload exits 2 with one line naming the policy file,
`rules[i].where` and what was refused; the filesystem is left as it was (apart from the ledger's event).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import digits_policy, lineage, write_policy

MARKER = "SECRET-MARKER-7f3a9c"


def _files(root: Path) -> set[Path]:
    """Every file and directory under root except the ledger (a failed run adds its event there)."""
    return {p for p in root.rglob("*") if "ledger" not in p.relative_to(root).parts}


def _policy(tmp_path: Path, where: str) -> Path:
    """A digits policy in tmp_path/policy/ whose first rule excludes what `where` matches."""
    policy = digits_policy(tmp_path / "out", drop=0.9)
    policy["rules"][0] = {"name": "opt-out", "action": "exclude", "where": where}
    return write_policy(tmp_path / "policy" / "p.yaml", policy)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """policy/optout.csv (legitimate), policy/secret.csv (a marker the policy may read but never print),
    outside/secret.csv (next to the policy folder: never readable), policy/link.csv -> outside/secret.csv."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "optout.csv").write_text("label\n3\n")
    (tmp_path / "policy" / "secret.csv").write_text(f"value\n{MARKER}\n")
    (tmp_path / "policy" / "secret.txt").write_text(f"{MARKER}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.csv").write_text(f"label\n{MARKER}\n")
    os.symlink(tmp_path / "outside" / "secret.csv", tmp_path / "policy" / "link.csv")
    return tmp_path


def _assert_refused(result, policy: Path, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    assert str(policy) in lines[0] and "rules[0].where" in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _ledger_text(ledger: Path) -> str:
    """Everything the ledger holds, as text (each event file read as a table, plus its raw bytes)."""
    text = []
    for path in sorted(ledger.rglob("*.parquet")):
        text.append(str(pq.read_table(path).to_pylist()))
        text.append(path.read_bytes().decode("latin-1"))
    return "\n".join(text)


STACKED = {
    "copy": "true); COPY (SELECT 1) TO '{tmp}/pwned.csv'; SELECT 1 WHERE (true",
    "copy-in-policy-folder": "true); COPY (SELECT 1) TO '{tmp}/policy/optout.csv'; SELECT 1 WHERE (true",
    "attach": "true); ATTACH '{tmp}/pwned.db' AS pwned; SELECT 1 WHERE (true",
    "install": "true); INSTALL httpfs; SELECT 1 WHERE (true",
    "load": "true); LOAD httpfs; SELECT 1 WHERE (true",
    "set": "true); SET enable_external_access = true; SELECT 1 WHERE (true",
    "pragma": "true); PRAGMA enable_profiling; SELECT 1 WHERE (true",
    "export": "true); EXPORT DATABASE '{tmp}/exported'; SELECT 1 WHERE (true",
    "secret": "true); CREATE SECRET pwned (TYPE s3, KEY_ID 'x', SECRET 'y'); SELECT 1 WHERE (true",
    "union": "true) UNION SELECT 0 FROM records WHERE (true",
    "group-by": "true) GROUP BY ALL HAVING (true",
}


@pytest.mark.parametrize("case", sorted(STACKED))
def test_stacked_statements_are_refused_and_touch_nothing(cli, folders: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    before = _files(folders)
    optout = (folders / "policy" / "optout.csv").read_bytes()
    path = _policy(folders, STACKED[case].format(tmp=folders))
    before.add(path)
    result = cli("prepare", "--policy", path)
    assert not (folders / "pwned.csv").exists() and not (folders / "pwned.db").exists()
    assert (folders / "policy" / "optout.csv").read_bytes() == optout
    assert _files(folders) == before, "no file may appear or disappear"
    _assert_refused(result, path, "refused")


READS = {
    "read_csv absolute outside": "label IN (SELECT label FROM read_csv('{tmp}/outside/secret.csv'))",
    "read_csv /etc/passwd": "label IN (SELECT 1 FROM read_csv('/etc/passwd'))",
    "read_csv ../": "label IN (SELECT label FROM read_csv('../outside/secret.csv'))",
    "read_csv symlink out": "label IN (SELECT label FROM read_csv('link.csv'))",
    "read_csv glob": "label IN (SELECT 1 FROM read_csv('*.csv'))",
    "read_csv url (autoinstall httpfs)": "label IN (SELECT 1 FROM read_csv('https://example.invalid/x.csv'))",
    "read_csv from a column": "label IN (SELECT 1 FROM read_csv(CAST(label AS VARCHAR)))",
    "read_text": "label IN (SELECT length(content) FROM read_text('secret.txt'))",
    "read_text outside": "label IN (SELECT length(content) FROM read_text('{tmp}/outside/secret.csv'))",
    "read_blob": "label IN (SELECT 1 FROM read_blob('/etc/passwd'))",
    "glob": "label IN (SELECT 1 FROM glob('/etc/*'))",
    "hidden file": "label IN (SELECT 1 FROM read_csv('.ssh/id.csv'))",
    "not a data file": "label IN (SELECT 1 FROM read_csv('p.yaml', header=false))",
    "replacement scan": "label IN (SELECT label FROM '{tmp}/outside/secret.csv')",
    "query()": "label IN (SELECT * FROM query('SELECT 1'))",
    "catalog function": "label IN (SELECT 1 FROM duckdb_settings())",
    "qualified table": "label IN (SELECT 1 FROM system.main.records)",
}


@pytest.mark.parametrize("case", sorted(READS))
def test_reading_anything_but_the_policy_folder_is_refused(cli, folders: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    before = _files(folders)
    path = _policy(folders, READS[case].format(tmp=folders))
    before.add(path)
    result = cli("prepare", "--policy", path)
    _assert_refused(result, path, "refused")
    assert MARKER not in result.err
    assert _files(folders) == before


def test_error_messages_never_quote_a_files_contents(cli, folders: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    """The CSV is allowed (in the policy folder) but its value must not come back through DuckDB's errors."""
    payloads = [
        "label = (SELECT CAST(value AS INTEGER) FROM read_csv('secret.csv') LIMIT 1)",  # conversion error
        "label = (SELECT nope FROM read_csv('secret.csv', header=false))",  # binder error lists the columns
        "label = (SELECT value FROM read_csv('secret.csv'))",  # comparison of INT and the marker string
        f"label IN (SELECT value FROM read_csv('secret.csv') WHERE value = '{MARKER[:6]}' || 'x' AND "
        "CAST(value AS DATE) IS NULL)",
    ]
    for where in payloads:
        path = _policy(folders, where)
        result = cli("prepare", "--policy", path)
        assert result.code == 2, (where, result.out, result.err)
        assert MARKER not in result.err and MARKER not in result.out, (where, result.err)
        assert "rules[0].where" in result.err and str(path) in result.err
        assert "Traceback" not in result.err
    assert list(_isolated_ledger.rglob("*.parquet")), "failed runs are recorded"
    assert MARKER not in _ledger_text(_isolated_ledger)


def test_policy_files_in_the_policy_folder_still_work(cli, folders: Path) -> None:  # type: ignore[no-untyped-def]
    """The shipped pattern: an opt-out list next to the policy, read relative to it, whatever the cwd."""
    (folders / "policy" / "lists").mkdir()
    (folders / "policy" / "lists" / "more.parquet").write_bytes(b"")
    import pyarrow as pa

    pq.write_table(pa.table({"label": [4]}), folders / "policy" / "lists" / "more.parquet")
    where = ("label IN (SELECT label FROM read_csv('optout.csv')) OR "
             "label IN (SELECT label FROM read_parquet('lists/more.parquet'))")
    path = _policy(folders, where)
    cwd = os.getcwd()
    os.chdir(folders / "outside")
    try:
        result = cli("prepare", "--policy", path)
    finally:
        os.chdir(cwd)
    assert result.code == 0, result.err
    manifest = lineage(folders / "out").to_pylist()  # the owner's full manifest (metadata of excluded records)
    by_rules = [r for r in manifest if r["rule"] != "duplicate"]  # dedup also excludes a few 8 px near copies
    excluded = {r["label"] for r in by_rules if r["partition"] == "excluded"}
    assert excluded == {3, 4}
    assert all(r["partition"] != "excluded" for r in by_rules if r["label"] not in (3, 4))


@pytest.mark.parametrize("where", [
    "label",  # an integer, not a boolean
    "label IN (SELECT label FROM read_csv('optout.csv')) AND count(*) > 1",
])
def test_non_boolean_or_aggregate_expressions_exit_2(cli, folders: Path, where: str) -> None:  # type: ignore[no-untyped-def]
    path = _policy(folders, where)
    result = cli("prepare", "--policy", path)
    assert result.code == 2, (result.out, result.err)
    assert "rules[0].where" in result.err and "Traceback" not in result.err
