"""What the prepared directory's manifest tells the trainer: only what training needs.

`guard prepare` first writes the full manifest (manifest.py: every record's file name, metadata and plain pixel
sha256). That full manifest is the owner's lineage (keys/owner.py: `lineage/<fingerprint>.parquet` in the owner's
folder, never in the prepared directory). The manifest handed to the trainer is derived from it here:

- `digest` replaces `sha256` and `canonical_digest` replaces `canonical_sha256` (dedup's canonical variant):
  HMAC-SHA256(digest subkey, the sha256) (hashing.keyed_digest). Equal images have equal digests (the duplicate
  checks still work), but a digest confirms no guess without the digest key, which the owner may hand to a
  verifier (`guard key export-digest`; `guard verify --digest-key`).
- excluded records keep only their partition, their rule, their keyed digest and an opaque id
  (`excluded-` + HMAC(opaque subkey, record id), 32 hex digits): no file name, licence, metadata or plain digest;
  a `dup_cluster`/`dup_of` that names an excluded record names its opaque id.
- error rows (records that could not be read) are opaque the same way (`error-` + the same HMAC), and their
  `error` says only that the owner's lineage holds the reason: a reason names the file, and a file that failed
  to decode may be an opted-out or protected image.
- the dataset's metadata columns reach the manifest only when the policy lists them (`manifest: {metadata: [...]}`,
  default none), and never for excluded or error records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..hashing import keyed_digest, keyed_text
from ..prepared.manifest import MANIFEST_FIELDS

SCHEMA_VERSION = 5  # 5: keyed `digest` and `canonical_digest` instead of `sha256` and `canonical_sha256`;
# excluded records opaque; metadata by allow-list (the full manifest, manifest.py, is version 4)
OPAQUE_PREFIX = "excluded-"
HIDDEN = {"excluded": OPAQUE_PREFIX, "error": "error-"}  # partitions whose records the trainer sees opaque: prefix
ERROR_TEXT = "unreadable (the reason is in the data owner's lineage)"
KEYED = {"sha256": "digest", "canonical_sha256": "canonical_digest"}  # plain column -> its keyed replacement


def opaque_id(opaque_key: bytes, record_id: str, prefix: str = OPAQUE_PREFIX) -> str:
    return prefix + keyed_text(opaque_key, record_id)[:32]


def trainer_schema(full: pa.Schema, allowed: list[str]) -> pa.Schema:
    own: list[pa.Field[Any]] = [pa.field(KEYED[f.name], pa.string()) if f.name in KEYED else f for f in MANIFEST_FIELDS]
    own += [full.field(name) for name in allowed]
    return pa.schema(own, metadata={b"guard.manifest_schema": str(SCHEMA_VERSION).encode()})


def _check_allowed(full: pa.Schema, allowed: list[str]) -> None:
    product = {f.name for f in MANIFEST_FIELDS}
    metadata = [name for name in full.names if name not in product]
    for name in allowed:
        if name not in metadata:
            raise InputError(f"policy manifest.metadata: {name!r} is not a metadata column of the dataset",
                             hint=f"metadata columns: {', '.join(metadata[:20]) or 'none'}")


def write_trainer_manifest(full: Path, out: Path, *, digest_key: bytes, opaque_key: bytes, allowed: list[str]) -> None:
    """Write the trainer's manifest at `out` from the full manifest at `full`, one row group at a time."""
    source = pq.ParquetFile(full)
    _check_allowed(source.schema_arrow, allowed)
    schema = trainer_schema(source.schema_arrow, allowed)
    ids = pq.read_table(full, columns=["record_id", "partition"])
    opaque: dict[str, str] = {}
    for partition, prefix in HIDDEN.items():
        hidden = ids.filter(pc.equal(ids.column("partition"), pa.scalar(partition))).column("record_id").to_pylist()
        opaque |= {str(rid): opaque_id(opaque_key, str(rid), prefix) for rid in hidden}
    del ids
    with pq.ParquetWriter(str(out), schema) as writer:
        for group in range(source.num_row_groups):
            writer.write_table(_trainer_rows(source.read_row_group(group), schema, digest_key, opaque, allowed))
        if source.num_row_groups == 0:
            writer.write_table(schema.empty_table())


def _trainer_rows(rows: pa.Table, schema: pa.Schema, digest_key: bytes, opaque: dict[str, str],
                  allowed: list[str]) -> pa.Table:
    excluded = [p in HIDDEN for p in rows.column("partition").to_pylist()]  # excluded and error rows

    def hide(name: str) -> pa.Array[Any]:
        """The column with excluded rows' values replaced: ids by their opaque ids, anything else by null."""
        values = rows.column(name).to_pylist()
        if name in ("record_id", "dup_cluster", "dup_of"):
            return pa.array([opaque.get(v, v) if v is not None else None for v in values], pa.string())
        kind = rows.schema.field(name).type
        hidden: pa.Array[Any] = pa.array([None if gone else v for v, gone in zip(values, excluded, strict=True)], kind)
        return hidden

    columns: dict[str, pa.Array[Any] | pa.ChunkedArray[Any]] = {}
    plain = {keyed: name for name, keyed in KEYED.items()}
    for field in schema:
        if field.name in plain:
            shas = rows.column(plain[field.name]).to_pylist()
            columns[field.name] = pa.array([None if s is None else keyed_digest(digest_key, s) for s in shas],
                                           pa.string())
        elif field.name in ("record_id", "dup_cluster", "dup_of"):
            columns[field.name] = hide(field.name) if opaque else rows.column(field.name)
        elif field.name == "error":
            columns[field.name] = pa.array([ERROR_TEXT if e is not None else None for e in rows.column("error").to_pylist()],
                                           pa.string())
        elif field.name in ("dup_similarity", *allowed):
            columns[field.name] = hide(field.name) if any(excluded) else rows.column(field.name)
        else:
            columns[field.name] = rows.column(field.name)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
