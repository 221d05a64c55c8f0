"""Where a reviewer finds the evidence of each `guard verify` check: the files (and ledger folders) the check
read. `guard verify --json` lists them; the HTML compliance report links them (relative to the page).

Only paths that exist are named. A check this table does not know (a newer check) points at the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..ledger import HEAD_FILE, SIGNATURES
from ..prepared.layout import CARD, CLEAN, MANIFEST, PROTECTED, SIGNATURE
from ..rundir import AUDIT_SUMMARY, AUDIT_TABLE, REPORT, RunPaths


def _in(folder: Path | None, name: str) -> Path | None:
    return folder / name if folder is not None else None


def _sources(run_dir: Path, prepared: Path | None, ledger: Path, audit: Path | None) -> dict[str, list[Path | None]]:
    def data(name: str) -> Path | None:
        return _in(prepared, name)

    def report(name: str) -> Path | None:
        return _in(audit, name)

    return {
        "consumed arrays": [RunPaths(run_dir).record, ledger / "train", data(CARD), data(MANIFEST)],
        "provenance": [ledger / "prepare", data(CARD)],
        "signature": [data(SIGNATURE), data(CARD)],
        "noise": [data(CARD), data(MANIFEST)],
        "noise statistics": [data(PROTECTED), data(CARD)],
        "releases": [data(CARD)],
        "no protected pixels": [data(MANIFEST), data(CLEAN)],
        "opt-outs": [data(MANIFEST), data(CLEAN), data(PROTECTED)],
        "duplicates": [data(MANIFEST), data(CARD)],
        "audit": [report(AUDIT_SUMMARY), report(AUDIT_TABLE), report(REPORT), ledger / "audit"],
        "ledger chain": [ledger / HEAD_FILE, ledger, RunPaths(run_dir).record, data(CARD), report(AUDIT_SUMMARY)],
        "ledger signatures": [ledger / SIGNATURES, ledger / HEAD_FILE],
        "ledger counts": [ledger, data(MANIFEST), data(CARD), RunPaths(run_dir).record,
                          report(AUDIT_SUMMARY), report(AUDIT_TABLE)],
    }


def evidence_paths(*, run_dir: Path, prepared: Path | None, ledger: Path,
                   audit: Path | None) -> Callable[[str], tuple[Path, ...]]:
    """check name -> the existing files that check read (`audit`: the folder of the latest audit's summary.json)."""
    sources = _sources(run_dir, prepared, ledger, audit)

    def of(name: str) -> tuple[Path, ...]:
        return tuple(p for p in sources.get(name, [ledger]) if p is not None and p.exists())

    return of
