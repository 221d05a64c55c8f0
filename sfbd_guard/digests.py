"""Keyed pixel digests: what a prepared directory says about a record's pixels.

A plain sha256 of a protected or excluded image confirms a guess: whoever holds a candidate image learns
whether it is in the data. Every pixel digest written into a prepared directory is therefore
HMAC-SHA256(digest_key, pixel sha256), where the digest key is a subkey of the owner's secret
(curation/keys.py). The owner can export it (`guard key export-digest FILE`) to a verifier, who can then
check that no clean row is a protected or excluded image (`guard verify --digest-key FILE`); the digest key
regenerates no noise and derives no other key.

This module reads and writes digest key files only; the owner's secret is read by curation/keys.py alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError
from .fileio import read_regular
from .hashing import keyed_digest

__all__ = ["DIGEST_HEADER", "keyed_digest", "read_digest_key", "write_secret_file"]

DIGEST_HEADER = "sfbd-guard-digest-key-v1"
KEY_BYTES = 32


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to a new file at `path`, mode 0600 whatever the umask; never over an existing file or a link."""
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise InputError(f"{path}: already exists; a key file is never overwritten",
                         hint="choose another file name, or delete the old key only once no one needs it") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def read_digest_key(path: Path) -> bytes:
    """The digest key in a file written by `guard key export-digest` (owner-only, as a key file)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"digest key {path}: file not found",
                         hint="the data owner writes it with: guard key export-digest FILE") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
        raise InputError(f"digest key {path}: not a digest key file")
    if info.st_mode & 0o077:
        raise InputError(f"digest key {path}: readable or writable by group or others "
                         f"(mode {stat.S_IMODE(info.st_mode):04o})", hint=f"chmod 600 {path}")
    try:
        lines = [line.strip() for line in read_regular(path, 4096).decode("ascii").splitlines()]  # never a FIFO
    except (UnicodeDecodeError, OSError):
        raise InputError(f"digest key {path}: not a digest key file") from None
    body = [line for line in lines if line and not line.startswith("#")]
    parts = body[0].split() if len(body) == 1 else []
    if len(parts) != 2 or parts[0] != DIGEST_HEADER or len(parts[1]) != 2 * KEY_BYTES:
        raise InputError(f"digest key {path}: not a digest key file",
                         hint="the data owner writes it with: guard key export-digest FILE")
    try:
        return bytes.fromhex(parts[1])
    except ValueError:
        raise InputError(f"digest key {path}: not a digest key file") from None
