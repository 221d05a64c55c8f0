"""`guard report --html FILE`: one self-contained page with the tables, the latest sample grid and the
latest audit histogram."""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes


def _image(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return f"<p><em>no {html.escape(alt)} yet</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" '
            f'style="image-rendering:pixelated;max-width:640px"><figcaption>{html.escape(str(path))}</figcaption></figure>')


def _table(title: str, table: Any) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row.values()) + "</tr>"
                   for row in table.to_pylist())
    return f"<h2>{html.escape(title)} ({table.num_rows})</h2><table><tr>{head}</tr>{rows}</table>"


def latest_pictures(con: Any) -> tuple[Path | None, Path | None]:
    """The newest sample grid of the newest training run, and the newest audit's histogram (the views' paths are
    resolved against the project; one that leads outside it is left relative there, and is not read)."""
    grid: Path | None = None
    histogram: Path | None = None
    run = con.execute("SELECT run FROM trainings WHERE status = 'ok' AND run IS NOT NULL "
                      "ORDER BY started_at DESC LIMIT 1").fetchall()
    if run and Path(run[0][0]).is_absolute():  # a relative path left in the view leads outside the project: not read
        folder = Path(run[0][0])
        snapshots = sorted(folder.glob("snapshots/*.png"), key=lambda p: p.stat().st_mtime)
        latest: list[Path | None] = [None, *snapshots]
        grid = folder / "samples" / "grid.png" if (folder / "samples" / "grid.png").is_file() else latest[-1]
    audit = con.execute("SELECT summary_file FROM audits WHERE status = 'ok' AND summary_file IS NOT NULL "
                        "ORDER BY started_at DESC LIMIT 1").fetchall()
    if audit and Path(audit[0][0]).is_absolute() and (Path(audit[0][0]).parent / "similarity.png").is_file():
        histogram = Path(audit[0][0]).parent / "similarity.png"
    return grid, histogram


def write_html(path: Path, tables: dict[str, Any], grid: Path | None, histogram: Path | None) -> Path:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}")
    body = "".join(_table(t, table) for t, table in tables.items())
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>sfbd_guard compliance report</title>"
            f"<style>{style}</style></head><body><h1>sfbd_guard compliance report</h1><p>generated {stamp}</p>"
            f"{body}<h2>latest sample grid</h2>{_image(grid, 'sample grid')}"
            f"<h2>latest audit: similarity of samples and holdout to the protected set</h2>{_image(histogram, 'audit histogram')}"
            "</body></html>")
    atomic_write_bytes(path, page.encode())
    return path
