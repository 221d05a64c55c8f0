"""The audit's report files: samples.parquet (explicit schema), summary.json, and the console summary."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..contracts.audit_summary import AuditSummary
from ..fileio import atomic_write_bytes
from .checks import Scores

SCHEMA_VERSION = 2  # 2: transform (rotations, flips, colour inversion searched, not the mirror image only)
REPORT_FIELDS: list[pa.Field[Any]] = [
    pa.field("sample", pa.string(), nullable=False),  # path relative to --samples
    pa.field("status", pa.string(), nullable=False),  # ok | error
    pa.field("error", pa.string()),  # why the file could not be read
    pa.field("file_sha256", pa.string()),  # sha256 of the file's bytes
    pa.field("width", pa.int32()),  # original size, before the resize to the prepared resolution
    pa.field("height", pa.int32()),
    pa.field("verdict", pa.string()),  # copy | suspect | novel; null for error
    pa.field("rules", pa.list_(pa.string())),  # the rules that fired: hash, s1>=copy, s1>=suspect, l2_ratio<=ratio
    pa.field("top1_record_id", pa.string()),
    pa.field("s1", pa.float32()),  # top-1 cosine similarity to the protected set
    pa.field("margin", pa.float32()),  # s1 - s2
    pa.field("flipped", pa.bool_()),  # a variant (mirror, rotation, inversion), not the image itself, gave the top-1 match
    pa.field("topk_record_ids", pa.list_(pa.string())),
    pa.field("topk_similarities", pa.list_(pa.float32())),
    pa.field("l2_nearest", pa.float32()),  # RMS [0, 1] pixel distance to the nearest protected image
    pa.field("l2_nearest_record_id", pa.string()),
    pa.field("l2_ratio", pa.float32()),  # l2_nearest / mean distance to the k nearest (Carlini et al.)
    pa.field("hash_match", pa.bool_()),  # it or a variant is byte-identical to a protected record at the prepared resolution
    pa.field("transform", pa.string()),  # the variant that gave the top-1 match: identity, flip, rot90, invert+rot180, ...
]
REPORT_SCHEMA = pa.schema(REPORT_FIELDS, metadata={b"guard.audit_schema": str(SCHEMA_VERSION).encode()})


def _ok_rows(scores: Scores, verdicts: list[str], rules: list[list[str]], ids: list[str]) -> list[dict[str, Any]]:
    def rid(row: int) -> str | None:
        return ids[row] if row >= 0 else None

    rows = []
    for i, verdict in enumerate(verdicts):
        valid = scores.rows[i] >= 0
        rows.append({
            "verdict": verdict, "rules": rules[i], "top1_record_id": rid(int(scores.rows[i, 0])),
            "s1": float(scores.s1[i]), "margin": float(scores.margin[i]), "flipped": bool(scores.flipped[i]),
            "topk_record_ids": [ids[r] for r in scores.rows[i][valid]],
            "topk_similarities": [float(v) for v in scores.sims[i][valid]],
            "l2_nearest": float(scores.l2_nearest[i]), "l2_nearest_record_id": rid(int(scores.l2_row[i])),
            "l2_ratio": float(scores.l2_ratio[i]), "hash_match": bool(scores.hash_match[i]),
            "transform": scores.transform[i] if scores.transform else None,
        })
    return rows


def samples_table(names: list[str], ok: np.ndarray, sizes: list[tuple[int, int] | None], file_sha256: list[str | None],
                  errors: dict[str, str], scores: Scores, verdicts: list[str], rules: list[list[str]],
                  protected_ids: list[str]) -> pa.Table:
    """One row per sample file (readable or not), in the REPORT_SCHEMA."""
    scored = iter(_ok_rows(scores, verdicts, rules, protected_ids))
    rows = []
    for name, good, size, digest in zip(names, ok, sizes, file_sha256, strict=True):
        row: dict[str, Any] = {"sample": name, "status": "ok" if good else "error", "error": errors.get(name),
                               "file_sha256": digest, "width": size[0] if size else None,
                               "height": size[1] if size else None}
        if good:
            row.update(next(scored))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)


def write_parquet(path: Path, table: pa.Table) -> None:

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def quantiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    points = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
    return {name: round(float(np.percentile(values, q)), 6) for name, q in points.items()}


def print_summary(summary: AuditSummary, report: Path) -> None:
    """A few lines for the terminal: verdict counts, thresholds and where the report is."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = summary.counts
    table = Table("verdict", "samples", title="audit verdicts", title_justify="left")
    for name in ("copy", "suspect", "novel", "error"):
        table.add_row(name, str(counts.get(name, 0)))
    console.print(table)
    th, flagged = summary.thresholds, summary.flagged
    console.print(f"thresholds ({th.method}): copy s1 >= {th.copy_:.4f}, suspect s1 >= {th.suspect:.4f} "
                  f"or l2_ratio <= {th.ratio:.4f}  [{summary.embedder.kind} embedder]")
    console.print(f"flagged {flagged.count}/{flagged.of} = {flagged.fraction:.4f} "
                  f"(95% CI {flagged.ci95[0]:.4f}-{flagged.ci95[1]:.4f}); {th.expected_fpr_text}")
    for warning in summary.warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}")
    console.print(f"report: {report}")
