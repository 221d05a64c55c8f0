"""Duplicates across and within partitions: each cluster of copies takes the strictest action of its members.

Without this, an image that occurs twice leaks: a protected (or opted-out) image whose re-upload a rule
puts in the clean partition is trained on as a clean original, and k protected copies of one image get k
independent noise draws whose mean has noise sigma/sqrt(k).

`guard prepare` (prepare.py) decodes once: the workers hash every record's transformed pixels (sha256)
and compute its embedding here (`embed`) in the same pass; the parent gathers the embeddings into one
staging file (never published: an embedding of a protected original is a low-resolution copy of it), and
after all parts:

1. exact: rows with the same pixel sha256 join (DuckDB group-by over the staged manifest, which spills
   to disk rather than grow);
2. near: FAISS inner-product range search over the unit embeddings, a block of rows against a block at
   a time (bounded memory), with the mirror image of every query when `mirror` is on; pairs at or above
   the threshold join (union-find over one int64 per record);
3. each cluster of two or more takes its strictest action (exclude > protect > clean). Its
   representative, the member with the smallest record id among those whose own rule chose that action,
   keeps its row; with `exclude` or `protect`, every other member that was stored (clean or protected) is
   demoted to `excluded` with rule `duplicate` (its own rule kept in `dup_rule`). So a cluster has at most
   one protected row and no record ever needs new noise: members only lose their stored rows. A cluster
   whose members are all clean changes nothing (its members are still marked with their cluster).

The shard files holding demoted rows are then rewritten without them and the final manifest is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..hashing import sha256_file
from ..policy import DUPLICATE_RULE, DedupSpec
from .manifest import MANIFEST_FIELDS, PARTITIONS
from .shards import READ_BLOCK, npy_header

STAGED_MANIFEST = ".manifest-staged.parquet.tmp"  # the manifest before dedup, in the staging folder
EMBEDDINGS_FILE = ".dedup-embeddings.npy.tmp"  # in the staging folder; deleted before the directory is published
SEARCH_BLOCK = 4096  # rows per block of the range search: two blocks and their matches are in memory at once
STRICTNESS = {"clean": 0, "protect": 1, "exclude": 2}


def embed(pixels: np.ndarray, size: int) -> np.ndarray:
    """float32 (N, size*size) unit vectors of uint8 (N, C, H, W) images: the audit's weight-free pixel embedding
    (audit/embed.py: area-downsampled, minus its own mean, L2-normalised, so cosine = Pearson correlation) of the
    grey image (mean of the channels). Zero for a constant image (it then only joins by sha256)."""
    from ..audit.embed import downsample, normalize_rows

    size = min(size, pixels.shape[-1])
    grey = downsample(pixels, size).mean(axis=1).reshape(len(pixels), -1)
    return normalize_rows(grey - grey.mean(axis=1, keepdims=True))


def mirrored(vectors: np.ndarray, size: int) -> np.ndarray:
    """The pixel embeddings of the mirror images (a horizontal flip commutes with area averaging and z-scoring)."""
    side = math.isqrt(vectors.shape[1]) if vectors.shape[1] else size
    return np.ascontiguousarray(vectors.reshape(len(vectors), side, side)[..., ::-1].reshape(len(vectors), -1))


@dataclass(frozen=True)
class Embedding:
    """How dedup embeds a record; picklable, it travels to the workers (which load a clip model once per part).

    pixel: `embed` at `size`, mirror copies found by searching with `mirrored` queries (`mirror_search`).
    clip: open_clip image features from local weights (audit/clip.py); with `mirror`, the normalised sum of the
    image's and its mirror image's features, so an image and its mirror image get one embedding."""

    kind: str  # pixel | clip
    size: int  # pixel: side of the embedding
    dim: int
    mirror: bool
    clip_weights: str | None = None  # absolute
    clip_model: str = "ViT-B-32"
    quick_gelu: bool = False
    batch: int = 64
    clip_identity: tuple[tuple[str, str], ...] = ()  # model and weights sha256, for the card

    @property
    def mirror_search(self) -> bool:
        return self.kind == "pixel" and self.mirror

    def embedder(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from uint8 (N, C, H, W) pixels to float32 (N, dim) unit rows."""
        if self.kind == "pixel":
            return partial(embed, size=self.size)
        from ..audit.clip import ClipEmbedder
        from ..audit.embed import embed_batched, mirror, normalize_rows

        clip = ClipEmbedder(weights=self.clip_weights, model=self.clip_model, quick_gelu=self.quick_gelu)

        def embed_clip(pixels: np.ndarray) -> np.ndarray:
            features = embed_batched(clip, pixels, self.batch)
            if self.mirror:
                features = normalize_rows(features + embed_batched(clip, mirror(pixels), self.batch))
            return np.asarray(features, np.float32)

        return embed_clip


