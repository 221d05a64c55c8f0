"""DuckDB views over the Parquet ledger: events, prepares, trainings, samplings, audits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError

VIEW_NAMES = ("events", "prepares", "trainings", "samplings", "audits")


def _artifact(column: str, role: str, field: str = "sha256") -> str:
    return f"list_filter({column}, lambda a: a.role = '{role}')[1].{field}"


def _json(path: str, kind: str = "VARCHAR") -> str:
    return f"TRY_CAST(json_extract_string(summary, '{path}') AS {kind})"


VIEWS = {
    "prepares": f"""
        SELECT started_at, status, {_json('$.policy_name')} AS policy, {_json('$.format')} AS format,
               {_json('$.split')} AS split, {_json('$.resolution', 'INTEGER')} AS resolution,
               {_json('$.sigma', 'DOUBLE')} AS sigma,
               {_json('$.counts.clean', 'BIGINT')} AS clean, {_json('$.counts.protected', 'BIGINT')} AS protected,
               {_json('$.counts.excluded', 'BIGINT')} AS excluded, {_json('$.counts.error', 'BIGINT')} AS error,
               json_extract(summary, '$.rule_counts') AS rule_counts,
               {_artifact('outputs', 'prepared', 'path')} AS prepared, {_artifact('outputs', 'prepared')} AS fingerprint,
               {_artifact('inputs', 'policy')} AS policy_sha256, event_id
        FROM events WHERE kind = 'prepare'""",
    "trainings": f"""
        SELECT started_at, status, {_json('$.name')} AS name, {_json('$.method')} AS method,
               {_artifact('inputs', 'prepared')} AS data_fingerprint, {_json('$.step', 'BIGINT')} AS steps,
               {_json('$.kimg', 'DOUBLE')} AS kimg, {_json('$.resumed', 'BOOLEAN')} AS resumed,
               date_diff('millisecond', started_at, finished_at) / 1000.0 AS seconds,
               {_json('$.privacy.epsilon', 'DOUBLE')} AS epsilon, {_json('$.privacy.delta', 'DOUBLE')} AS delta,
               {_json('$.privacy.noise_multiplier', 'DOUBLE')} AS noise_multiplier,
               {_json('$.privacy.sample_rate', 'DOUBLE')} AS sample_rate, {_json('$.privacy.steps', 'BIGINT')} AS private_steps,
               {_artifact('outputs', 'run', 'path')} AS run, {_artifact('outputs', 'ema')} AS ema_sha256, event_id
        FROM events WHERE kind = 'train'""",
    "samplings": f"""
        SELECT started_at, status, {_json('$.count', 'BIGINT')} AS count, {_json('$.steps', 'INTEGER')} AS steps,
               {_json('$.seed', 'BIGINT')} AS seed, {_artifact('inputs', 'weights', 'path')} AS weights,
               {_artifact('inputs', 'weights')} AS weights_sha256, {_artifact('outputs', 'samples', 'path')} AS samples, event_id
        FROM events WHERE kind = 'sample'""",
    "audits": f"""
        SELECT started_at, status, {_artifact('inputs', 'samples', 'path')} AS samples,
               {_json('$.counts.copy', 'BIGINT')} AS copy, {_json('$.counts.suspect', 'BIGINT')} AS suspect,
               {_json('$.counts.novel', 'BIGINT')} AS novel, {_json('$.thresholds.copy', 'DOUBLE')} AS copy_threshold,
               {_json('$.thresholds.suspect', 'DOUBLE')} AS suspect_threshold,
               {_json('$.thresholds.method')} AS threshold_method, {_json('$.thresholds.expected_fpr')} AS expected_fpr,
               json_extract(summary, '$.embedder') AS embedder, {_artifact('inputs', 'prepared')} AS data_fingerprint,
               {_artifact('outputs', 'summary.json', 'path')} AS summary_file, event_id
        FROM events WHERE kind = 'audit'""",
}


# Audits of a run's samples: the samples folder is inside the run directory, or was drawn from its weights.
# Bind the run directory twice.
RUN_AUDITS = ("(samples LIKE ? || '/%' OR samples IN (SELECT samples FROM samplings WHERE weights LIKE ? || '/%'))")


def connect(ledger: Path) -> Any:
    """A DuckDB connection with the ledger's views; an empty or missing ledger is an input error."""
    import duckdb

    if not any(ledger.glob("**/*.parquet")):
        raise InputError(f"ledger {ledger} holds no events yet", hint="run guard prepare first, or pass --ledger DIR")
    con = duckdb.connect()
    pattern = str(ledger / "**" / "*.parquet").replace("'", "''")
    con.execute("CREATE VIEW events AS SELECT * REPLACE (started_at::TIMESTAMP AS started_at, "  # UTC, naive
                f"finished_at::TIMESTAMP AS finished_at) FROM read_parquet('{pattern}', union_by_name = true)")
    for name, query in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {query}")
    return con


def query(con: Any, sql: str) -> Any:
    """Run `sql` over the views; returns an Arrow table. Bad SQL is an input error."""
    import duckdb

    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as err:
        raise InputError(f"--sql: {str(err).splitlines()[0]}", hint=f"views: {', '.join(VIEW_NAMES)}") from None
