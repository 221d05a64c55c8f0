"""The owner's release register: every protected image that left the owner's hands, and with which noise.

Two releases of one image with independent noise (another key, sigma, resolution or record id) can be averaged:
k draws at sigma_i leave sigma_eff = (sum sigma_i^-2)^(-1/2). The register lets `guard prepare` see that coming.
It lives with the owner's key (`releases.parquet` in the same folder: $XDG_CONFIG_HOME/sfbd_guard/ by default),
outside every prepared directory, and holds one row per released protected image and prepare:

    digest      HMAC-SHA256(register subkey, pixel sha256): the image, under a key only the owner holds
    key_id      the noise key's id (keys.py)       sigma, resolution, record_id: the rest of what keys the noise
    event_id    the prepare's ledger event          released_at: when
    embedder, embedding   the image's dedup embedding and how it was made (null with dedup off)

Two rows with one digest and the same (key_id, sigma, resolution, record_id) are one draw (the noise is a function
of them and the pixels, noise.py); any other pair is two draws. The register subkey is derived from the owner's
key at its default place (even when a prepare's noise is keyed by another key file), so one register sees the
releases under every key the owner uses.

Matching is exact (same pixels after the policy's resize, by digest) and, when the policy's dedup is on, near:
each row also keeps the image's dedup embedding (`embedder` names how it was made; `embedding`, a low-resolution
summary of the original, which is why the register is as private as the originals), and a new release whose
embedding, at its best variant under the policy's dedup transforms (pixel embedder), has cosine >= the policy's
dedup threshold with a released image of another digest is another draw of that image too, searched with
dedup's FAISS range search.

Writes are atomic (a new file renamed over the old) under an exclusive lock (`releases.parquet.lock`), so two
prepares running at once both land.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..fileio import atomic_write_bytes
from ..hashing import keyed_digest, sha256_file
from ..symmetry import Variant

REGISTER_NAME = "releases.parquet"
_FIELDS: list[pa.Field[Any]] = [
    pa.field("digest", pa.string()), pa.field("key_id", pa.string()), pa.field("sigma", pa.float64()),
    pa.field("resolution", pa.int32()), pa.field("record_id", pa.string()), pa.field("event_id", pa.string()),
    pa.field("released_at", pa.timestamp("us", tz="UTC")),
    pa.field("embedder", pa.string()), pa.field("embedding", pa.list_(pa.float32())),  # null without dedup
]
SCHEMA = pa.schema(_FIELDS)
DRAW = ("key_id", "sigma", "resolution", "record_id")  # with the pixels, what the noise is a function of


@dataclass(frozen=True)
class Rerelease:
    """Images of this prepare that were released before with other noise."""

    images: int  # how many
    earlier: list[tuple[str, int]]  # (prepare event id, images of this prepare it released), most first
    min_sigma_eff: float  # the smallest sigma_eff over them, this release included
    sigma_eff: list[float]  # per such image
    near: int = 0  # of `images`, those matched only as near copies


@dataclass(frozen=True)
class Near:
    """How to match near copies: the policy's dedup embedder (its identity), threshold and the variants the near
    search compares (dedup.Embedding.search_variants: the transforms' group for the pixel embedder)."""

    embedder: str
    threshold: float
    variants: tuple[Variant, ...]
    size: int


def register_path(owner_key_path: Path) -> Path:
    return owner_key_path.parent / REGISTER_NAME


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the register (blocking), held while it is checked and appended to."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read(path: Path) -> pa.Table:
    """The register (empty if there is none yet); a file that is not one is refused."""
    if not path.exists():
        return SCHEMA.empty_table()
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"release register {path}: not readable ({err})",
                         hint="restore it from a backup; a register that is lost forgets every earlier release") from None
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise InputError(f"release register {path}: unexpected columns {table.column_names}")
    return table