def embedding_for(spec: DedupSpec, resolution: int, base_dir: Path) -> Embedding:
    """The policy's embedding; for clip, the weights are loaded once here (bad weights: exit 2 before any work)."""
    if spec.embedder == "pixel":
        size = min(spec.size, resolution)
        return Embedding("pixel", size, size * size, spec.mirror)
    from ..audit.clip import ClipEmbedder

    assert spec.clip_weights is not None  # DedupSpec's validator
    weights = str((base_dir / spec.clip_weights).expanduser().resolve())
    clip = ClipEmbedder(weights=weights, model=spec.clip_model, quick_gelu=spec.quick_gelu)
    identity = (("model", clip.model_name), ("weights_sha256", clip.weights_sha256))
    return Embedding("clip", 0, clip.dim, spec.mirror, weights, spec.clip_model, spec.quick_gelu, spec.batch, identity)


class EmbeddingStore:
    """All records' embeddings in one memory-mapped staging file, in record order (filled a part at a time)."""

    def __init__(self, staging: Path, records: int, dim: int) -> None:
        self.path = staging / EMBEDDINGS_FILE
        with open(self.path, "xb") as handle:  # open_memmap would add .npy to the name
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (records, dim)})
            self.offset = handle.tell()
            handle.truncate(self.offset + records * dim * 4)
        self.vectors = np.memmap(self.path, np.float32, "r+", self.offset, (records, dim))

    def add(self, staging: Path, name: str, start: int) -> None:
        part_file = staging / name
        part = np.load(part_file)
        self.vectors[start:start + len(part)] = part
        part_file.unlink()

    def close(self) -> None:
        self.vectors.flush()
        del self.vectors
        self.path.unlink(missing_ok=True)


class UnionFind:
    """Disjoint sets over rows 0..n-1 (one int64 per row)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, row: int) -> int:
        parent = self.parent
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = int(parent[row])
        return row

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        roots = self.parent.copy()
        while True:
            up = roots[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up


def exact_groups(manifest: Path) -> list[list[int]]:
    """Rows (manifest order) of each pixel sha256 held by two or more records."""
    import duckdb

    con = duckdb.connect(config={"threads": 1, "enable_external_access": True})
    try:
        query = ("SELECT list(file_row_number ORDER BY file_row_number) FROM read_parquet(?, file_row_number = true) "
                 "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING count(*) > 1 ORDER BY min(file_row_number)")
        return [[int(r) for r in rows] for (rows,) in con.execute(query, [str(manifest)]).fetchall()]
    finally:
        con.close()


def _range_pairs(index: Any, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(query row, index row) of every similarity >= threshold (FAISS keeps those strictly above its radius)."""
    limits, similarities, labels = index.range_search(queries, float(np.float32(threshold) - np.float32(1e-6)))
    keep = similarities >= np.float32(threshold)
    rows = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(limits).astype(np.int64))[keep]
    return rows, labels[keep].astype(np.int64)


def band_direction(sample: np.ndarray, size: int, mirror: bool = True) -> np.ndarray:
    """A unit direction p: the first principal axis of the sample's embeddings, sign fixed by its largest entry.
    With `mirror`, of their mirror-symmetrised pixel embeddings and made symmetric, so p == mirror(p) and
    p·mirror(a) == p·a."""
    symmetric = (sample + mirrored(sample, size)) / 2 if mirror else sample
    _, vectors = np.linalg.eigh(symmetric.T.astype(np.float64) @ symmetric.astype(np.float64))
    direction = vectors[:, -1]
    if mirror:
        direction = (direction + mirrored(direction[None], size)[0]) / 2
    norm = np.linalg.norm(direction)
    if norm < 1e-9:
        direction, norm = np.ones(len(direction)), np.sqrt(len(direction))
    direction = direction / norm
    return np.asarray(direction * np.sign(direction[np.argmax(np.abs(direction))]), np.float32)


