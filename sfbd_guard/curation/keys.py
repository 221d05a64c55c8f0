"""The data owner's noise key: the secret that the protected records' noise is keyed with.

By default `guard prepare` draws a fresh 256-bit secret (`secrets.token_bytes`) and forgets it when it
ends, so nobody, the data owner included, can ever regenerate the noise. A data owner who wants
byte-identical re-runs keeps a key file made by `guard keygen` (mode 0600) and passes it with
`--noise-key` or `noise.key_file`. Only `guard prepare` reads it; the key never enters the prepared
directory, a run directory, the ledger or a report. The card records the key id, HMAC(secret, label),
which tells two directories made with one key apart from others and reveals nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..fileio import NotRegularFileError, open_regular

KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096
HEADER = "sfbd-guard-noise-key-v1"
_ID_LABEL = b"sfbd_guard/key-id/v1"
_COMMENT = ("# sfbd_guard noise key. Keep it secret: with it, anyone holding a prepared directory made with it can\n"
            "# rebuild the protected originals. Only `guard prepare --noise-key` reads it; never copy it next to the data.\n")


@dataclass(frozen=True)
class NoiseKey:
    """A secret and where it came from. Its repr never shows the secret."""

    secret: bytes = field(repr=False)
    source: str  # "ephemeral" (fresh, discarded after the run) or "key_file"

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ValueError("a noise key is 32 bytes")

    @property
    def key_id(self) -> str:
        """Public identifier of the key: HMAC-SHA256(secret, label), hex."""
        return hmac.new(self.secret, _ID_LABEL, hashlib.sha256).hexdigest()

    def __reduce__(self) -> tuple[type[NoiseKey], tuple[bytes, str]]:
        # Picklable for the decoding worker processes (sent through a pipe, never written to disk).
        return (NoiseKey, (self.secret, self.source))


def fresh_key() -> NoiseKey:
    """A random secret for one `guard prepare`, never stored."""
    return NoiseKey(secrets.token_bytes(KEY_BYTES), "ephemeral")


def create_key_file(path: Path) -> NoiseKey:
    """Write a new random key to `path` (mode 0600, never over an existing file)."""
    key = NoiseKey(secrets.token_bytes(KEY_BYTES), "key_file")
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise InputError(f"{path}: already exists; a key file is never overwritten",
                         hint="choose another file name, or delete the old key only once no one needs it") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(f"{_COMMENT}{HEADER} {key.secret.hex()}\n")
    return key


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def read_key_file(path: Path, *, forbidden: tuple[Path, ...] = ()) -> NoiseKey:
    """Read a key file made by `guard keygen`; refuse one that others can read or that lies in `forbidden`."""
    try:  # checked on the file opened (a FIFO is refused, never waited on)
        with open_regular(path) as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"noise key {path}: file not found", hint="create one with: guard keygen FILE") from None
    except NotRegularFileError:
        raise InputError(f"noise key {path}: not a regular file") from None
    except OSError as err:
        raise InputError(f"noise key {path}: cannot read it ({err.strerror})") from None
    if info.st_mode & 0o077:
        raise InputError(f"noise key {path}: readable or writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})",
                         hint=f"chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise InputError(f"noise key {path}: owned by another user")
    resolved = path.resolve()
    for folder in forbidden:
        if _inside(resolved, folder.resolve()):
            raise InputError(f"noise key {path}: lies inside {folder}, which is handed to others",
                             hint="keep the key outside the prepared directory")
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InputError(f"noise key {path}: not a key file (too large)")
    try:
        lines = [line.strip() for line in data.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"noise key {path}: not a key file made by guard keygen") from None
    body = [line for line in lines if line and not line.startswith("#")]
    parts = body[0].split() if len(body) == 1 else []
    if len(parts) != 2 or parts[0] != HEADER or len(parts[1]) != 2 * KEY_BYTES:
        raise InputError(f"noise key {path}: not a key file made by guard keygen")
    try:
        secret = bytes.fromhex(parts[1])
    except ValueError:
        raise InputError(f"noise key {path}: not a key file made by guard keygen") from None
    return NoiseKey(secret, "key_file")
