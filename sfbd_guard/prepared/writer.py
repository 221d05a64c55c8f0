"""Atomic output directories: build in a temporary sibling, rename into place at the end.

An interrupted run leaves no output; its leftover temporary directory is removed by the next run.
`--overwrite` replaces an existing output only once the new one is complete, and only if that output
is a prepared directory this tool made (a card.json with the card's keys, nothing but the prepared
files); anything else, a dataset or a folder of the user's, is refused and left untouched. If a run
dies between the two renames, the next run puts the previous output back before doing anything else.

One `guard prepare` at a time writes a given output: `claim_output` holds an exclusive lock on
`.<name>.lock` next to it from before the work starts until the output is in place; a second run
into the same output stops at once with exit 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from .card import card_problem
from .layout import ENTRIES


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


def _is_temp(entry: os.DirEntry[str]) -> bool:
    """A temporary file of fileio's atomic writes (`.<name>.<random>.tmp`), left by a killed run."""
    return entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False)


def _strays(folder: Path, *, partial: bool = False) -> list[str]:
    """What in `folder` a prepared directory never holds: other names, symlinks, nested folders under
    clean/ and protected/ (plus, unless `partial`, atomic-write temporaries). Empty for one this tool wrote."""
    strays = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        kind = ENTRIES.get(entry.name)
        if partial and _is_temp(entry):
            continue
        if kind is None or entry.is_symlink() or (kind == "file" and not entry.is_file(follow_symlinks=False)):
            strays.append(entry.name)
        elif kind == "dir":
            if not entry.is_dir(follow_symlinks=False):
                strays.append(entry.name)
                continue
            strays.extend(f"{entry.name}/{inner.name}" for inner in os.scandir(entry.path)
                          if not (partial and _is_temp(inner))
                          and (not inner.is_file(follow_symlinks=False) or not inner.name.endswith(".npy")))
    return strays


def _card_problem(folder: Path) -> str | None:
    """Why `folder`/card.json is not a prepared directory's card, or None if it is one: the card contract in its
    tolerant mode (`contracts.card.card_problem`: the identity keys of a card of any version, never a symlink)."""
    return card_problem(folder)


def check_replaceable(output: Path) -> None:
    """Refuse (InputError) to replace `output` unless it is a prepared directory made by this tool."""
    if output.is_symlink() or not output.is_dir():
        raise InputError(f"output {output} exists and is not a directory")
    try:
        problem = _card_problem(output)
        strays = _strays(output)
    except OSError as err:
        raise InputError(f"output {output}: cannot inspect it ({err.strerror or err}); refusing to replace it") from None
    if problem is None and strays:
        shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        problem = f"it holds {shown}"
    if problem is not None:
        raise InputError(f"output {output} is not a prepared directory made by guard prepare ({problem}); "
                         "--overwrite only replaces those",
                         hint="choose another --out; nothing was changed")


def check_placement(output: Path, *, dataset_root: Path | None, policy_dir: Path | None) -> None:
    """Refuse an output that is, contains or lies inside the dataset root, or is or contains the policy's folder."""
    output = output.resolve()
    if dataset_root is not None:
        root = dataset_root.resolve()
        if output == root or output.is_relative_to(root) or root.is_relative_to(output):
            where = "is" if output == root else "is inside" if output.is_relative_to(root) else "contains"
            raise InputError(f"output {output} {where} the dataset root {root}",
                             hint="write the prepared directory outside the dataset (--out or the policy's output)")
    if policy_dir is not None:
        folder = policy_dir.resolve()
        if folder.is_relative_to(output):
            raise InputError(f"output {output} {'is' if folder == output else 'contains'} the policy's folder {folder}",
                             hint="write the prepared directory elsewhere (--out or the policy's output)")


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _acquire(output: Path) -> int:

    lock = _lock_path(output)
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise InputError(f"cannot lock output {output}: {lock}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"another guard prepare is writing {output}",
                             hint=f"wait for it to finish (it holds {lock})") from None
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    raise InputError(f"cannot lock output {output}: {lock} keeps changing")


def _release(fd: int, output: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(output))  # while still locked, so no one else holds a lock on this file
    os.close(fd)


@contextmanager
def claim_output(output: Path, *, overwrite: bool, dataset_root: Path | None = None,
                 policy_dir: Path | None = None) -> Iterator[None]:
    """Check where `output` is and whether it may be written, then hold its lock for the whole run.

    Everything is checked before any work: the placement, the lock (another run writing the same
    output → InputError at once), and an existing output (refused unless --overwrite and a prepared dir).
    """
    check_placement(output, dataset_root=dataset_root, policy_dir=policy_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(output)
    try:
        clean_stale(output)
        _check_existing(output, overwrite)
        yield
    finally:
        _release(fd, output)


def clean_stale(output: Path) -> None:
    """Remove temporary directories of dead runs; restore an output a dead --overwrite moved aside.

    Only directories that hold nothing but prepared files are removed.
    """
    if not output.parent.is_dir():
        return
    for path, pid in _siblings(output, "partial"):
        if not _pid_alive(pid) and path.is_dir() and not path.is_symlink() and not _strays(path, partial=True):
            shutil.rmtree(path, ignore_errors=True)
    for path, pid in _siblings(output, "old"):
        if _pid_alive(pid) or path.is_symlink() or not path.is_dir():
            continue
        if not output.exists():
            path.rename(output)
        elif _card_problem(path) is None and not _strays(path):
            shutil.rmtree(path, ignore_errors=True)


def _check_existing(output: Path, overwrite: bool) -> None:
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"output {output} already exists", hint="pass --overwrite to replace it, or --out to write elsewhere")
    check_replaceable(output)


def start_output(output: Path, *, overwrite: bool) -> Path:
    """Check that `output` may be written and return a fresh temporary sibling to build it in."""
    clean_stale(output)
    _check_existing(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o700)  # protected-derived data: owner-only, whatever the umask
    return staging


def finish_output(staging: Path, output: Path) -> None:
    """Move the complete `staging` directory to `output`, replacing any previous prepared directory."""
    previous = None
    if output.exists() or output.is_symlink():
        check_replaceable(output)  # again: it may have changed while this run worked
        previous = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        output.rename(previous)
    staging.rename(output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def abandon_output(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