def near_pairs(vectors: np.ndarray, threshold: float, *, mirror: bool, size: int,
               block: int = SEARCH_BLOCK, band_sample: int = 20000) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row pairs (a < b) whose embeddings (or one's mirror image) have cosine >= threshold, as (a rows, b rows)
    arrays. Zero rows (unreadable, constant, or not the first of an exact group) never match.

    Exact, but not every pair is compared: for unit vectors, a·b >= t implies |p·a - p·b| <= |a - b| <=
    sqrt(2 - 2t) for any unit p, and for a mirror-symmetric p also p·mirror(a) == p·a. So the rows are sorted
    by their projection on such a p (`band_direction`) and each block of rows is searched (FAISS inner
    product, direct and mirrored) only against the rows whose projection lies within that band of it."""
    import faiss

    n, _ = vectors.shape
    projections = np.zeros(n, np.float32)
    present = np.zeros(n, bool)
    for start in range(0, n, block):  # one pass over the mapped file, a block at a time
        chunk = np.asarray(vectors[start:start + block], np.float32)
        present[start:start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk) > 0.5
    rows = np.flatnonzero(present)
    if len(rows) < 2:
        return []
    direction = band_direction(np.asarray(vectors[rows[:band_sample]], np.float32), size, mirror)
    for start in range(0, len(rows), block):
        projections[rows[start:start + block]] = np.asarray(vectors[rows[start:start + block]], np.float32) @ direction
    order = np.argsort(projections[rows], kind="stable")
    ordered = rows[order]  # rows by projection
    band = np.sort(projections[ordered])
    width = float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold))) + 1e-4
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for query_start in range(0, len(ordered), block):
        query_stop = min(len(ordered), query_start + block)
        query = np.ascontiguousarray(vectors[ordered[query_start:query_stop]], dtype=np.float32)
        queries = [query, mirrored(query, size)] if mirror else [query]
        window_stop = int(np.searchsorted(band, band[query_stop - 1] + width, side="right"))
        for base_start in range(query_start, window_stop, block):
            base_rows = ordered[base_start:min(window_stop, base_start + block)]
            index = faiss.IndexFlatIP(query.shape[1])
            index.add(np.ascontiguousarray(vectors[base_rows], dtype=np.float32))
            for searched in queries:
                at, other = _range_pairs(index, searched, threshold)
                at, other = at + query_start, other + base_start  # positions in `ordered`
                later = other > at
                if later.any():
                    a, b = ordered[at[later]], ordered[other[later]]
                    found.append((np.minimum(a, b), np.maximum(a, b)))
    return found


def near_pairs_all(vectors: np.ndarray, threshold: float, *, mirror: bool, size: int,
                   block: int = SEARCH_BLOCK) -> list[tuple[np.ndarray, np.ndarray]]:
    """`near_pairs` comparing every pair (the reference the banded search is tested against)."""
    import faiss

    n, dim = vectors.shape
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for base_start in range(0, n, block):
        base = np.ascontiguousarray(vectors[base_start:base_start + block], dtype=np.float32)
        index = faiss.IndexFlatIP(dim)
        index.add(base)
        for query_start in range(0, base_start + len(base), block):
            query = np.ascontiguousarray(vectors[query_start:query_start + block], dtype=np.float32)
            queries = [query, mirrored(query, size)] if mirror else [query]
            for searched in queries:
                rows, others = _range_pairs(index, searched, threshold)
                rows, others = rows + query_start, others + base_start
                below = rows < others
                if below.any():
                    found.append((rows[below], others[below]))
    return found


@dataclass(frozen=True)
class Change:
    """What dedup says of one member of a cluster of copies."""

    cluster: str  # the representative's record id
    of: str | None  # the representative, or None for itself
    kind: str | None  # exact | near (None for the representative)
    similarity: float | None
    demoted: bool  # its stored row is removed: partition excluded, rule duplicate


@dataclass
class Plan:
    """Per affected row (manifest order): its change; and the demotions by cause."""

    changes: dict[int, Change] = field(default_factory=dict)
    demotions: dict[str, dict[str, int]] = field(default_factory=dict)  # "<from> copy of <to>" → {exact, near}
    clusters: int = 0
    merged: int = 0  # records in clusters of two or more

    def count(self, cause: str, kind: str) -> None:
        self.demotions.setdefault(cause, {"exact": 0, "near": 0})[kind] += 1


ACTION_NAMES = {"clean": "clean", "protect": "protected", "exclude": "excluded"}


def plan(roots: np.ndarray, actions: np.ndarray, record_ids: Any, sha256: Any, vectors: np.ndarray | None,
         *, mirror: bool, size: int) -> Plan:
    """The change of every member of every cluster of two or more (see the module docstring).

    `actions`: int8 per row (STRICTNESS; -1 for an unreadable record, which is never a member); `record_ids` and
    `sha256`: Arrow arrays in manifest order; `vectors`: the embeddings (None: exact only)."""
    result = Plan()
    order = np.argsort(roots, kind="stable")
    sorted_roots = roots[order]
    starts = np.flatnonzero(np.r_[True, sorted_roots[1:] != sorted_roots[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    names = {v: k for k, v in STRICTNESS.items()}
    for start, count in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        members = np.sort(order[start:start + count])
        ids = [str(v) for v in record_ids.take(members).to_pylist()]
        shas = sha256.take(members).to_pylist()
        member_actions = actions[members]
        strictest = int(member_actions.max())
        rep = min((ids[i], i) for i in range(count) if member_actions[i] == strictest)[1]
        result.clusters += 1
        result.merged += count
        for i, row in enumerate(members.tolist()):
            if i == rep:
                result.changes[row] = Change(ids[rep], None, None, None, False)
                continue
            exact = shas[i] == shas[rep]
            similarity = 1.0 if exact else _similarity(vectors, row, int(members[rep]), mirror=mirror, size=size)
            kind = "exact" if exact else "near"
            demoted = strictest > STRICTNESS["clean"] and member_actions[i] < STRICTNESS["exclude"]
            if demoted:
                result.count(f"{ACTION_NAMES[names[int(member_actions[i])]]} copy of {ACTION_NAMES[names[strictest]]}", kind)
            result.changes[row] = Change(ids[rep], ids[rep], kind, similarity, demoted)
    return result


def _similarity(vectors: np.ndarray | None, a: int, b: int, *, mirror: bool, size: int) -> float:
    if vectors is None:
        return 0.0
    va, vb = np.asarray(vectors[a], np.float32), np.asarray(vectors[b], np.float32)
    best = float(va @ vb)
    if mirror:
        best = max(best, float(mirrored(va[None], size)[0] @ vb))
    return round(best, 6)


def find_plan(staged_manifest: Path, store: EmbeddingStore | None, actions: np.ndarray, record_ids: Any,
              sha256: Any, spec: DedupSpec, embedding: Embedding) -> Plan:
    """Cluster the records (exact, then near on the embeddings) and plan each cluster's changes."""
    n = len(actions)
    mirror = embedding.mirror_search
    sets = UnionFind(n)
    vectors = store.vectors if store is not None else None
    groups = exact_groups(staged_manifest)
    for rows in groups:
        for row in rows[1:]:
            sets.union(rows[0], row)
            if vectors is not None:
                vectors[row] = 0.0  # one row per sha256 takes part in the near search
    if vectors is not None:
        for rows_a, rows_b in near_pairs(vectors, spec.effective_threshold, mirror=mirror, size=embedding.size):
            for a, b in zip(rows_a.tolist(), rows_b.tolist(), strict=True):
                sets.union(a, b)
    roots = sets.roots()
    roots[actions < 0] = np.arange(n)[actions < 0]  # unreadable records are never members
    if vectors is not None:  # restore the zeroed rows for the similarities of the plan
        for rows in groups:
            for row in rows[1:]:
                vectors[row] = vectors[rows[0]]
    return plan(roots, actions, record_ids, sha256, vectors, mirror=mirror, size=embedding.size)


def card_section(spec: DedupSpec, embedding: Embedding | None, result: Plan | None, records: int) -> dict[str, Any]:
    """The card's `dedup` entry: the settings and what they did."""
    if not spec.enabled or result is None or embedding is None:
        return {"enabled": False}
    settings: dict[str, Any] = {"size": embedding.size} if embedding.kind == "pixel" else {"clip": dict(embedding.clip_identity)}
    return {"enabled": True, "embedder": embedding.kind, **settings, "threshold": spec.effective_threshold,
            "threshold_default": spec.threshold is None, "mirror": spec.mirror, "clusters": result.clusters,
            "merged": result.merged, "merged_share": round(result.merged / records, 6) if records else 0.0,
            "demoted": sum(n for kinds in result.demotions.values() for n in kinds.values()),
            "demotions": {cause: dict(kinds) for cause, kinds in sorted(result.demotions.items())},
            "demoted_rule": DUPLICATE_RULE}


def removed_rows(staged_manifest: Path, result: Plan) -> dict[str, np.ndarray]:
    """Per shard file, the rows (ascending) of the records the plan demotes."""
    demoted = sorted(row for row, change in result.changes.items() if change.demoted)
    if not demoted:
        return {}
    table = pq.read_table(staged_manifest, columns=["file", "row"]).take(pa.array(demoted, pa.int64()))
    removed: dict[str, list[int]] = {}
    for file, row in zip(table.column("file").to_pylist(), table.column("row").to_pylist(), strict=True):
        if file is not None and row is not None:
            removed.setdefault(str(file), []).append(int(row))
    return {file: np.sort(np.asarray(rows, np.int64)) for file, rows in removed.items()}


def rewrite_shards(staging: Path, files: dict[str, str], removed: dict[str, np.ndarray]) -> None:
    """Rewrite each shard file that holds demoted rows without them (rows renumbered, new sha256 in `files`);
    a shard left empty is deleted."""
    import os

    for name, rows in sorted(removed.items()):
        path = staging / name
        source = np.load(path, mmap_mode="r")
        keep = np.ones(len(source), bool)
        keep[rows] = False
        kept = np.flatnonzero(keep)
        if not len(kept):
            del source
            path.unlink()
            del files[name]
            continue
        rewritten = path.with_name(path.name + ".tmp")
        step = max(1, READ_BLOCK // max(1, source[0].nbytes))
        with open(rewritten, "xb") as handle:
            handle.write(npy_header(source.dtype, (len(kept), *source.shape[1:])))
            for start in range(0, len(kept), step):
                handle.write(np.ascontiguousarray(source[kept[start:start + step]]).data.cast("B"))
        del source
        os.replace(rewritten, path)
        files[name] = sha256_file(path)


def write_final_manifest(staged_manifest: Path, final: Path, result: Plan, removed: dict[str, np.ndarray]
                         ) -> dict[str, int]:
    """The manifest with the plan applied, a row group (part) at a time; returns the counts per partition."""
    source = pq.ParquetFile(staged_manifest)
    counts = dict.fromkeys(PARTITIONS, 0)
    offset = 0
    with pq.ParquetWriter(str(final), source.schema_arrow) as writer:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            own: dict[str, list[Any]] = {f.name: table.column(f.name).to_pylist() for f in MANIFEST_FIELDS}
            for i in range(table.num_rows):
                change = result.changes.get(offset + i)
                if change is not None:
                    own["dup_cluster"][i], own["dup_of"][i] = change.cluster, change.of
                    own["dup_kind"][i], own["dup_similarity"][i] = change.kind, change.similarity
                    if change.demoted:
                        own["dup_rule"][i], own["rule"][i] = own["rule"][i], DUPLICATE_RULE
                        own["partition"][i], own["sigma"][i], own["file"][i], own["row"][i] = "excluded", None, None, None
                file = own["file"][i]
                if file in removed:
                    own["row"][i] -= int(np.searchsorted(removed[file], own["row"][i]))
                counts[own["partition"][i]] += 1
            for f in MANIFEST_FIELDS:
                table = table.set_column(table.schema.get_field_index(f.name), f, pa.array(own[f.name], f.type))
            writer.write_table(table.replace_schema_metadata(source.schema_arrow.metadata))
            offset += table.num_rows
    return counts


def rule_counts(decided: dict[str, int], result: Plan, staged_manifest: Path) -> dict[str, int]:
    """The card's rule counts after dedup: each demoted record counted under `duplicate`, not its own rule."""
    demoted = sorted(row for row, change in result.changes.items() if change.demoted)
    counts = dict(decided)
    if demoted:
        rules = pq.read_table(staged_manifest, columns=["rule"]).column("rule").take(pa.array(demoted, pa.int64()))
        for rule in rules.to_pylist():
            counts[str(rule)] -= 1
        counts[DUPLICATE_RULE] = len(demoted)
    return {name: n for name, n in counts.items() if n}
