"""The manifest of a prepared directory: one row per source record of the selected split."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..errors import InputError

SCHEMA_VERSION = 4  # 2: no noise_seed column (the noise is keyed by a secret); 3: dup_* columns (dedup);
# 4: canonical_sha256 (dedup through rotations, flips and inversion)
PARTITIONS = ("clean", "protected", "excluded", "error")
# held-out records are stored nowhere either: partition excluded, told apart from opt-outs by their rule's action
ACTION_PARTITION = {"clean": "clean", "protect": "protected", "exclude": "excluded", "holdout": "excluded"}

# The columns the product owns, in this order; the format's metadata columns follow.
MANIFEST_FIELDS: list[pa.Field[Any]] = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("partition", pa.string(), nullable=False),  # clean | protected | excluded | error
    pa.field("rule", pa.string()),  # the deciding rule; null for error
    pa.field("sha256", pa.string()),  # sha256 of the transformed uint8 pixels (C, H, W); null for error
    pa.field("sigma", pa.float64()),  # 0 for clean; null for excluded and error
    pa.field("file", pa.string()),  # .npy path relative to the prepared directory; null for excluded/error
    pa.field("row", pa.int64()),  # row in that file
    pa.field("error", pa.string()),  # why the record could not be read; null otherwise
    # dedup (curation/dedup.py): sha256 of the canonical variant of the pixels under the policy's dedup transforms
    # (symmetry.py; the same for a rotated, flipped or colour-inverted copy); null for error and with dedup off
    pa.field("canonical_sha256", pa.string()),
    # dedup: null unless the record is in a cluster of copies of two or more records
    pa.field("dup_cluster", pa.string()),  # the cluster's id: the record id of its representative (dup_of's target)
    pa.field("dup_of", pa.string()),  # the record that imposed the cluster's action; null for that record itself
    pa.field("dup_kind", pa.string()),  # exact (same canonical_sha256 as dup_of) | near (embedding at/above threshold)
    pa.field("dup_similarity", pa.float64()),  # cosine similarity to dup_of's embedding, best variant (1.0 for exact)
    pa.field("dup_rule", pa.string()),  # a demoted record's own deciding rule (its `rule` is then `duplicate`)
]
MANIFEST_COLUMNS = tuple(f.name for f in MANIFEST_FIELDS)  # a dataset's metadata may not use these names
DUP_COLUMNS = tuple(name for name in MANIFEST_COLUMNS if name.startswith("dup_"))  # filled in by dedup


def manifest_schema(metadata: pa.Schema) -> pa.Schema:
    """The manifest's schema: the product's columns, then the dataset's metadata columns (but its record_id).
    A metadata column named like one of the product's is refused (the readers refuse most of them already)."""
    own = {f.name.lower() for f in MANIFEST_FIELDS}
    clashes = [name for name in metadata.names if name != "record_id" and name.lower() in own]
    if clashes:
        raise InputError(f"metadata column(s) {', '.join(map(repr, clashes))} clash with the manifest's own columns",
                         hint="rename them in the metadata file")
    fields = [*MANIFEST_FIELDS, *(f for f in metadata if f.name != "record_id")]
    return pa.schema(fields, metadata={b"guard.manifest_schema": str(SCHEMA_VERSION).encode()})


def manifest_table(columns: dict[str, list[Any]], metadata: pa.Table) -> pa.Table:
    """The product's columns (explicit schema) followed by the dataset's metadata columns."""
    own = pa.table({f.name: pa.array(columns[f.name], f.type) for f in MANIFEST_FIELDS}, schema=pa.schema(MANIFEST_FIELDS))
    for name in metadata.column_names:
        if name != "record_id":
            own = own.append_column(metadata.schema.field(name), metadata.column(name))
    return own.replace_schema_metadata({b"guard.manifest_schema": str(SCHEMA_VERSION).encode()})
