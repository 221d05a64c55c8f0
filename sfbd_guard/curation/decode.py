"""Decoding work, one part of the dataset at a time, in this process or in worker processes.

A worker reads its part's records (`DatasetReader.read_part`), hashes each record's transformed pixels,
noises the protected ones with their keyed noise and writes the clean uint8 pixels and the protected
float16 noisy copies to shard files of its own, block by block (`shards.PartShardWriter`). What goes back
to the parent is small: per record its sha256, error and place, and the files written. Excluded records
have no array (their pixels leave the worker only as a hash). Stages run a block of records at a time:
decoding and noising record by record is about 15% slower (the two evict each other's code and tables
from the CPU caches).

With dedup on (`embedding` set), the same pass also computes each record's near-duplicate embedding
(dedup.py) and writes them to `.dedup-<part>.npy.tmp` in the staging folder: never published (an
embedding of a protected original is a low-resolution copy of it), deleted by the parent once read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..datasets import DatasetReader, Part, SourceSpec, open_reader
from ..errors import ImageDecodeError
from ..hashing import canonical_sha256, pixel_sha256
from ..keys.secret import NoiseKey
from .dedup import Embedding
from .noise import noised_copies, record_key
from .shards import PartShardWriter, ShardFile


@dataclass(frozen=True)
class NoiseParams:
    """Sigma and the secret key of the noise (sent to worker processes through a pipe, never written)."""

    sigma: float
    key: NoiseKey

    @property
    def subkey(self) -> bytes:
        """The noise subkey (HKDF of the owner's secret, keys.py), derived where the noise is drawn."""
        return self.key.noise_subkey


@dataclass(frozen=True)
class PartTask:
    """One part to decode: its records in dataset order, each one's action (clean | protect | exclude), and where
    to write (the staging folder; shard size and block size are the parent's, so workers cannot disagree)."""

    part: Part
    record_ids: list[str]
    actions: list[str]
    staging: Path
    shard_records: int
    block_records: int
    embedding: Embedding | None = None  # how dedup embeds a record; None: dedup off, no embeddings


@dataclass(frozen=True)
class PartResult:
    """Per record of the part, in dataset order: its pixel sha256 (None if unreadable), the reason it is unreadable,
    and its place (temporary shard file, row) if stored; and the shard files written, in order."""

    index: int
    sha256: list[str | None]
    errors: list[str | None]
    places: list[tuple[str, int] | None]
    shards: list[ShardFile]
    embeddings: str | None = None  # staging file of the records' dedup embeddings (zero rows: unreadable)
    canonical: list[str | None] | None = None  # with dedup: per record, its canonical sha256 (None if unreadable)


def _check(reader: DatasetReader, pixels: np.ndarray) -> str | None:
    """Why `pixels` is not a record of this reader's shape, or None."""
    size = reader.spec.resolution
    if pixels.shape[0] != reader.channels:
        return f"expected {reader.channels} channels, got {pixels.shape[0]}"
    if pixels.dtype != np.uint8 or pixels.shape != (reader.channels, size, size):
        return f"expected uint8 pixels of shape {(reader.channels, size, size)}, got {pixels.dtype} {pixels.shape}"
    return None


class _Blocks:
    """Collects decoded records and writes them a block at a time to the part's clean and protected shards."""

    def __init__(self, task: PartTask, noise: NoiseParams, places: list[tuple[str, int] | None],
                 sha256: list[str | None]) -> None:
        self.task, self.noise, self.places, self.sha256 = task, noise, places, sha256
        self.subkey = noise.subkey if "protect" in task.actions else b""
        self.writers = {
            "clean": PartShardWriter(task.staging, "clean", np.dtype(np.uint8), task.part.index, task.shard_records),
            "protect": PartShardWriter(task.staging, "protected", np.dtype(np.float16), task.part.index,
                                       task.shard_records),
        }
        self.pending: list[tuple[int, np.ndarray]] = []

    def add(self, row: int, pixels: np.ndarray) -> None:
        self.pending.append((row, pixels))
        if len(self.pending) >= self.task.block_records:
            self.flush()

    def flush(self) -> None:
        for action, writer in self.writers.items():
            rows = [(row, pixels) for row, pixels in self.pending if self.task.actions[row] == action]
            if not rows:
                continue
            stacked = np.stack([pixels for _, pixels in rows])
            if action == "protect":
                keys = [record_key(self.subkey, self.task.record_ids[row], sigma=self.noise.sigma,
                                   shape=stacked.shape[1:], pixel_sha256=str(self.sha256[row])) for row, _ in rows]
                stacked = noised_copies(stacked, sigma=self.noise.sigma, keys=keys)
            for (row, _), place in zip(rows, writer.add(stacked), strict=True):
                self.places[row] = place
        self.pending = []

    def close(self) -> list[ShardFile]:
        self.flush()
        return [*self.writers["clean"].close(), *self.writers["protect"].close()]

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def embeddings_name(part: int) -> str:
    """The staging file of a part's dedup embeddings."""
    return f".dedup-{part:06d}.npy.tmp"


class _Embeddings:
    """The part's dedup embeddings and canonical sha256 (symmetry.canonical under the policy's transforms),
    computed a block at a time; the embeddings are written to one staging file at the end."""

    def __init__(self, task: PartTask, count: int) -> None:
        self.task = task
        self.embedding = task.embedding
        self.vectors = np.zeros((count, self.embedding.dim) if self.embedding else (0, 0), np.float32)
        self.canonical: list[str | None] | None = [None] * count if self.embedding else None
        self.pending: list[tuple[int, np.ndarray]] = []
        self.name = embeddings_name(task.part.index)
        self.embed: Callable[[np.ndarray], np.ndarray] | None = None  # made at the first block (a clip model loads)

    def add(self, row: int, pixels: np.ndarray) -> None:
        if self.embedding is None:
            return
        self.pending.append((row, pixels))
        if len(self.pending) >= self.task.block_records:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.embedding is not None:
            if self.embed is None:
                self.embed = self.embedding.embedder()
            rows = [row for row, _ in self.pending]
            stacked = np.stack([pixels for _, pixels in self.pending])
            self.vectors[rows] = self.embed(stacked)
            assert self.canonical is not None
            for row, digest in zip(rows, canonical_sha256(stacked, self.embedding.variants), strict=True):
                self.canonical[row] = digest
            self.pending = []

    def close(self) -> str | None:
        if self.embedding is None:
            return None
        self.flush()
        with open(self.task.staging / self.name, "xb") as handle:
            np.save(handle, self.vectors)
        return self.name

    def discard(self) -> None:
        (self.task.staging / self.name).unlink(missing_ok=True)


def process_part(reader: DatasetReader, task: PartTask, noise: NoiseParams) -> PartResult:
    """Decode, hash, noise and store every record of the part (see the module docstring)."""
    count = len(task.record_ids)
    rows = {record_id: row for row, record_id in enumerate(task.record_ids)}
    sha256: list[str | None] = [None] * count
    errors: list[str | None] = [None] * count
    places: list[tuple[str, int] | None] = [None] * count
    seen = [False] * count
    blocks = _Blocks(task, noise, places, sha256)
    embedded = _Embeddings(task, count)
    try:
        for record_id, loaded in reader.read_part(task.part, task.record_ids):
            row = rows.get(record_id)
            if row is None or seen[row]:
                raise RuntimeError(f"{reader.format} reader returned {record_id!r}, not a pending record of {task.part.name}")
            seen[row] = True
            problem = str(loaded) if isinstance(loaded, ImageDecodeError) else _check(reader, loaded)
            if problem is not None or isinstance(loaded, ImageDecodeError):
                errors[row] = problem
                continue
            sha256[row] = pixel_sha256(loaded)
            embedded.add(row, loaded)
            if task.actions[row] not in ("exclude", "holdout"):
                blocks.add(row, loaded)
        for row in range(count):
            if not seen[row]:
                errors[row] = f"not found in {task.part.name}"
        shards = blocks.close()
        embeddings = embedded.close()
    except BaseException:
        blocks.discard()
        embedded.discard()
        raise
    return PartResult(task.part.index, sha256, errors, places, shards, embeddings, embedded.canonical)


# Worker processes open their own reader once (pool initializer) and keep it for their lifetime.
_worker_reader: DatasetReader | None = None


def init_worker(spec: SourceSpec) -> None:
    global _worker_reader
    _worker_reader = open_reader(spec)


def worker_part(job: tuple[PartTask, NoiseParams]) -> PartResult:
    assert _worker_reader is not None, "init_worker was not called"
    task, noise = job
    return process_part(_worker_reader, task, noise)


def worker_part_metadata(part: Part) -> pa.Table:
    assert _worker_reader is not None, "init_worker was not called"
    return _worker_reader.part_metadata(part)
