"""Where the data owner's own files live, apart from everything handed to others.

The owner's folder is the folder of the owner's key: $GUARD_KEY_FILE's folder when that variable names a key
file (a path, never the key itself), else $XDG_CONFIG_HOME/sfbd_guard, else ~/.config/sfbd_guard. It holds:

    owner.key           the owner's secret (keys/secret.py; 0600)
    releases.parquet    the release register (curation/register.py)
    digest-keys/<digest key id>.key
                        the digest subkey of each key that prepared a directory here (the file guard key
                        export-digest writes), so the owner's own `guard run` can check the keyed pixel digests
                        without opening the owner's secret
    lineage/<fingerprint>.parquet
                        the full manifest of each prepared directory (file names, licences, metadata, plain pixel
                        sha256 of every record, excluded ones included), written by `guard prepare`; the prepared
                        directory's own manifest says only what training needs (curation/disclosure.py)

Only the owner's tools read the lineage: the audit (it checks the protected originals it reads against their
sha256) and the datasheet (licences). Nothing here reads a key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

KEY_ENV = "GUARD_KEY_FILE"  # a path to the owner's key file, never the key itself
KEY_NAME = "owner.key"
LINEAGE = "lineage"
DIGEST_KEYS = "digest-keys"


def default_key_path() -> Path:
    """Where the owner's key lives: $GUARD_KEY_FILE (a path), else the user's configuration folder."""
    explicit = os.environ.get(KEY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_absolute():  # its value is never echoed: someone may have pasted the key itself
            raise InputError(f"{KEY_ENV} must hold the absolute path of the owner's key file, never the key itself",
                             hint=f"e.g. {KEY_ENV}=$HOME/.config/sfbd_guard/owner.key")
        return path
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"
    return base / "sfbd_guard" / KEY_NAME


def owner_dir() -> Path:
    return default_key_path().parent


def lineage_path(fingerprint: str, folder: Path | None = None) -> Path:
    """The owner's full manifest of the prepared directory of this fingerprint (in `folder`, default the owner's)."""
    if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
        raise InputError(f"fingerprint {fingerprint[:80]!r}: not a sha256")
    return (folder or owner_dir()) / LINEAGE / f"{fingerprint}.parquet"


def digest_key_path(digest_key_id: str, folder: Path | None = None) -> Path:
    """Where the owner keeps the digest key named `digest_key_id` (hashing.digest_key_id; a card records it)."""
    if not digest_key_id or not all(c in "0123456789abcdef" for c in digest_key_id):
        raise InputError(f"digest key id {digest_key_id[:80]!r}: not a sha256")
    return (folder or owner_dir()) / DIGEST_KEYS / f"{digest_key_id}.key"


def owner_digest_key(digest_key_id: str | None) -> Path | None:
    """The owner's digest key file for a card's `digest_key_id`, if this machine's owner folder has it."""
    if digest_key_id is None:
        return None
    path = digest_key_path(digest_key_id)
    return path if path.is_file() else None


def read_lineage(fingerprint: str, columns: list[str], *, why: str) -> pa.Table:
    """`columns` of the owner's full manifest of a prepared directory; InputError (exit 2) when this machine's
    owner folder has none (the directory was prepared elsewhere, or by another owner)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = lineage_path(fingerprint)
    if not path.is_file():
        raise InputError(f"{why} needs the data owner's lineage of this prepared directory ({path}), which is not here",
                         hint=f"run it where the directory was prepared, or set {KEY_ENV} to the owner's key file "
                              "in the folder that holds lineage/")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"lineage {path}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