def entries(register_subkey: bytes, released: pa.Table, *, key_id: str, sigma: float, resolution: int,
            event_id: str, embedder: str | None = None, vectors: np.ndarray | None = None) -> pa.Table:
    """The register rows of this prepare's released protected images (`released`: record_id, sha256; `vectors`:
    their dedup embeddings, in the same order, made by `embedder`)."""
    count = released.num_rows
    if vectors is not None:
        assert len(vectors) == count
        flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
        embedding: pa.Array[Any] = pa.ListArray.from_arrays(pa.array(np.arange(count + 1) * vectors.shape[1],
                                                                     pa.int32()), flat)
    else:
        embedding = pa.nulls(count, pa.list_(pa.float32()))
    digests = [keyed_digest(register_subkey, str(sha)) for sha in released.column("sha256").to_pylist()]
    now = datetime.now(UTC)
    return pa.table({
        "digest": pa.array(digests, pa.string()),
        "key_id": pa.array([key_id] * count, pa.string()),
        "sigma": pa.array(np.full(count, sigma), pa.float64()),
        "resolution": pa.array(np.full(count, resolution, np.int32), pa.int32()),
        "record_id": released.column("record_id").cast(pa.string()),
        "event_id": pa.array([event_id] * count, pa.string()),
        "released_at": pa.array([now] * count, pa.timestamp("us", tz="UTC")),
        "embedder": pa.array([embedder if vectors is not None else None] * count, pa.string()),
        "embedding": embedding,
    }, schema=SCHEMA)


def sigma_eff(sigmas: np.ndarray) -> float:
    """sigma_eff = (sum sigma_i^-2)^(-1/2) of independent Gaussian draws (their precision-weighted mean's noise)."""
    return float(np.sum(np.asarray(sigmas, np.float64) ** -2.0) ** -0.5)


