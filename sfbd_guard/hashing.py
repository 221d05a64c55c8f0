"""Every sha256 the tool computes, in one place: file and byte digests, fingerprints of {name: digest}
mappings, the pixel hash of a record, and the seeded ranks used to sample records and subsets.

Outputs are part of the contracts (card.json, the manifest, the ledger): changing any function here changes
recorded evidence, so each one is pinned by a test (tests/test_contracts.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .regular import open_regular

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from .symmetry import Variant

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file's bytes (OSError if it is not one)."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:  # a FIFO or a device is refused (NotRegularFileError), never waited on
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def new_sha256() -> hashlib._Hash:
    """An incremental sha256 (for writers that hash what they write)."""
    return hashlib.sha256()


def fingerprint(items: dict[str, str]) -> str:
    """One sha256 over a {name: sha256} mapping, independent of insertion order."""
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(items.items()))
    return sha256_bytes(lines.encode())


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hex sha256 of a record's transformed uint8 pixels, (C, H, W) in C order."""
    import numpy as np

    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def canonical_sha256(pixels: np.ndarray, variants: Sequence[Variant]) -> list[str]:
    """Per uint8 (N, C, H, W) image, the pixel sha256 of its canonical variant (symmetry.canonical): equal for an
    image and each of its variants under the group of `variants`; the pixel sha256 itself for the trivial group."""
    from .symmetry import canonical

    return [pixel_sha256(image) for image in canonical(pixels, variants)]


DIGEST_KEY_ID_LABEL = b"sfbd_guard/digest-key-id/v1"


def digest_key_id(digest_key: bytes) -> str:
    """Public name of a digest key (HMAC-SHA256(digest_key, label), hex): the card records it, so a verifier
    given another directory's digest key is told so instead of reading every clean row as tampered."""

    return hmac.new(digest_key, DIGEST_KEY_ID_LABEL, hashlib.sha256).hexdigest()


def keyed_digest(digest_key: bytes, pixel_sha256: str) -> str:
    """A pixel digest that confirms nothing without the key: HMAC-SHA256(digest_key, the 32 bytes of a hex
    pixel sha256), hex (keys/digests.py: what a prepared directory says about a record's pixels)."""

    return hmac.new(digest_key, bytes.fromhex(pixel_sha256), hashlib.sha256).hexdigest()


def keyed_text(key: bytes, text: str) -> str:
    """HMAC-SHA256(key, UTF-8 text), hex: an id that names nothing without the key (disclosure.py's opaque ids)."""

    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def unit_rank(seed: int, key: str) -> bytes:
    """A sortable pseudo-random rank of `key` under `seed`: sha256("seed:key"). Sorting by it gives a seeded
    shuffle that depends on neither the order nor the number of the other keys (sampling units, holdouts)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def seeded_subset(ids: list[str], limit: int, seed: int) -> list[str]:
    """At most `limit` of `ids`, chosen by `unit_rank` (stable under reordering), returned sorted."""
    ranked = sorted(ids, key=lambda rid: unit_rank(seed, rid))
    return sorted(ranked[:limit])


def image_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of image `index` of a run of `guard sample --seed seed`."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def json_sha256(payload: object) -> str:
    """Hex sha256 of `payload` as compact JSON with sorted keys (cache keys)."""

    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())
