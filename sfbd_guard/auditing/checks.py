"""Per-image scores against the protected set, thresholds, and verdicts.

Scores (all against the protected originals):
  * top-k neighbours by embedding cosine similarity, s1 = top-1, margin = s1 - s2;
    with `transforms`, every variant of the image (symmetry.py: its rotations, flips and colour inversion) is
    searched and each reference keeps its best score;
  * relative L2 ratio (Carlini et al. 2023, arXiv 2301.13188, §5.1, adaptive distance): RMS pixel
    distance to the nearest protected image over the mean RMS distance to the k nearest, in [0, 1];
    Carlini's "extracted" (d1 / (0.5 * mean) <= 1) is ratio <= 0.5; with `transforms` the smallest over the
    variants counts;
  * hash_match: the image (or a variant of it) at the prepared resolution is byte-identical to a protected record.
Verdict: copy if hash_match or s1 >= tau_copy; else suspect if s1 >= tau_suspect, or ratio <= tau_ratio while
s1 >= min_sim (the ratio rule speaks only for images already close in the embedding: an image far from every
protected image can still have one neighbour twice as close as the others); else novel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..embedding.embed import Embedder, embed_batched, l2_vectors
from ..embedding.knn import Shards
from ..hashing import pixel_sha256
from ..symmetry import Variant, group
from .config import AuditConfig
from .index import InnerProductIndex, Neighbours, l2_neighbours, merge_variants

VERDICTS = ("copy", "suspect", "novel")
# The rules a verdict can rest on, as samples.parquet `rules` names them, and what each means in words.
RULES = {
    "hash": "exact copy: byte-identical to a protected record at the prepared resolution",
    "s1>=copy": "similarity at or above the copy threshold",
    "s1>=suspect": "similarity at or above the suspect threshold",
    "l2_ratio<=ratio": "L2 ratio: much closer in pixels to one protected image than to its other nearest ones",
}


@dataclass(frozen=True)
class Scores:
    rows: np.ndarray  # int64 (N, k): protected rows (manifest order among protected), best first; -1 = none
    sims: np.ndarray  # float32 (N, k): cosine similarity, descending
    flipped: np.ndarray  # bool (N,): a variant (not the image itself: mirror, rotation, inversion) gave the top-1 match
    l2_nearest: np.ndarray  # float32 (N,): RMS [0, 1] pixel distance to the nearest protected image
    l2_row: np.ndarray  # int64 (N,): that image's protected row
    l2_ratio: np.ndarray  # float32 (N,): l2_nearest / mean distance to the k nearest
    hash_match: np.ndarray  # bool (N,)
    transform: list[str] = field(default_factory=list)  # per image, the variant that gave the top-1 (symmetry.Variant.name)

    @property
    def s1(self) -> np.ndarray:
        return self.sims[:, 0]

    def take(self, rows: np.ndarray) -> Scores:
        """The scores of the images at `rows` (int indices or a bool mask)."""
        index = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Scores(self.rows[index], self.sims[index], self.flipped[index], self.l2_nearest[index],
                      self.l2_row[index], self.l2_ratio[index], self.hash_match[index],
                      [self.transform[i] for i in index.tolist()] if self.transform else [])

    @property
    def margin(self) -> np.ndarray:
        if self.sims.shape[1] < 2:
            return np.full(len(self.sims), np.nan, np.float32)
        margin: np.ndarray = self.sims[:, 0] - self.sims[:, 1]
        return margin


def relative_l2(found: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """(d1, d1 / mean(d_1..d_k)) per row; the ratio is 0 when every neighbour is at distance 0."""
    d1 = found.scores[:, 0]
    mean = found.scores.mean(axis=1)
    return d1, np.where(mean > 0, d1 / np.where(mean > 0, mean, 1.0), 0.0).astype(np.float32)


def _pixel_scores(pixels: np.ndarray, reference_pixels: np.ndarray | Shards, config: AuditConfig,
                  size: int, variants: tuple[Variant, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d1 = ratio = rows = np.zeros(0)
    for i, variant in enumerate(variants):
        found = l2_neighbours(reference_pixels, l2_vectors(variant.pixels(pixels), size), config.l2.k, config.search.batch)
        d1_v, ratio_v = relative_l2(found)
        if i == 0:
            d1, ratio, rows = d1_v, ratio_v, found.rows[:, 0]
            continue
        rows = np.where(d1_v < d1, found.rows[:, 0], rows)
        d1, ratio = np.minimum(d1, d1_v), np.minimum(ratio, ratio_v)
    return d1, rows, ratio


def score(pixels: np.ndarray, *, embedder: Embedder, index: InnerProductIndex, reference_pixels: np.ndarray | Shards,
          protected_sha256: set[str], config: AuditConfig, l2_size: int) -> Scores:
    """Scores of uint8 (N, C, H, W) images (already at the prepared resolution), over their variants under
    `config.embedder.transforms` (the identity first)."""
    k, batch = config.search.k, config.embedder.batch
    variants = group(config.embedder.transforms)
    found = [index.search(embed_batched(embedder, v.pixels(pixels) if not v.identity else pixels, batch), k)
             for v in variants]
    merged, winner = merge_variants(found, min(k, found[0].rows.shape[1]))
    d1, l2_row, ratio = _pixel_scores(pixels, reference_pixels, config, l2_size, variants)
    hashes = np.asarray([any(pixel_sha256(v.pixels(p)) in protected_sha256 for v in variants) for p in pixels], dtype=bool)
    return Scores(merged.rows, merged.scores, winner > 0, d1, l2_row, ratio, hashes,
                  [variants[int(w)].name for w in winner])


def background(index: InnerProductIndex, embeddings: np.ndarray | Shards, *, limit: int = 1000, seed: int = 0) -> np.ndarray:
    """Leave-one-out top-1 similarity of (a seeded subset of) protected images to the other protected images.

    Somepalli et al.'s train-versus-train background: not a holdout (it is biased upwards by
    near-duplicates), only a warning sign when the default thresholds would flag protected images.
    """
    n = len(embeddings)
    if n < 2:
        return np.zeros(0, np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(limit, n), replace=False))
    found = index.search(embeddings[rows], 2)
    other = np.where(found.rows[:, 0] == rows, found.scores[:, 1], found.scores[:, 0])
    return other.astype(np.float32)


@dataclass(frozen=True)
class Thresholds:
    copy: float  # s1 >= copy → copy
    suspect: float  # s1 >= suspect → suspect
    ratio: float  # l2_ratio <= ratio → suspect
    method: str  # holdout | default
    note: str  # how they were set, in words
    ratio_min_similarity: float = -1.0  # the L2-ratio rule applies only when s1 >= this


def verdicts(scores: Scores, thresholds: Thresholds) -> tuple[list[str], list[list[str]]]:
    """Per image: copy | suspect | novel, and the rules that fired (RULES)."""
    out, fired = [], []
    for s1, ratio, exact in zip(scores.s1, scores.l2_ratio, scores.hash_match, strict=True):
        close = ratio <= thresholds.ratio and s1 >= thresholds.ratio_min_similarity
        rules = [name for name, hit in (("hash", exact), ("s1>=copy", s1 >= thresholds.copy),
                                        ("s1>=suspect", s1 >= thresholds.suspect), ("l2_ratio<=ratio", close)) if hit]
        if "hash" in rules or "s1>=copy" in rules:
            out.append("copy")
        else:
            out.append("suspect" if rules else "novel")
        fired.append(rules)
    return out, fired
