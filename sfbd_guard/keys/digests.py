"""Keyed pixel digests: what a prepared directory says about a record's pixels.

A plain sha256 of a protected or excluded image confirms a guess: whoever holds a candidate image learns
whether it is in the data. Every pixel digest written into a prepared directory is therefore
HMAC-SHA256(digest_key, pixel sha256), where the digest key is a subkey of the owner's secret
(keys/secret.py). The owner can export it (`guard key export-digest FILE`) to a verifier, who can then
check that no clean row is a protected or excluded image (`guard verify --digest-key FILE`); the digest key
regenerates no noise and derives no other key.

This module reads and writes digest key files only; the owner's secret is read by keys/secret.py alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError
from ..fileio import NotRegularFileError, open_regular
from ..hashing import keyed_digest

__all__ = ["DIGEST_HEADER", "keyed_digest", "read_digest_key", "read_secret_file", "write_secret_file"]

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


MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: Path, header: str, *, what: str, missing_hint: str, foreign: str) -> bytes:
    """The 32-byte secret of a key file (`header` + hex on its one uncommented line): a regular file (checked on
    the file opened: a FIFO is refused, never waited on), owner-only, owned by this user; InputError naming `what`
    otherwise, `foreign` when its content is not such a file."""
    try:
        with open_regular(path) as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: file not found", hint=missing_hint) from None
    except NotRegularFileError:
        raise InputError(f"{what} {path}: not a regular file") from None
    except OSError as err:
        raise InputError(f"{what} {path}: cannot read it ({err.strerror})") from None
    if info.st_mode & 0o077:
        raise InputError(f"{what} {path}: readable or writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})",
                         hint=f"chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise InputError(f"{what} {path}: owned by another user")
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise InputError(f"{what} {path}: {foreign} (too large)")
    try:
        lines = [line.strip() for line in data.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: {foreign}") from None
    body = [line for line in lines if line and not line.startswith("#")]
    parts = body[0].split() if len(body) == 1 else []
    if len(parts) != 2 or parts[0] != header or len(parts[1]) != 2 * KEY_BYTES:
        raise InputError(f"{what} {path}: {foreign}", hint=missing_hint)
    try:
        return bytes.fromhex(parts[1])
    except ValueError:
        raise InputError(f"{what} {path}: {foreign}") from None


def read_digest_key(path: Path) -> bytes:
    """The digest key in a file written by `guard key export-digest` (owner-only, as a key file)."""
    return read_secret_file(path, DIGEST_HEADER, what="digest key", foreign="not a digest key file",
                            missing_hint="the data owner writes it with: guard key export-digest FILE")
