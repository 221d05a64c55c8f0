"""Read an export folder back: exactly the files its export.json lists, each with its sha256, all on the allow-list.

`load_exported` and `push_export` both start here, so a file added to (or changed in) a folder after `guard export`
is never loaded or uploaded."""

from __future__ import annotations

from pathlib import Path

from ..contracts.export_record import ExportRecord, read_export_record
from ..errors import InputError
from ..hashing import sha256_file
from .layout import FILES, RECORD


def checked_export(folder: Path) -> ExportRecord:
    """export.json of `folder`, after checking every file of the folder against it; else one input error."""
    if not folder.is_dir() or folder.is_symlink():
        raise InputError(f"{folder}: not an export folder", hint="guard export --run RUN --out DIR writes one")
    if (folder / RECORD).is_symlink():
        raise InputError(f"{folder / RECORD}: a symbolic link")
    record = read_export_record(folder)
    listed = {f.path: f for f in record.files}
    allowed = set(FILES[record.format])
    found: set[str] = set()
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise InputError(f"{folder}: {name} is a symbolic link; an export holds regular files only")
        if path.is_file() and name != RECORD:
            found.add(name)
    extra = sorted(found - set(listed))
    if extra:
        raise InputError(f"{folder}: files export.json does not list: {', '.join(extra[:5])}",
                         hint="remove them, or export the run again")
    outside = sorted(set(listed) - allowed)
    if outside:
        raise InputError(f"{folder}/export.json lists files outside the export layout: {', '.join(outside[:5])}")
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{folder}: {name} is missing", hint="export the run again")
        if sha256_file(path) != entry.sha256:
            raise InputError(f"{folder}: {name} is not the file export.json records (sha256 differs)",
                             hint="export the run again")
    return record
