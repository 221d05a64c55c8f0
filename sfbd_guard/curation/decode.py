"""Decoding work, one chunk of records at a time, in this process or in worker processes.

A chunk result carries, per record, its pixel sha256 and the array to store: uint8 pixels for clean
records, the float16 noised copy for protected ones, nothing for excluded ones (their pixels leave
the worker only as a hash).
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
    array: np.ndarray | None = None
    seed: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class NoiseParams:
    sigma: float
    seed: int


def process(reader: DatasetReader, task: Task, noise: NoiseParams) -> Outcome:
    """Decode, transform and hash one record; noise it when protected."""
    try:
        pixels = reader.load(task.record_id)
    except ImageDecodeError as err:
        return Outcome(task.record_id, task.action, error=str(err))
    if pixels.shape[0] != reader.channels:
        return Outcome(task.record_id, task.action, error=f"expected {reader.channels} channels, got {pixels.shape[0]}")
    digest = pixel_sha256(pixels)
    if task.action == "clean":
        return Outcome(task.record_id, task.action, digest, pixels)
    if task.action == "protect":
        seed = noise_seed(noise.seed, task.record_id)
        return Outcome(task.record_id, task.action, digest, noised_copy(pixels, sigma=noise.sigma, seed=seed), seed)
    return Outcome(task.record_id, task.action, digest)


def process_chunk(reader: DatasetReader, tasks: list[Task], noise: NoiseParams) -> list[Outcome]:
    return [process(reader, task, noise) for task in tasks]


# Worker processes open their own reader once (pool initializer) and keep it for their lifetime.
_worker_reader: DatasetReader | None = None


def init_worker(spec: SourceSpec) -> None:
    global _worker_reader
    _worker_reader = open_reader(spec)


def worker_chunk(job: tuple[list[Task], NoiseParams]) -> list[Outcome]:
    assert _worker_reader is not None, "init_worker was not called"
    tasks, noise = job
    return process_chunk(_worker_reader, tasks, noise)