def _vectors(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """The embeddings of `rows` of a register-shaped table as one float32 (len(rows), dim) array."""
    chosen: Any = table.column("embedding").take(pa.array(rows)).combine_chunks()
    flat = np.asarray(chosen.flatten().to_numpy(zero_copy_only=False), np.float32)
    return np.ascontiguousarray(flat.reshape(len(rows), -1))


def near_pairs(register: pa.Table, new: pa.Table, near: Near, skip: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """(new row, register row) of every pair whose embeddings (made by the same embedder) have cosine >= the
    threshold at the best variant (the policy's dedup transforms, pixel embedder): as dedup's near search, one
    FAISS range search on `symmetry.invariant` of both sides (never farther apart than the nearest variants) gives
    the candidates, each kept if its best variant reaches the threshold (exhaustive over the register: the cost
    is new rows × register rows). New rows in `skip` are not searched."""
    import faiss

    from ..symmetry import best_similarity, invariant
    from .dedup import CANDIDATE_SLACK, range_pairs

    def usable(table: pa.Table) -> np.ndarray:
        embedders = table.column("embedder").to_pylist()
        valid = table.column("embedding").is_valid().to_numpy(zero_copy_only=False)
        return np.flatnonzero(np.array([e == near.embedder for e in embedders], bool) & valid)

    old_rows, new_rows = usable(register), usable(new)
    if skip is not None and len(skip):
        new_rows = np.setdiff1d(new_rows, skip)
    if not len(old_rows) or not len(new_rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    base, queries = _vectors(register, old_rows), _vectors(new, new_rows)
    several = len(near.variants) > 1
    searched_base, searched = (invariant(base, near.size), invariant(queries, near.size)) if several else (base, queries)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(searched_base, np.float32))
    at, other = range_pairs(index, np.ascontiguousarray(searched, np.float32),
                            near.threshold - CANDIDATE_SLACK if several else near.threshold)
    if several and len(at):
        keep = best_similarity(queries[at], base[other], near.size, near.variants) >= np.float32(near.threshold)
        at, other = at[keep], other[keep]
    return new_rows[at], old_rows[other]


def find_rereleases(register: pa.Table, new: pa.Table, near: Near | None = None) -> Rerelease | None:
    """The images of `new` already in `register` under another draw (exactly, or as a near copy), or None."""
    if register.num_rows == 0 or new.num_rows == 0:
        return None
    ours = new.select(["digest"]).append_column("new_row", pa.array(np.arange(new.num_rows), pa.int64()))
    theirs = register.select(["digest"]).append_column("old_row", pa.array(np.arange(register.num_rows), pa.int64()))
    exact = theirs.join(ours, "digest", join_type="inner")
    pairs_new = np.asarray(exact.column("new_row").to_numpy(), np.int64)  # an empty join's column reads as float
    pairs_old = np.asarray(exact.column("old_row").to_numpy(), np.int64)
    if near is not None:
        # an image in the register already (any draw) needs no near search: a near copy released before it was
        # matched at its release, one released after it was matched then (refused, or allowed and recorded)
        more_new, more_old = near_pairs(register, new, near, skip=np.unique(pairs_new))
        pairs_new, pairs_old = np.concatenate([pairs_new, more_new]), np.concatenate([pairs_old, more_old])
    if not len(pairs_new):
        return None
    draw = ["digest", *DRAW]
    new_draws = list(zip(*(new.column(c).to_pylist() for c in draw), strict=True))
    old_draws = list(zip(*(register.column(c).to_pylist() for c in draw), strict=True))
    events = register.column("event_id").to_pylist()
    draws: dict[int, set[tuple[Any, ...]]] = {}  # new row -> the distinct draws of its image, its own included
    other: dict[int, bool] = {}  # new row -> released before under another draw (exactly)
    by_event: dict[str, set[str]] = {}
    for new_row, old_row in zip(pairs_new.tolist(), pairs_old.tolist(), strict=True):
        mine, theirs_draw = new_draws[new_row], old_draws[old_row]
        draws.setdefault(new_row, {mine}).add(theirs_draw)
        if theirs_draw != mine:
            other[new_row] = other.get(new_row, False) or theirs_draw[0] == mine[0]
            by_event.setdefault(str(events[old_row]), set()).add(str(mine[0]))
    if not other:
        return None
    per_image: dict[str, float] = {}
    near_only: set[str] = set()
    for new_row, exactly in other.items():
        digest = str(new_draws[new_row][0])
        value = sigma_eff(np.array([d[2] for d in draws[new_row]]))  # d = (digest, key_id, sigma, ...)
        per_image[digest] = min(value, per_image.get(digest, value))
        if not exactly:
            near_only.add(digest)
    near_only -= {str(new_draws[r][0]) for r, exactly in other.items() if exactly}
    effs = list(per_image.values())
    ranked = sorted(((event, len(d)) for event, d in by_event.items()), key=lambda item: (-item[1], item[0]))
    return Rerelease(len(per_image), ranked, min(effs), effs, len(near_only))


def append(path: Path, rows: pa.Table) -> str:
    """Append `rows` to the register atomically (call under `locked`); returns the new file's sha256."""
    table = pa.concat_tables([read(path), rows])
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())
    return sha256_file(path)


def rerelease_error(found: Rerelease, register: Path) -> InputError:
    """The refusal of a prepare that would release images again with other noise (exit 2)."""
    first, count = found.earlier[0]
    others = f" and {len(found.earlier) - 1} other prepare(s)" if len(found.earlier) > 1 else ""
    near = f" ({found.near} of them as near copies)" if found.near else ""
    return InputError(
        f"{found.images} protected image(s){near} were already released with other noise (another key, sigma, "
        f"resolution or record id) by prepare {first[:12]} ({count} image(s)){others}, in {register}: releasing them "
        f"again lets their noisy copies be averaged down to sigma_eff {found.min_sigma_eff:.3g}",
        hint="prepare them with the key, sigma and record ids of that release, or pass --allow-rerelease (recorded in "
             "the card and the ledger)")
