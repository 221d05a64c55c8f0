"""Ed25519 signatures of a prepared directory's card, for data owners who hand the directory to others.

The owner creates a key pair once (`guard signkey create --private owner.key --public owner.pub`), signs at
prepare time (`guard prepare --sign-key owner.key`) and gives the public key to the training team, whose
`guard train --verify-key owner.pub` (or the pipeline's `verify_key`) and `guard verify --verify-key` check it.
The signature covers the exact bytes of card.json, which records the sha256 of every array file and of
the manifest (checked by `open_prepared`), the counts, sigma and the policy: a card that was edited or
re-fingerprinted after signing no longer verifies. The signature is stored in `card.sig` (JSON: algorithm,
the sha256 of the raw public key, the signature in hex); nothing secret goes into the prepared directory.

Keys are PEM files (PKCS#8 private key without a passphrase, SubjectPublicKeyInfo public key). The private
key is written with mode 0600 and refused when group or others can read it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import InputError, VerificationError
from ..fileio import NotRegularFileError, atomic_write_bytes, open_regular, read_regular
from ..hashing import sha256_bytes
from ..prepared.layout import CARD, SIGNATURE

ALGORITHM = "ed25519"
MAX_KEY_BYTES = 16384  # an Ed25519 PEM key is about 120 bytes


def _raw_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def raw_public_key(public: Any) -> bytes:
    """The raw 32 bytes of an Ed25519 public key (the ledger's signature files hold them in hex)."""
    return _raw_public(public)


def key_fingerprint(public: Any) -> str:
    """sha256 (hex) of the raw 32-byte Ed25519 public key: the id recorded in card.sig and the ledger."""
    return sha256_bytes(_raw_public(public))


def create_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private: mode 0600, never overwritten) and return the public key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InputError(f"{path} already exists", hint="choose new file names; a key is never overwritten")
    if private_path.resolve() == public_path.resolve():
        raise InputError("--private and --public name the same file")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    public = key.public_key()
    pem_public = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(public_path, pem_public)
    return key_fingerprint(public)


def load_private_key(path: Path) -> Any:
    """The Ed25519 private key in `path`; refused if group/other can read it or if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:  # the mode is checked on the file opened (a FIFO is refused, never waited on)
        with open_regular(path) as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(MAX_KEY_BYTES + 1)
    except NotRegularFileError:
        raise InputError(f"--sign-key {path}: not a regular file") from None
    except OSError as err:
        raise InputError(f"--sign-key {path}: cannot read the private key ({err.strerror})") from None
    if mode & 0o077:
        raise InputError(f"--sign-key {path}: the private key is readable by group or others (mode {stat.S_IMODE(mode):04o})",
                         hint=f"chmod 600 {path}")
    if len(data) > MAX_KEY_BYTES:
        raise InputError(f"--sign-key {path}: not a PEM private key (larger than {MAX_KEY_BYTES} bytes)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InputError(f"--sign-key {path}: not a PEM private key without passphrase ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"--sign-key {path}: not an Ed25519 private key", hint="create one with guard signkey create")
    return key


def load_public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = read_regular(path, MAX_KEY_BYTES)  # a FIFO or a device is refused, never waited on
    except OSError as err:
        raise InputError(f"verify key {path}: cannot read it ({err.strerror})") from None
    if len(data) > MAX_KEY_BYTES:
        raise InputError(f"verify key {path}: not a PEM public key (larger than {MAX_KEY_BYTES} bytes)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise InputError(f"verify key {path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"verify key {path}: not an Ed25519 public key")
    return key


def sign_card(root: Path, key: Any) -> str:
    """Sign root/card.json (its exact bytes) into root/card.sig; returns the public key's fingerprint."""
    card = (root / CARD).read_bytes()
    public = key.public_key()
    payload = {"algorithm": ALGORITHM, "public_key_sha256": key_fingerprint(public), "signature": key.sign(card).hex()}
    atomic_write_bytes(root / SIGNATURE, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    return str(payload["public_key_sha256"])


def verify_card(root: Path, public_key: Path) -> str:
    """Check root/card.sig against root/card.json and `public_key`; returns the key's fingerprint.

    Raises VerificationError when the signature is missing, malformed, by another key, or does not match.
    """
    from cryptography.exceptions import InvalidSignature

    public = load_public_key(public_key)
    expected = key_fingerprint(public)
    sig_path = root / SIGNATURE
    hint = "the data owner signs with guard prepare --sign-key; ask for the signed directory or the right public key"
    if not sig_path.is_file():
        raise VerificationError(f"{root}: no {SIGNATURE}, but a verify key ({public_key}) was given", hint=hint)
    try:
        payload = json.loads(sig_path.read_bytes())
        signature = bytes.fromhex(payload["signature"])
        algorithm = payload["algorithm"]
    except (ValueError, KeyError, TypeError) as err:
        raise VerificationError(f"{sig_path}: not a signature file ({type(err).__name__}: {err})", hint=hint) from None
    if algorithm != ALGORITHM:
        raise VerificationError(f"{sig_path}: algorithm {algorithm!r}, expected {ALGORITHM!r}", hint=hint)
    try:
        public.verify(signature, (root / CARD).read_bytes())
    except InvalidSignature:
        other = payload.get("public_key_sha256")
        why = "it was made by another key" if other != expected else "card.json was changed after signing"
        raise VerificationError(f"{root}: the signature of card.json does not verify with {public_key} ({why})",
                                hint=hint) from None
    return expected
