"""Finding a run's prepared directory after the project was copied or moved (`guard verify`, the datasheet,
`guard train --resume`): `--data`, else run.json's path (locations.py), else the project's prepared directory
with the run's fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GuardError, InputError
from ..locations import resolve
from ..rundir import RUN_RECORD
from .layout import CARD

SEARCH_DEPTH = 3  # how deep under the project a moved prepared directory is looked for
SEARCH_FOLDERS = 5000  # at most this many folders are listed (a project may hold a dataset of millions of files)
DATA_HINT = "point at the run's prepared directory with --data DIR"


def find_prepared(project: Path, fingerprint: str) -> Path | None:
    """A prepared directory inside `project` whose card has `fingerprint` and passes the structural checks
    (`prepared.read_prepared_card`: the manifest's sha256 and the fingerprint recomputed from the card's files),
    or None. Symlinks are not followed; the search stops at SEARCH_DEPTH and SEARCH_FOLDERS. Finding a directory
    establishes nothing: its callers still verify its arrays, its provenance and the ledger's fingerprints."""
    from .card import read_card
    from .reader import read_prepared_card

    project = project.resolve()
    queue, listed = [(project, 0)], 0
    while queue and listed < SEARCH_FOLDERS:
        folder, depth = queue.pop(0)
        listed += 1
        card = folder / CARD
        if card.is_file() and not card.is_symlink():
            try:
                if read_card(folder).fingerprint == fingerprint and read_prepared_card(folder).fingerprint == fingerprint:
                    return folder
            except GuardError:
                pass
            continue  # a prepared directory holds no other
        if depth >= SEARCH_DEPTH or (folder / RUN_RECORD).is_file():
            continue
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        queue += [(Path(e.path), depth + 1) for e in entries
                  if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    return None


def prepared_of_run(run_dir: Path, data: str, fingerprint: str, project: Path, explicit: Path | None = None) -> Path:
    """The prepared directory a run trained on: `explicit` (--data), else run.json's `data` resolved against the
    run directory (a relative path must stay inside `project`, the ledger's parent), else, when that path is not
    there (a moved or copied project), the prepared directory of the project with the run's fingerprint.
    Raises an InputError naming run.json, the path and the --data flag when none is found."""

    if explicit is not None:
        return explicit.resolve()
    source = run_dir / RUN_RECORD
    found = resolve(data, run_dir, project=project)
    if found is None:
        raise InputError(f"{source}: data: {data!r} leads outside the project {project.resolve()}; it is not read",
                         hint=DATA_HINT)
    if found.exists():
        return found
    moved = find_prepared(project, fingerprint)
    if moved is not None:
        return moved
    raise InputError(f"{source}: data: the prepared directory {found} is not there, and no prepared directory in "
                     f"{project.resolve()} has the run's fingerprint {fingerprint[:16]}…", hint=DATA_HINT)
