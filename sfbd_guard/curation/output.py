"""Atomic output directories: build in a temporary sibling, rename into place at the end.

An interrupted run leaves no output; its leftover temporary directory is removed by the next run.
`--overwrite` replaces an existing output only once the new one is complete; if a run dies between
the two renames, the next run puts the previous output back before doing anything else.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import InputError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(output: Path, kind: str) -> list[tuple[Path, int]]:
    found = []
    for path in output.parent.glob(f".{output.name}.{kind}-*"):
        pid_text = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit():
            found.append((path, int(pid_text)))
    return found


def clean_stale(output: Path) -> None:
    """Remove temporary directories of dead runs; restore an output a dead --overwrite moved aside."""
    if not output.parent.is_dir():
        return
    for path, pid in _siblings(output, "partial"):
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
    for path, pid in _siblings(output, "old"):
        if _pid_alive(pid):
            continue
        if output.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.rename(output)


def start_output(output: Path, *, overwrite: bool) -> Path:
    """Check that `output` may be written and return a fresh temporary sibling to build it in."""
    clean_stale(output)
    if output.exists() and not overwrite:
        raise InputError(f"output {output} already exists", hint="pass --overwrite to replace it, or --out to write elsewhere")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def finish_output(staging: Path, output: Path) -> None:
    """Move the complete `staging` directory to `output`, replacing any previous one."""
    previous = None
    if output.exists():
        previous = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        output.rename(previous)
    staging.rename(output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def abandon_output(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
