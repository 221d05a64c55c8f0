"""The data owner's secret and the subkeys derived from it.

One 256-bit owner secret (a key file, mode 0600) is the root. Three subkeys are derived from it with HKDF
(RFC 5869, SHA-256, `cryptography`), each under its own `info` label, so that holding one says nothing of
the others or of the root:
- the noise subkey keys every protected record's noise (noise.py);
- the digest subkey keys every pixel digest written into a prepared directory; it can be exported for a
  verifier (`guard key export-digest`), and regenerates no noise;
- the register subkey keys the digests of the owner's release register (register.py).
No subkey is ever written next to data. The card records the key id, HMAC(secret, label), which tells two
directories made with one key apart from others and reveals nothing about the key.

By default the first `guard prepare` creates the owner's secret in the user's configuration folder
($GUARD_KEY_FILE if set, a path; else $XDG_CONFIG_HOME/sfbd_guard/owner.key, else
~/.config/sfbd_guard/owner.key) and every later prepare reuses it: the same record with the same pixels then
always carries the same noise, so preparing again after a rule change releases identical copies that
averaging cannot thin out. `--noise-key` or `noise.key_file` choose another key file; `--ephemeral-key`
draws a throw-away secret for one prepare (no one can ever regenerate that noise). Only `guard prepare` and
`guard key` read a key file; the key never enters the prepared directory, a run directory, the ledger or a
report.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .digests import DIGEST_HEADER, KEY_BYTES, read_secret_file, write_secret_file
from .owner import KEY_ENV, default_key_path

HEADER = "sfbd-guard-noise-key-v1"
_ID_LABEL = b"sfbd_guard/key-id/v1"
# HKDF info labels of the subkeys: distinct, versioned, never reused for another purpose.
NOISE_INFO = b"sfbd_guard/subkey/noise/v2"
DIGEST_INFO = b"sfbd_guard/subkey/digest/v1"
REGISTER_INFO = b"sfbd_guard/subkey/register/v1"
OPAQUE_INFO = b"sfbd_guard/subkey/opaque-id/v1"  # the opaque ids of excluded records in the trainer's manifest
_COMMENT = ("# sfbd_guard owner key. Keep it secret: with it, anyone holding a prepared directory made with it can\n"
            "# rebuild the protected originals. Only guard prepare and guard key read it; never copy it next to the data.\n")


def derive(secret: bytes, info: bytes) -> bytes:
    """A 256-bit subkey of `secret`: HKDF-SHA256 with no salt (the secret is uniform) and `info` as its label."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class NoiseKey:
    """The owner's secret and where it came from. Its repr never shows the secret or a subkey."""

    secret: bytes = field(repr=False)
    source: str  # "ephemeral" (fresh, discarded after the run) or "key_file"

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ValueError("a noise key is 32 bytes")

    @property
    def key_id(self) -> str:
        """Public identifier of the key: HMAC-SHA256(secret, label), hex."""
        return hmac.new(self.secret, _ID_LABEL, hashlib.sha256).hexdigest()

    @property
    def noise_subkey(self) -> bytes:
        return derive(self.secret, NOISE_INFO)

    @property
    def digest_subkey(self) -> bytes:
        return derive(self.secret, DIGEST_INFO)

    @property
    def register_subkey(self) -> bytes:
        return derive(self.secret, REGISTER_INFO)

    @property
    def opaque_subkey(self) -> bytes:
        return derive(self.secret, OPAQUE_INFO)

    def __reduce__(self) -> tuple[type[NoiseKey], tuple[bytes, str]]:
        # Picklable for the decoding worker processes (sent through a pipe, never written to disk).
        return (NoiseKey, (self.secret, self.source))


def fresh_key() -> NoiseKey:
    """A random secret for one `guard prepare`, never stored."""
    return NoiseKey(secrets.token_bytes(KEY_BYTES), "ephemeral")


def create_key_file(path: Path) -> NoiseKey:
    """Write a new random key to `path` (mode 0600, never over an existing file)."""
    key = NoiseKey(secrets.token_bytes(KEY_BYTES), "key_file")
    write_secret_file(path, f"{_COMMENT}{HEADER} {key.secret.hex()}\n")
    return key


@dataclass(frozen=True)
class OwnerKey:
    """The owner's key as found (or created) at its default place."""

    key: NoiseKey
    path: Path
    created: bool


def owner_key(path: Path | None = None, *, forbidden: tuple[Path, ...] = (), create: bool = True) -> OwnerKey:
    """The owner's key at `path` (default: `default_key_path()`), created there (folder 0700, file 0600) if missing.

    Two first prepares racing create one key: the file is created exclusively and the loser reads the winner's."""
    path = path or default_key_path()
    resolved = path.resolve()
    for folder in forbidden:
        if _inside(resolved, folder.resolve()):
            raise InputError(f"owner key {path}: lies inside {folder}, which is handed to others",
                             hint=f"point {KEY_ENV} at a file outside the prepared directory")
    if not path.exists() and not create:
        raise InputError(f"owner key {path}: not there yet", hint=f"the first guard prepare creates it (or set {KEY_ENV})")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = _publish_new_key(path)
        if created is not None:
            return OwnerKey(created, path, True)
    return OwnerKey(read_key_file(path, forbidden=forbidden), path, False)


def _publish_new_key(path: Path) -> NoiseKey | None:
    """A new key written whole to a temporary file (0600) and linked to `path` only if nothing is there (None if
    another prepare got there first): a reader never sees a half-written key."""
    key = NoiseKey(secrets.token_bytes(KEY_BYTES), "key_file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"{_COMMENT}{HEADER} {key.secret.hex()}\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
    finally:
        os.unlink(tmp)
    return key


def export_digest_key(key: NoiseKey, path: Path) -> None:
    """Write `key`'s digest subkey to `path` (mode 0600, never over a file) for a verifier: it checks the keyed
    pixel digests of prepared directories made with `key` and regenerates no noise."""
    write_secret_file(path, f"# sfbd_guard digest key (key id {key.key_id[:16]}): checks pixel digests, "
                            f"cannot regenerate noise\n{DIGEST_HEADER} {key.digest_subkey.hex()}\n")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def read_key_file(path: Path, *, forbidden: tuple[Path, ...] = ()) -> NoiseKey:
    """Read a key file made by `guard keygen`; refuse one that others can read or that lies in `forbidden`."""
    resolved = path.resolve()
    for folder in forbidden:
        if _inside(resolved, folder.resolve()):
            raise InputError(f"noise key {path}: lies inside {folder}, which is handed to others",
                             hint="keep the key outside the prepared directory")
    secret = read_secret_file(path, HEADER, what="noise key", foreign="not a key file made by guard keygen",
                              missing_hint="create one with: guard keygen FILE")
    return NoiseKey(secret, "key_file")
