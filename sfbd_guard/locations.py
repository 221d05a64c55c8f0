"""Paths kept in the evidence files (the ledger, run.json, card.json), so that a copied or moved project still reads.

A path is stored *relative* to a base folder when it lies inside the project, and *absolute* otherwise (a
source dataset or a prepared directory kept elsewhere, which a move of the project does not carry along):

- ledger events: relative to the ledger's parent folder, which is the project (`store`/`resolve` with
  base = project = `project_of(ledger)`);
- run.json `data`: relative to the run directory, when the run and its prepared directory both lie inside
  the project (the ledger's parent) of the `guard train` that wrote it;
- card.json `root` and `policy_path`: relative to the prepared directory, when it and the path both lie
  inside the folder `guard prepare` ran in.

Relative paths are written as POSIX paths (`prepared/digits-8`, `../../prepared/digits-8`). Readers resolve
them against the same base; a relative path that leads outside the project (`../../etc`, or a symlink out)
is never opened (`resolve` returns None, and the caller refuses it, naming the file, key and value). Files
written before this rule hold absolute paths only, which read as they always did. Finding a run's moved
prepared directory: prepared/relocate.py.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_of(ledger: Path) -> Path:
    """The project a ledger belongs to: the ledger's parent folder (absolute)."""
    return ledger.resolve().parent


def store(path: Path | str, base: Path, *, project: Path | None = None) -> str:
    """`path` as written into a file whose relative paths are relative to `base`: relative (POSIX) when `path`
    and `base` both lie inside `project` (default: `base`) and `path` is not the project itself; else absolute."""
    target = Path(path).resolve()
    base = base.resolve()
    inside = (project or base).resolve()
    if target != inside and target.is_relative_to(inside) and base.is_relative_to(inside):
        return Path(os.path.relpath(target, base)).as_posix()
    return str(target)


def resolve(stored: str, base: Path, *, project: Path | None = None) -> Path | None:
    """The path a file holds, made absolute: an absolute path as it is; a relative one against `base`,
    or None when it leads outside `project` (default: `base`) once `..` and symlinks are resolved."""
    path = Path(stored)
    if path.is_absolute():
        return path
    inside = (project or base).resolve()
    target = (base.resolve() / path).resolve()
    return target if target.is_relative_to(inside) else None

