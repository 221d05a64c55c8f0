"""A prepared directory's manifest rows as guard verify reads them, and the digests of the pixels its clean rows hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..hashing import keyed_digest, pixel_sha256
from ..prepared.layout import MANIFEST


def manifest_rows(data: Path) -> tuple[list[dict[str, Any]], bool]:
    """The manifest's rows, with each row's pixel digest as `digest`; and whether the digests are keyed (made since
    prepare keys them: curation/disclosure.py) or plain sha256 (older directories)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(data / MANIFEST).names)
    keyed = "digest" in names
    digest, canonical = ("digest", "canonical_digest") if keyed else ("sha256", "canonical_sha256")
    columns = ["record_id", "partition", "rule", digest, "sigma", "file", "row"]
    columns += [name for name in (canonical, "dup_rule") if name in names]  # absent from older manifests
    table = pq.read_table(data / MANIFEST, columns=columns)
    renamed = {digest: "digest", canonical: "canonical"}
    return table.rename_columns([renamed.get(name, name) for name in columns]).to_pylist(), keyed


def clean_row_hashes(data: Path, rows: list[dict[str, Any]], digest_key: bytes | None) -> dict[str, str]:
    """record_id → digest of the pixels actually stored in its clean array row: their sha256, keyed with
    `digest_key` when given (as the manifest's digests are)."""
    arrays: dict[str, np.ndarray] = {}
    hashes = {}
    for row in rows:
        if row["partition"] == "clean":
            array = arrays.setdefault(row["file"], np.load(data / row["file"], mmap_mode="r"))
            sha = pixel_sha256(np.asarray(array[row["row"]]))
            hashes[row["record_id"]] = keyed_digest(digest_key, sha) if digest_key is not None else sha
    return hashes
