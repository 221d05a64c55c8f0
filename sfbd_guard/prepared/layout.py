"""The prepared directory's names: the one place they are spelled (tests/test_layout.py checks it).

    card.json          what was prepared, from which policy, with which noise; the sha256 of every file (card.py)
    card.sig           the data owner's Ed25519 signature of card.json, when asked for (keys/signing.py)
    manifest.parquet   one row per source record (manifest.py)
    clean/             the licensed-clean images, uint8 shards as they are
    protected/         the protected images, only as noisy copies y = x + σε (float shards)

Nothing else is ever in it: the writer refuses to replace a folder holding anything else, the reader refuses
to open one (symlinks, other names, nested folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CARD = "card.json"
SIGNATURE = "card.sig"
MANIFEST = "manifest.parquet"
CLEAN = "clean"
PROTECTED = "protected"
SHARD_FOLDERS = (CLEAN, PROTECTED)  # the partitions whose pixels are stored, one folder each
ENTRIES: dict[str, Literal["file", "dir"]] = {MANIFEST: "file", CARD: "file", SIGNATURE: "file", CLEAN: "dir",
                                              PROTECTED: "dir"}
REQUIRED = (CARD, MANIFEST, CLEAN, PROTECTED)  # the signature is optional


def shard_name(partition: str, index: int) -> str:
    """A shard's path relative to the directory, as the manifest's `file` column and card.json's files name it."""
    return f"{partition}/shard-{index:05d}.npy"


@dataclass(frozen=True)
class PreparedPaths:
    """The paths of a prepared directory rooted at `root` (which need not exist yet: the writer's staging folder)."""

    root: Path

    @property
    def card(self) -> Path:
        return self.root / CARD

    @property
    def signature(self) -> Path:
        return self.root / SIGNATURE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def partition(self, name: str) -> Path:
        if name not in SHARD_FOLDERS:
            raise ValueError(f"{name!r} is not a folder of a prepared directory ({', '.join(SHARD_FOLDERS)})")
        return self.root / name
