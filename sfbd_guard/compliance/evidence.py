"""Where a reviewer finds the evidence of each `guard verify` check: the files (and ledger folders) the check
read. `guard verify --json` lists them; the HTML compliance report links them (relative to the page).

Only paths that exist are named. A check this table does not know (a newer check) points at the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..ledger import HEAD_FILE, SIGNATURES


def _in(folder: Path | None, name: str) -> Path | None:
    return folder / name if folder is not None else None


def _sources(run_dir: Path, prepared: Path | None, ledger: Path, audit: Path | None) -> dict[str, list[Path | None]]:
    def data(name: str) -> Path | None:
        return _in(prepared, name)

    def report(name: str) -> Path | None:
        return _in(audit, name)

    return {
        "consumed arrays": [run_dir / "run.json", ledger / "train", data("card.json"), data("manifest.parquet")],
        "provenance": [ledger / "prepare", data("card.json")],
        "signature": [data("card.sig"), data("card.json")],
        "noise": [data("card.json"), data("manifest.parquet")],
        "noise statistics": [data("protected"), data("card.json")],
        "releases": [data("card.json")],
        "no protected pixels": [data("manifest.parquet"), data("clean")],
        "opt-outs": [data("manifest.parquet"), data("clean"), data("protected")],
        "duplicates": [data("manifest.parquet"), data("card.json")],
        "audit": [report("summary.json"), report("samples.parquet"), report("report.html"), ledger / "audit"],
        "ledger chain": [ledger / HEAD_FILE, ledger, run_dir / "run.json", data("card.json"), report("summary.json")],
        "ledger signatures": [ledger / SIGNATURES, ledger / HEAD_FILE],
        "ledger counts": [ledger, data("manifest.parquet"), data("card.json"), run_dir / "run.json",
                          report("summary.json"), report("samples.parquet")],
    }


def evidence_paths(*, run_dir: Path, prepared: Path | None, ledger: Path,
                   audit: Path | None) -> Callable[[str], tuple[Path, ...]]:
    """check name -> the existing files that check read (`audit`: the folder of the latest audit's summary.json)."""
    sources = _sources(run_dir, prepared, ledger, audit)

    def of(name: str) -> tuple[Path, ...]:
        return tuple(p for p in sources.get(name, [ledger]) if p is not None and p.exists())

    return of
