"""What `guard verify` returns (a Check) and which ledger events belong to a run: shared by verify.py and the
ledger's tamper checks (tamper.py), which verify runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..contracts.events import Event

__all__ = ["Check", "inside", "run_audits", "trainings"]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    attention: bool = False  # passed, but with something a person must look at (ATTENTION, not PASS)
    evidence: tuple[Path, ...] = ()  # the files the check read (compliance/evidence.py)
    items: tuple[str, ...] = ()  # a list the detail sums up (the lineage: one line per generation with its verdict)

    @property
    def word(self) -> str:
        return "FAIL" if not self.passed else "ATTENTION" if self.attention else "PASS"


def inside(path: Path | None, folder: Path) -> bool:
    return path is not None and (path == folder or path.is_relative_to(folder))


def run_audits(events: list[Event], run_dir: Path, project: Path) -> list[Event]:
    """The audits of the run's samples, oldest first: the samples folder is inside the run directory, or was drawn
    from its weights (the views' RUN_AUDITS, on the typed events)."""
    drawn = {p for e in events if e.kind == "sample" and any(inside(w, run_dir) for w in e.located("inputs", "weights", project))
             for p in e.located("outputs", "samples", project) if p is not None}
    return [e for e in events if e.kind == "audit"
            and any(inside(p, run_dir) or p in drawn for p in e.located("inputs", "samples", project))]


def trainings(events: list[Event], run_dir: Path, project: Path) -> list[Event]:
    """The run's finished training events, oldest first (the ledger's typed events, contracts/events.py): their
    `run` output, resolved against the project (the ledger's parent), is `run_dir`."""
    return [e for e in events if e.kind == "train" and e.status == "ok"
            and e.located("outputs", "run", project)[:1] == [run_dir]]
