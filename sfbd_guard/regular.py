"""Reading only regular files: never a FIFO (which would block forever), a socket or a device.

fileio.py re-exports these; hashing.py uses them without importing fileio (which hashes what it writes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["NotRegularFileError", "open_regular", "read_regular"]


class NotRegularFileError(OSError):
    """A path that names a FIFO, a socket, a device or a directory where a regular file is read."""


def open_regular(path: Path, *, follow_links: bool = True) -> BinaryIO:
    """`path` opened for reading, only if it is a regular file; OSError (FileNotFoundError, NotRegularFileError...)
    otherwise.

    O_NONBLOCK: opening a FIFO returns at once (a blocking open waits for a writer forever), and the fstat of
    the open file, not of the name, decides, so a file swapped after a check is judged as what is opened.
    follow_links=False adds O_NOFOLLOW (a dataset's own files: a final symlink is refused, not followed); an
    option the user typed (a key, a config) may be a symlink, as key stores and mounted secrets make them.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow_links else flags | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(0, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file `path` (the caller refuses more than `limit`); OSError if
    it is missing, unreadable or not a regular file (see `open_regular`)."""
    with open_regular(path) as handle:
        return handle.read(limit + 1)
