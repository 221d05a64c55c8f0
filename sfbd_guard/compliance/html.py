"""`guard report --format html --out FILE`: one self-contained page a compliance reviewer can act on.

Per run chain (compliance/chains.py): a PASS / ATTENTION / FAIL banner with its reasons in plain words, the
`guard verify` checks each with links to its evidence (the files it read, compliance/evidence.py), every ledger
event of the chain (failed and interrupted ones with their message) linking to its artifacts (links relative to
the page), a training-loss chart per phase from metrics.parquet, the records per partition as a chart, the latest
sample grid and the audit's similarity histogram. Then the ledger's tables.
Rendered from templates/report.html.j2 with autoescaping; the charts are SVG drawn by charts.py.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..auditing.html import similarity_chart
from ..charts import Frame, bar_chart, line_chart
from ..contracts.events import Event
from ..fileio import atomic_write_bytes, owner_only_dirs
from ..locations import project_of, resolve
from ..rundir import GRID, REPORT, SIMILARITY, SNAPSHOTS, RunPaths
from ..templating import markup, render
from ..version import __version__
from .chains import Chain, gather, message

PARTITION_COLOURS = {"clean": "#2ca02c", "protected": "#1f77b4", "excluded": "#7f7f7f", "error": "#d62728",
                     "demoted copies": "#ff7f0e"}
MAX_POINTS = 300  # per phase in the loss chart (means over equal runs of steps)


@dataclass(frozen=True)
class Link:
    label: str
    href: str


def link(target: Path | None, page_dir: Path, label: str) -> Link | None:
    """A link from the page to `target`, relative to the page's folder (so a copied project keeps working)."""
    if target is None or not target.exists():
        return None
    return Link(label, quote(Path(os.path.relpath(target, page_dir)).as_posix()))


def _event_links(event: Event, project: Path, page_dir: Path) -> list[Link]:
    links = []
    for artifact in [*event.outputs, *(a for a in event.inputs if a.role in ("policy", "prepared", "samples", "weights"))]:
        if artifact.role in ("array", "source"):
            continue
        where = resolve(artifact.path, project)
        found = link(where, page_dir, artifact.role)
        if found is not None and found not in links:
            links.append(found)
    return links


def _png(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    return markup("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())


def _grid(run_dir: Path) -> Path | None:
    grid = RunPaths(run_dir).samples / GRID
    if grid.is_file():
        return grid
    snapshots = sorted((run_dir / SNAPSHOTS).glob("*.png"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def loss_series(metrics: Path) -> dict[str, list[tuple[float, float]]]:
    """{phase: [(step, mean loss)]} from a run's metrics.parquet, at most MAX_POINTS points per phase."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(metrics, columns=["step", "phase", "loss"]).to_pylist()
    except (OSError, pa.ArrowException):
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    for phase in dict.fromkeys(r["phase"] for r in rows):
        steps = np.asarray([r["step"] for r in rows if r["phase"] == phase], dtype=np.float64)
        losses = np.asarray([r["loss"] for r in rows if r["phase"] == phase], dtype=np.float64)
        chunks = max(1, int(np.ceil(len(steps) / MAX_POINTS)))
        cut = range(0, len(steps), chunks)
        series[str(phase)] = [(float(steps[i:i + chunks].mean()), float(losses[i:i + chunks].mean())) for i in cut]
    return series


def validation_rows(metrics: Path) -> list[dict[str, Any]]:
    """SFBD's validation measure at each round boundary (engine/validation.py), from a run's metrics.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if "validation" not in pq.read_schema(metrics).names:
            return []
        rows = pq.read_table(metrics, columns=["step", "kimg", "phase", "validation", "round_psnr", "decision"]).to_pylist()
    except (OSError, pa.ArrowException):
        return []
    return [row for row in rows if row["validation"] is not None]


def _chain_view(chain: Chain, project: Path, page_dir: Path) -> dict[str, Any]:
    losses = loss_series(RunPaths(chain.run_dir).metrics)
    counts = chain.counts()
    audit = chain.audit
    return {
        "name": chain.name, "verdict": chain.verdict, "reasons": chain.reasons,
        "run": link(chain.run_dir, page_dir, str(_short(chain.run_dir, project))),
        "prepared": link(chain.prepared, page_dir, str(_short(chain.prepared, project))) if chain.prepared else None,
        "checks": [{"check": c, "links": [found for path in c.evidence
                                           if (found := link(path, page_dir, str(_short(path, project)))) is not None]}
                   for c in chain.checks],
        "verify_error": chain.verify_error,
        "events": [{"event": e, "message": message(e, project), "links": _event_links(e, project, page_dir)}
                   for e in chain.events],
        "loss_chart": markup(line_chart(losses, xlabel="training step", ylabel="loss (mean per point)",
                                        title=f"training loss of {chain.name} per phase", frame=Frame(width=600)))
        if losses else None,
        "validation": validation_rows(RunPaths(chain.run_dir).metrics),
        "counts_chart": markup(bar_chart(counts, title="records per partition", colours=PARTITION_COLOURS, width=480))
        if counts else None,
        "grid": _png(_grid(chain.run_dir)),
        "audit": audit,
        "audit_page": link(chain.audit_dir / REPORT, page_dir, "audit page") if chain.audit_dir else None,
        "histogram": similarity_chart(audit) if audit else None,
        "histogram_png": _png(chain.audit_dir / SIMILARITY) if chain.audit_dir else None,
    }


def _short(path: Path | None, project: Path) -> Path | str:
    if path is None:
        return "–"
    return path.relative_to(project) if path.is_relative_to(project) else path


def _rows(table: Any) -> list[list[Any]]:
    return [list(row.values()) for row in table.to_pylist()]


def report_page(ledger: Path, page: Path, tables: dict[str, Any], *, verify: bool = True,
                digest_key: Path | bytes | None = None) -> str:
    """The whole page as a string; `page` is where it will be written (its links are relative to its folder)."""
    chains, orphans = gather(ledger, verify=verify, digest_key=digest_key)
    project, page_dir = project_of(ledger), page.resolve().parent
    overall = ("FAIL" if any(c.verdict == "FAIL" for c in chains) else
               "ATTENTION" if orphans or not chains or any(c.verdict == "ATTENTION" for c in chains) else "PASS")
    return render(
        "sfbd_guard.compliance", "report.html.j2",
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
        project=str(project), ledger=str(_short(ledger.resolve(), project)), overall=overall,
        chains=[_chain_view(c, project, page_dir) for c in chains],
        orphans=[{"event": e, "message": message(e), "links": _event_links(e, project, page_dir)} for e in orphans],
        tables={title: {"columns": t.column_names, "rows": _rows(t)} for title, t in tables.items()},
    )


def write_html(path: Path, ledger: Path, tables: dict[str, Any], *, verify: bool = True,
               digest_key: Path | bytes | None = None) -> Path:
    page = report_page(ledger, path, tables, verify=verify, digest_key=digest_key)
    owner_only_dirs(path.parent)  # new folders are owner-only (the file is 0600)
    atomic_write_bytes(path, page.encode())
    return path
