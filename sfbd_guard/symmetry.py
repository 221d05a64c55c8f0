"""Exact reversible transforms a copy can hide behind, and how dedup and the audit see through them.

The transforms are the eight rotations and flips of the square (the dihedral group D4) and colour inversion
(255 - x), and every combination: at most 16 variants of an image, each of which gives the original back
exactly. A policy or audit names the generators it covers (`flip`: the left-right mirror, `rotate`: quarter
turns, `invert`: 255 - x); the variants are the group they generate (`flip` + `rotate` also give the vertical
flip and both transposes). Arbitrary invertible encodings (per-channel inversion, pixel shuffles, XOR with a
key) are out of scope: there are too many to enumerate, and a copy so encoded is not an image a model
learns from as it is (docs/policy.md#copies-dedup).

Three tools, all exact for the group:
  * `canonical`: the lexicographically smallest of an image's variants (bytes in C order), the same array
    for every variant of one image, so sha256 of it (hashing.canonical_sha256) is an exact-copy digest;
  * `grid_variants`: the variants of a pixel embedding (dedup.embed, a mean-centred grey square): a
    rotation or flip permutes its entries, and inversion flips its sign;
  * `invariant`: a 1-Lipschitz map of such an embedding that is the same for all its variants (absolute
    values of its 2-D DCT, each coefficient pair (u, v), (v, u) sorted), so |invariant(a) - invariant(b)|
    is at most the distance of b to the nearest variant of a: a range search on it finds every pair of
    near copies up to the group (and a few more, which the exact comparison then drops).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

GENERATORS = ("flip", "rotate", "invert")


@dataclass(frozen=True)
class Variant:
    """One element of the group: mirror left-right (if `flip`), then `turns` quarter turns counter-clockwise
    (numpy.rot90), then invert the colours (if `invert`)."""

    flip: bool
    turns: int
    invert: bool

    @property
    def identity(self) -> bool:
        return not self.flip and not self.turns and not self.invert

    @property
    def name(self) -> str:
        """identity, flip, rot90, flip+rot270, invert, invert+rot180, ..."""
        parts = ["invert"] if self.invert else []
        parts += ["flip"] if self.flip else []
        parts += [f"rot{90 * self.turns}"] if self.turns else []
        return "+".join(parts) or "identity"

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        """This variant of uint8 (..., H, W) images (square H == W for the turns), C-contiguous."""
        out = pixels[..., ::-1] if self.flip else pixels
        out = np.rot90(out, self.turns, axes=(-2, -1)) if self.turns else out
        return np.ascontiguousarray(255 - out if self.invert else out)


def group(generators: Iterable[str]) -> tuple[Variant, ...]:
    """The variants the generators make, identity first, in a fixed order."""
    chosen = set(generators)
    unknown = chosen - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown transform(s) {sorted(unknown)}; known: {', '.join(GENERATORS)}")
    return tuple(Variant(flip, turns, invert)
                 for invert in ((False, True) if "invert" in chosen else (False,))
                 for flip in ((False, True) if "flip" in chosen else (False,))
                 for turns in (range(4) if "rotate" in chosen else range(1)))


def _lexicographic_min(rows: np.ndarray) -> np.ndarray:
    """uint8 (N, V, L) → per N, the index of the lexicographically smallest of its V byte rows (the first on ties)."""
    n, count, length = rows.shape
    pad = (-length) % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((n, count, pad), np.uint8)], axis=2)
    words = np.ascontiguousarray(rows).view(">u8")  # big-endian words compare like the bytes they hold
    alive = np.ones((n, count), bool)
    top = np.iinfo(np.uint64).max
    for column in range(words.shape[2]):
        values = np.where(alive, words[:, :, column], top)
        alive &= values == values.min(axis=1, keepdims=True)
        if (alive.sum(axis=1) == 1).all():
            break
    chosen: np.ndarray = alive.argmax(axis=1)
    return chosen


def canonical(pixels: np.ndarray, variants: Sequence[Variant]) -> np.ndarray:
    """uint8 (N, C, H, W) → per image, the lexicographically smallest (C-order bytes) of its variants.

    The first rows of channel 0 of the variants decide for almost every image (they are gathered, not computed by
    transforming whole images); the images they leave tied are compared in full."""
    if len(variants) <= 1 or not len(pixels):
        return np.ascontiguousarray(pixels)
    n, _, h, w = pixels.shape
    grid = np.arange(h * w).reshape(h, w)
    plane = pixels[:, 0].reshape(n, h * w)
    heads = np.stack([Variant(v.flip, v.turns, False).pixels(grid)[0] for v in variants])  # (V, W) indices
    first = plane[:, heads]  # (N, V, W): each variant's first row of channel 0
    inverted = np.array([v.invert for v in variants])
    first = np.where(inverted[None, :, None], 255 - first, first).astype(np.uint8)
    chosen = _lexicographic_min(first)
    best = first[np.arange(n), chosen]
    tied = np.flatnonzero((first == best[:, None, :]).all(axis=2).sum(axis=1) > 1)
    if len(tied):  # the same first row from two variants (e.g. a flat top row): compare all bytes
        full = np.stack([v.pixels(pixels[tied]) for v in variants], axis=1)
        chosen[tied] = _lexicographic_min(full.reshape(len(tied), len(variants), -1))
    out = np.empty_like(pixels)
    for index in np.unique(chosen).tolist():
        rows = np.flatnonzero(chosen == index)
        out[rows] = variants[index].pixels(pixels[rows])
    return out


def grid_variants(vectors: np.ndarray, side: int, variants: Sequence[Variant]) -> list[np.ndarray]:
    """The variants of float (N, side*side) mean-centred grey embeddings, in the order of `variants`."""
    grid = vectors.reshape(len(vectors), side, side)
    out = []
    for v in variants:
        moved = grid[..., ::-1] if v.flip else grid
        moved = np.rot90(moved, v.turns, axes=(1, 2)) if v.turns else moved
        out.append(np.ascontiguousarray((-moved if v.invert else moved).reshape(len(vectors), -1), dtype=np.float32))
    return out


def best_similarity(a: np.ndarray, b: np.ndarray, side: int, variants: Sequence[Variant]) -> np.ndarray:
    """Row by row, the largest inner product of a variant of a's embedding with b's (float32 (N, side*side))."""
    best: np.ndarray = np.max([np.einsum("ij,ij->i", moved, b) for moved in grid_variants(a, side, variants)], axis=0)
    return best


def _dct_matrix(side: int) -> np.ndarray:
    x = np.arange(side)
    matrix: np.ndarray = np.sqrt(2.0 / side) * np.cos(np.pi * (2 * x[None, :] + 1) * x[:, None] / (2 * side))
    matrix[0] /= np.sqrt(2.0)
    return matrix


def invariant(vectors: np.ndarray, side: int) -> np.ndarray:
    """float32 (N, side*side): the same for every variant of an embedding (of the full group), 1-Lipschitz in L2,
    norm-preserving (unit rows stay unit). A flip multiplies DCT coefficient (u, v) by (-1)^v (or (-1)^u), a
    transpose swaps (u, v) and (v, u), inversion negates all: absolute values, with each off-diagonal pair
    sorted, are left unchanged; taking absolute values and sorting pairs are non-expansive."""
    matrix = _dct_matrix(side)
    coefficients = np.abs(matrix @ vectors.reshape(len(vectors), side, side).astype(np.float64) @ matrix.T)
    upper = np.triu_indices(side, 1)
    a, b = coefficients[:, upper[0], upper[1]], coefficients[:, upper[1], upper[0]]
    diagonal = coefficients[:, np.arange(side), np.arange(side)]
    return np.ascontiguousarray(np.concatenate([diagonal, np.maximum(a, b), np.minimum(a, b)], axis=1), np.float32)
