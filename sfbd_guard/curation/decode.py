"""Decoding work, one chunk of records at a time, in this process or in worker processes.

A chunk result carries, per record, its pixel sha256, and the arrays to store, stacked per action
(one array per chunk is much cheaper to send between processes than one per record): uint8 pixels
of the clean records, float16 noised copies of the protected ones. Excluded records have no array
(their pixels leave the worker only as a hash).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..datasets import DatasetReader, SourceSpec, open_reader
from ..errors import ImageDecodeError
from .noise import noise_seed, noised_copy, pixel_sha256


@dataclass(frozen=True)
class Task:
    record_id: str
    action: str  # exclude | clean | protect


@dataclass(frozen=True)
class Outcome:
    record_id: str
    action: str
    sha256: str | None = None
    seed: int | None = None
    error: str | None = None

    @property
    def stored(self) -> bool:
        """Whether the record has an array to store (clean or protected, and readable)."""
        return self.error is None and self.action != "exclude"


@dataclass(frozen=True)
class ChunkResult:
    outcomes: list[Outcome]  # in task order
    arrays: dict[str, np.ndarray]  # action → the stored records' arrays, stacked in task order


@dataclass(frozen=True)
class NoiseParams:
    sigma: float
    seed: int


def process(reader: DatasetReader, task: Task, noise: NoiseParams) -> tuple[Outcome, np.ndarray | None]:
    """Decode, transform and hash one record; noise it when protected. Returns its outcome and array to store."""
    try:
        pixels = reader.load(task.record_id)
    except ImageDecodeError as err:
        return Outcome(task.record_id, task.action, error=str(err)), None
    if pixels.shape[0] != reader.channels:
        return Outcome(task.record_id, task.action, error=f"expected {reader.channels} channels, got {pixels.shape[0]}"), None
    digest = pixel_sha256(pixels)
    if task.action == "clean":
        return Outcome(task.record_id, task.action, digest), pixels
    if task.action == "protect":
        seed = noise_seed(noise.seed, task.record_id)
        return Outcome(task.record_id, task.action, digest, seed), noised_copy(pixels, sigma=noise.sigma, seed=seed)
    return Outcome(task.record_id, task.action, digest), None


def process_chunk(reader: DatasetReader, tasks: list[Task], noise: NoiseParams) -> ChunkResult:
    outcomes: list[Outcome] = []
    arrays: dict[str, list[np.ndarray]] = {}
    for task in tasks:
        outcome, array = process(reader, task, noise)
        outcomes.append(outcome)
        if array is not None:
            arrays.setdefault(task.action, []).append(array)
    return ChunkResult(outcomes, {action: np.stack(rows) for action, rows in arrays.items()})


# Worker processes open their own reader once (pool initializer) and keep it for their lifetime.
_worker_reader: DatasetReader | None = None


def init_worker(spec: SourceSpec) -> None:
    global _worker_reader
    _worker_reader = open_reader(spec)


def worker_chunk(job: tuple[list[Task], NoiseParams]) -> ChunkResult:
    assert _worker_reader is not None, "init_worker was not called"
    tasks, noise = job
    return process_chunk(_worker_reader, tasks, noise)
