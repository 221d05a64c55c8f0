"""Duplicates across and within partitions: each cluster of copies takes the strictest action of its members.

Without this, an image that occurs twice leaks: a protected (or opted-out) image whose re-upload a rule
puts in the clean partition is trained on as a clean original, and k protected copies of one image get k
independent noise draws whose mean has noise sigma/sqrt(k).

`guard prepare` (prepare.py) decodes once: the workers hash every record's transformed pixels (sha256), and,
with dedup on, the pixels of its canonical variant under the policy's `transforms` (symmetry.py: the eight
rotations and flips and colour inversion by default; `canonical_sha256`), and compute its embedding here
(`embed`) in the same pass; the parent gathers the embeddings into one
staging file (never published: an embedding of a protected original is a low-resolution copy of it), and
after all parts:

1. exact: rows with the same canonical sha256 join (DuckDB group-by over the staged manifest, which spills
   to disk rather than grow): a rotated, flipped or inverted copy is an exact copy;
2. near: FAISS inner-product range search over the unit embeddings, a block of rows against a block at
   a time (bounded memory); with transforms, over an embedding invariant to them, its pairs then checked
   against every variant (`near_pairs`); with the pixel embedder, each pair found is looked at again at
   twice the size (`Fine`); pairs at or above the threshold(s) join (union-find over one int64 per record);
3. each cluster of two or more takes its strictest action (exclude > protect > clean). Its
   representative, the member with the smallest record id among those whose own rule chose that action,
   keeps its row; with `exclude` or `protect`, every other member that was stored (clean or protected) is
   demoted to `excluded` with rule `duplicate` (its own rule kept in `dup_rule`). So a cluster has at most
   one protected row and no record ever needs new noise: members only lose their stored rows. A cluster
   whose members are all clean changes nothing (its members are still marked with their cluster). A held-out
   record (action holdout) takes no part in that order: in a cluster with any other record it is dropped from
   the holdout (rule `duplicate`, never stored either), so it neither removes a trained copy from the audit's
   reference set nor lets an opt-out's copy be held out.

The shard files holding demoted rows are then rewritten without them and the final manifest is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..hashing import sha256_file
from ..policy.model import DUPLICATE_RULE, DedupSpec
from ..prepared.manifest import MANIFEST_FIELDS, PARTITIONS
from ..symmetry import Variant, best_similarity, group, invariant
from .shards import READ_BLOCK, npy_header

STAGED_MANIFEST = ".manifest-staged.parquet.tmp"  # the manifest before dedup, in the staging folder
EMBEDDINGS_FILE = ".dedup-embeddings.npy.tmp"  # in the staging folder; deleted before the directory is published
INVARIANT_FILE = ".dedup-invariant.npy.tmp"  # in the staging folder, during the near search only
SEARCH_BLOCK = 4096  # rows per block of the range search: two blocks and their matches are in memory at once
STRICTNESS = {"clean": 0, "protect": 1, "exclude": 2, "holdout": 3}  # holdout: outside the order (see `plan`)
HOLDOUT = STRICTNESS["holdout"]


def embed(pixels: np.ndarray, size: int, fine: int = 0) -> np.ndarray:
    """float32 (N, size*size) unit vectors of uint8 (N, C, H, W) images: the audit's weight-free pixel embedding
    (embedding/embed.py: area-downsampled, minus its own mean, L2-normalised, so cosine = Pearson correlation) of the
    grey image (mean of the channels). Zero for a constant image (it then only joins by sha256).

    With `fine` (a side larger than `size`): each row is followed by the same embedding at fine*fine, the finer
    look a near pair must pass too (`Fine`), so (N, size*size + fine*fine), each part a unit vector.

    When the side divides the image, the area average is an exact integer block sum of the channel sum (the
    centring and the normalisation make the scale irrelevant): no rounding before the centring, and a third of
    the cost of averaging each channel in floats."""
    from ..embedding.embed import downsample, normalize_rows

    n, _, h, w = pixels.shape
    summed: np.ndarray | None = None
    parts = []
    for side in (size, fine) if fine else (size,):
        side = min(side, w)
        if h % side == 0 and w % side == 0:
            if summed is None:
                summed = pixels.sum(axis=1, dtype=np.float32)  # integers; the block sums exact up to 1024 px
            grey = summed.reshape(n, side, h // side, side, w // side).sum(axis=(2, 4)).reshape(n, -1)
        else:
            grey = downsample(pixels, side).mean(axis=1).reshape(n, -1)
        parts.append(normalize_rows(grey - grey.mean(axis=1, keepdims=True)))
    return parts[0] if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts, axis=1))


@dataclass(frozen=True)
class Fine:
    """The second look at each near pair: the pairs the search finds on the `size` embedding are kept only if
    their embeddings at the finer `side` (best variant) also reach `threshold`.

    Why: at 8×8 two distinct images with little structure (a silhouette, a straight edge) can be variants of one
    another within 0.99, and searching 16 variants gives every pair 16 chances; at 16×16 they part, while a copy
    (JPEG, resized, noisy, brightened, rotated...) loses at most about 0.014 of its similarity from 8 to 16 px
    (benchmarks/README.md). The search itself stays on the small embedding (its cost and its recall bound), and
    the candidate pairs are few, so the second look costs little."""

    vectors: np.ndarray  # (N, side*side) unit rows, in the order of the searched ones
    side: int
    threshold: float


@dataclass(frozen=True)
class Embedding:
    """How dedup embeds a record; picklable, it travels to the workers (which load a clip model once per part).

    pixel: `embed` at `size`; copies under the transforms are found by searching against every variant
    (`near_pairs`). clip: open_clip image features from local weights (embedding/clip.py), each record embedded as
    the normalised sum of the features of its variants (one embedding for an image and all its variants).
    `transforms`: the policy's generators (symmetry.py); the exact digest is canonical under their group."""

    kind: str  # pixel | clip
    size: int  # pixel: side of the embedding
    dim: int
    transforms: tuple[str, ...]
    clip_weights: str | None = None  # absolute
    clip_model: str = "ViT-B-32"
    quick_gelu: bool = False
    batch: int = 64
    clip_identity: tuple[tuple[str, str], ...] = ()  # model and weights sha256, for the card
    fine_size: int = 0  # pixel: side of the finer embedding stored after each row (0: none), see `Fine`
    fine_threshold: float = -1.0  # pixel: the cosine a near pair must also reach at fine_size

    @property
    def searched_dim(self) -> int:
        """Columns of the embedding the near search reads (the finer look's columns follow them)."""
        return self.dim - self.fine_size ** 2

    @property
    def variants(self) -> tuple[Variant, ...]:
        """The group of the transforms (identity first): the exact digest's."""
        return group(self.transforms)

    @property
    def search_variants(self) -> tuple[Variant, ...]:
        """The variants the near search compares with (pixel); clip's embedding holds them already."""
        return self.variants if self.kind == "pixel" else group(())

    def embedder(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from uint8 (N, C, H, W) pixels to float32 (N, dim) unit rows."""
        if self.kind == "pixel":
            return partial(embed, size=self.size, fine=self.fine_size)
        from ..embedding.clip import ClipEmbedder
        from ..embedding.embed import embed_batched, normalize_rows

        clip = ClipEmbedder(weights=self.clip_weights, model=self.clip_model, quick_gelu=self.quick_gelu)
        variants = self.variants

        def embed_clip(pixels: np.ndarray) -> np.ndarray:
            features = embed_batched(clip, pixels, self.batch)
            for variant in variants[1:]:
                features = features + embed_batched(clip, variant.pixels(pixels), self.batch)
            return np.asarray(normalize_rows(features) if len(variants) > 1 else features, np.float32)

        return embed_clip


def embedding_for(spec: DedupSpec, resolution: int, base_dir: Path) -> Embedding:
    """The policy's embedding; for clip, the weights are loaded once here (bad weights: exit 2 before any work)."""
    transforms = tuple(spec.transforms)
    if spec.embedder == "pixel":
        size = min(spec.size, resolution)
        fine_threshold = spec.effective_fine_threshold
        fine = min(2 * size, resolution) if fine_threshold > -1 else 0
        fine = fine if fine > size else 0  # at the resolution already: nothing finer to look at
        return Embedding("pixel", size, size * size + fine * fine, transforms, fine_size=fine,
                         fine_threshold=fine_threshold if fine else -1.0)
    from ..embedding.clip import ClipEmbedder

    assert spec.clip_weights is not None  # DedupSpec's validator
    weights = str((base_dir / spec.clip_weights).expanduser().resolve())
    clip = ClipEmbedder(weights=weights, model=spec.clip_model, quick_gelu=spec.quick_gelu)
    identity = (("model", clip.model_name), ("weights_sha256", clip.weights_sha256))
    return Embedding("clip", 0, clip.dim, transforms, weights, spec.clip_model, spec.quick_gelu, spec.batch, identity)


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
    """Rows (manifest order) of each canonical sha256 (the pixel sha256 of the record's canonical variant under the
    policy's transforms, symmetry.canonical) held by two or more records."""
    import duckdb

    con = duckdb.connect(config={"threads": 1, "enable_external_access": True})
    try:
        query = ("SELECT list(file_row_number ORDER BY file_row_number) FROM read_parquet(?, file_row_number = true) "
                 "WHERE canonical_sha256 IS NOT NULL GROUP BY canonical_sha256 HAVING count(*) > 1 "
                 "ORDER BY min(file_row_number)")
        return [[int(r) for r in rows] for (rows,) in con.execute(query, [str(manifest)]).fetchall()]
    finally:
        con.close()


def range_pairs(index: Any, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(query row, index row) of every similarity >= threshold (FAISS keeps those strictly above its radius)."""
    limits, similarities, labels = index.range_search(queries, float(np.float32(threshold) - np.float32(1e-6)))
    keep = similarities >= np.float32(threshold)
    rows = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(limits).astype(np.int64))[keep]
    return rows, labels[keep].astype(np.int64)


def band_direction(sample: np.ndarray) -> np.ndarray:
    """A unit direction p: the first principal axis of the sample's rows, sign fixed by its largest entry."""
    _, vectors = np.linalg.eigh(sample.T.astype(np.float64) @ sample.astype(np.float64))
    direction = vectors[:, -1]
    norm = np.linalg.norm(direction)
    if norm < 1e-9:
        direction, norm = np.ones(len(direction)), np.sqrt(len(direction))
    direction = direction / norm
    return np.asarray(direction * np.sign(direction[np.argmax(np.abs(direction))]), np.float32)


def _banded_pairs(vectors: np.ndarray, threshold: float, block: int, band_sample: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row pairs (a < b) of unit rows with inner product >= threshold (zero rows never match), by the band."""
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
    direction = band_direction(np.asarray(vectors[rows[:band_sample]], np.float32))
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
        window_stop = int(np.searchsorted(band, band[query_stop - 1] + width, side="right"))
        for base_start in range(query_start, window_stop, block):
            base_rows = ordered[base_start:min(window_stop, base_start + block)]
            index = faiss.IndexFlatIP(query.shape[1])
            index.add(np.ascontiguousarray(vectors[base_rows], dtype=np.float32))
            at, other = range_pairs(index, query, threshold)
            at, other = at + query_start, other + base_start  # positions in `ordered`
            later = other > at
            if later.any():
                a, b = ordered[at[later]], ordered[other[later]]
                found.append((np.minimum(a, b), np.maximum(a, b)))
    return found


CANDIDATE_SLACK = 1e-4  # the invariant search keeps a little more than the threshold (float32 rounding)
VERIFY_BLOCK = 65536  # candidate pairs compared at a time


def _verified(vectors: np.ndarray, candidates: list[tuple[np.ndarray, np.ndarray]], threshold: float, size: int,
              variants: tuple[Variant, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The candidate pairs whose best variant similarity (symmetry.best_similarity) is >= threshold."""
    found = []
    for rows_a, rows_b in candidates:
        for start in range(0, len(rows_a), VERIFY_BLOCK):
            a, b = rows_a[start:start + VERIFY_BLOCK], rows_b[start:start + VERIFY_BLOCK]
            best = best_similarity(np.asarray(vectors[a], np.float32), np.asarray(vectors[b], np.float32), size, variants)
            keep = best >= np.float32(threshold)
            if keep.any():
                found.append((a[keep], b[keep]))
    return found


def _finer(pairs: list[tuple[np.ndarray, np.ndarray]], fine: Fine | None, variants: tuple[Variant, ...]
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs whose finer embeddings (`Fine`) also reach its threshold at their best variant (all without)."""
    if fine is None:
        return pairs
    kept = []
    for rows_a, rows_b in pairs:
        for start in range(0, len(rows_a), VERIFY_BLOCK):
            a, b = rows_a[start:start + VERIFY_BLOCK], rows_b[start:start + VERIFY_BLOCK]
            best = best_similarity(np.asarray(fine.vectors[a], np.float32), np.asarray(fine.vectors[b], np.float32),
                                   fine.side, variants)
            keep = best >= np.float32(fine.threshold)
            if keep.any():
                kept.append((a[keep], b[keep]))
    return kept


def near_pairs(vectors: np.ndarray, threshold: float, *, variants: tuple[Variant, ...], size: int,
               block: int = SEARCH_BLOCK, band_sample: int = 20000, scratch: Path | None = None,
               fine: Fine | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row pairs (a < b) such that a variant of a's embedding (under `variants`, symmetry.py) has cosine >= threshold
    with b's, as (a rows, b rows) arrays. Zero rows (unreadable, constant, or not the first of an exact group)
    never match.

    Exact, but not every pair is compared: for unit vectors, a·b >= t implies |p·a - p·b| <= |a - b| <=
    sqrt(2 - 2t) for any unit p. So the rows are sorted by their projection on p (`band_direction`) and each
    block of rows is searched (FAISS inner product) only against the rows whose projection lies within that band
    of it. With transforms, the search runs on `symmetry.invariant` of the embeddings (one row per record, the
    same for all its variants, never farther apart than the nearest variants): its pairs are the candidates, and
    each is kept if its best variant reaches the threshold. `scratch`: a folder for the invariant rows (memory-
    mapped, deleted before returning); None keeps them in memory. `fine`: a second look at each pair found (`Fine`).
    """
    if len(variants) <= 1:
        return _finer(_banded_pairs(vectors, threshold, block, band_sample), fine, variants)
    n, dim = vectors.shape
    path = scratch / INVARIANT_FILE if scratch is not None else None
    features = (np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim)) if path is not None
                else np.zeros((n, dim), np.float32))
    try:
        for start in range(0, n, block):
            features[start:start + block] = invariant(np.asarray(vectors[start:start + block], np.float32), size)
        candidates = _banded_pairs(features, threshold - CANDIDATE_SLACK, block, band_sample)
    finally:
        del features
        if path is not None:
            path.unlink(missing_ok=True)
    return _finer(_verified(vectors, candidates, threshold, size, variants), fine, variants)


def near_pairs_all(vectors: np.ndarray, threshold: float, *, variants: tuple[Variant, ...], size: int,
                   block: int = SEARCH_BLOCK, fine: Fine | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`near_pairs` comparing every pair with every variant (the reference the banded search is tested against)."""
    import faiss

    from ..symmetry import grid_variants

    n, dim = vectors.shape
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for base_start in range(0, n, block):
        base = np.ascontiguousarray(vectors[base_start:base_start + block], dtype=np.float32)
        index = faiss.IndexFlatIP(dim)
        index.add(base)
        for query_start in range(0, n, block):
            query = np.ascontiguousarray(vectors[query_start:query_start + block], dtype=np.float32)
            for searched in grid_variants(query, size, variants) if len(variants) > 1 else [query]:
                rows, others = range_pairs(index, searched, threshold - CANDIDATE_SLACK)
                rows, others = rows + query_start, others + base_start
                below = rows < others
                if below.any():
                    found.append((rows[below], others[below]))
    return _finer(_verified(vectors, found, threshold, size, variants) if len(variants) > 1 else [
        (a[keep], b[keep]) for a, b in found
        for keep in [np.einsum("ij,ij->i", vectors[a], vectors[b]) >= np.float32(threshold)]], fine, variants)


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


ACTION_NAMES = {"clean": "clean", "protect": "protected", "exclude": "excluded", "holdout": "held-out"}


def plan(roots: np.ndarray, actions: np.ndarray, record_ids: Any, sha256: Any, vectors: np.ndarray | None,
         *, variants: tuple[Variant, ...], size: int) -> Plan:
    """The change of every member of every cluster of two or more (see the module docstring).

    `actions`: int8 per row (STRICTNESS; -1 for an unreadable record, which is never a member); `record_ids` and
    `sha256` (the canonical sha256: equal for exact copies up to the transforms): Arrow arrays in manifest order;
    `vectors`: the embeddings (None: exact only)."""
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
        held = member_actions == HOLDOUT
        # a held-out record in a cluster with any other record is dropped from the holdout (demoted to `duplicate`):
        # the other members decide as if it were not there, so a held-out copy never removes a trained image (or
        # an opt-out's copy) and an opt-out's copy is never held out; a cluster of held-out records only stays so
        deciding = member_actions if held.all() else np.where(held, -1, member_actions)
        strictest = int(deciding.max())
        rep = min((ids[i], i) for i in range(count) if deciding[i] == strictest)[1]
        result.clusters += 1
        result.merged += count
        near = [i for i in range(count) if i != rep and shas[i] != shas[rep]]
        similarities = dict(zip(near, _similarities(vectors, members[near], int(members[rep]), variants=variants,
                                                    size=size), strict=True))
        for i, row in enumerate(members.tolist()):
            if i == rep:
                result.changes[row] = Change(ids[rep], None, None, None, False)
                continue
            exact = shas[i] == shas[rep]
            similarity = 1.0 if exact else similarities[i]
            kind = "exact" if exact else "near"
            demoted = bool(held[i] and not held.all()) or (
                strictest > STRICTNESS["clean"] and deciding[i] < STRICTNESS["exclude"] and not held[i])
            if demoted:
                result.count(f"{ACTION_NAMES[names[int(member_actions[i])]]} copy of {ACTION_NAMES[names[strictest]]}", kind)
            result.changes[row] = Change(ids[rep], ids[rep], kind, similarity, demoted)
    return result


def _similarities(vectors: np.ndarray | None, rows: np.ndarray, rep: int, *, variants: tuple[Variant, ...],
                  size: int) -> list[float]:
    """Each row's similarity to the representative's embedding at the best variant, rounded (0.0 without vectors)."""
    if vectors is None or not len(rows):
        return [0.0] * len(rows)
    members = np.asarray(vectors[rows], np.float32)
    target = np.repeat(np.asarray(vectors[rep:rep + 1], np.float32), len(rows), axis=0)
    best = best_similarity(members, target, size, variants) if len(variants) > 1 else np.einsum("ij,ij->i", members, target)
    return [round(float(value), 6) for value in best]


def find_plan(staged_manifest: Path, store: EmbeddingStore | None, actions: np.ndarray, record_ids: Any,
              sha256: Any, spec: DedupSpec, embedding: Embedding) -> Plan:
    """Cluster the records (exact, then near on the embeddings) and plan each cluster's changes."""
    n = len(actions)
    variants = embedding.search_variants
    sets = UnionFind(n)
    stored = store.vectors if store is not None else None  # the searched embedding, then the finer one (pixel)
    searched = embedding.searched_dim
    vectors = stored[:, :searched] if stored is not None and embedding.fine_size else stored
    fine = (Fine(stored[:, searched:], embedding.fine_size, embedding.fine_threshold)
            if stored is not None and embedding.fine_size else None)
    groups = exact_groups(staged_manifest)
    for rows in groups:
        for row in rows[1:]:
            sets.union(rows[0], row)
            if stored is not None:
                stored[row] = 0.0  # one row per canonical sha256 takes part in the near search
    if vectors is not None:
        for rows_a, rows_b in near_pairs(vectors, spec.effective_threshold, variants=variants, size=embedding.size,
                                       scratch=store.path.parent if store is not None else None, fine=fine):
            for a, b in zip(rows_a.tolist(), rows_b.tolist(), strict=True):
                sets.union(a, b)
    roots = sets.roots()
    roots[actions < 0] = np.arange(n)[actions < 0]  # unreadable records are never members
    if stored is not None:  # restore the zeroed rows for the similarities of the plan
        for rows in groups:
            for row in rows[1:]:
                stored[row] = stored[rows[0]]
    return plan(roots, actions, record_ids, sha256, vectors, variants=variants, size=embedding.size)


def card_section(spec: DedupSpec, embedding: Embedding | None, result: Plan | None, records: int) -> dict[str, Any]:
    """The card's `dedup` entry: the settings and what they did."""
    if not spec.enabled or result is None or embedding is None:
        return {"enabled": False}
    settings: dict[str, Any] = {"size": embedding.size} if embedding.kind == "pixel" else {"clip": dict(embedding.clip_identity)}
    if embedding.fine_size:
        settings["fine"] = {"size": embedding.fine_size, "threshold": embedding.fine_threshold}
    return {"enabled": True, "embedder": embedding.kind, **settings, "threshold": spec.effective_threshold,
            "threshold_default": spec.threshold is None, "transforms": list(spec.transforms),
            "variants": len(embedding.variants), "clusters": result.clusters,
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
