"""`guard prepare`: apply a policy to a dataset and write the prepared directory.

<output>/
  manifest.parquet   one row per source record of the split (lineage: rule, sha256, sigma, file, row)
  clean/             uint8 N×C×H×W .npy shards
  protected/         float16 N×C×H×W .npy shards of x/127.5 - 1 + sigma*eps (never the originals)
  card.json          what was done, counts, and the sha256 of every array file
No protected or excluded original is written under <output>, in any form.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..contracts.card import Card, card_from_dict, card_path, write_card
from ..datasets import DatasetReader, SourceSpec, open_reader
from ..errors import DataError
from ..hashing import fingerprint, sha256_file
from ..policy import LoadedPolicy
from ..progress import ProgressFactory, Tick
from .decode import ChunkResult, NoiseParams, Outcome, Task, init_worker, process_chunk, worker_chunk
from .keys import NoiseKey, fresh_key, read_key_file
from .manifest import ACTION_PARTITION, PARTITIONS, manifest_table
from .noise import GENERATOR
from .output import abandon_output, claim_output, finish_output, start_output
from .rules import decide
from .shards import SHARD_RECORDS, ShardWriter

CHUNK_RECORDS = 64


@dataclass(frozen=True)
class PrepareResult:
    output: Path
    counts: dict[str, int]
    rule_counts: dict[str, int]
    errors: list[tuple[str, str]]  # (record_id, reason)
    card: Card
    seconds: float
    source_fingerprint: str = field(default="")


def source_spec(loaded: LoadedPolicy, data_root: Path | None) -> SourceSpec:
    """The dataset to read: the policy's, with --data-root overriding its root."""
    dataset = loaded.policy.dataset
    root = data_root.resolve() if data_root else (loaded.resolve(dataset.root) if dataset.root else None)
    return SourceSpec(format=dataset.format, root=root, split=dataset.split, resolution=dataset.resolution,
                      max_pixels=dataset.max_pixels, max_file_bytes=dataset.max_file_bytes)


def output_dir(loaded: LoadedPolicy, out: Path | None) -> Path:
    return out.resolve() if out else loaded.resolve(loaded.policy.output)


def _chunks(tasks: list[Task]) -> list[list[Task]]:
    return [tasks[i : i + CHUNK_RECORDS] for i in range(0, len(tasks), CHUNK_RECORDS)]


@contextmanager
def worker_pool(spec: SourceSpec, workers: int) -> Iterator[Pool | None]:
    """`workers` processes that each open their own reader, or None to decode in this process (workers=1).

    Started before the metadata and rules are read, so that the workers start up meanwhile.
    """
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(spec,)) as pool:
        yield pool


def run_tasks(reader: DatasetReader, tasks: list[Task], noise: NoiseParams, pool: Pool | None) -> Iterator[ChunkResult]:
    """Chunk results in task order, computed here (no pool) or by the pool's worker processes."""
    chunks = _chunks(tasks)
    if pool is None:
        for chunk in chunks:
            yield process_chunk(reader, chunk, noise)
        return
    yield from pool.imap(worker_chunk, [(chunk, noise) for chunk in chunks])


def _store(chunks: Iterator[ChunkResult], staging: Path, strict: bool,
           progress: Tick | None) -> tuple[dict[str, Outcome], dict[str, tuple[str, int]], dict[str, str]]:
    writers = {
        "clean": ShardWriter(staging, "clean", np.dtype(np.uint8)),
        "protect": ShardWriter(staging, "protected", np.dtype(np.float16)),
    }
    results: dict[str, Outcome] = {}
    places: dict[str, tuple[str, int]] = {}
    for chunk in chunks:
        for outcome in chunk.outcomes:
            if outcome.error is not None and strict:
                raise DataError(f"record {outcome.record_id}: {outcome.error}", hint="--strict makes unreadable records fatal")
            results[outcome.record_id] = outcome
        for action, rows in chunk.arrays.items():
            stored = [o.record_id for o in chunk.outcomes if o.action == action and o.stored]
            places.update(zip(stored, writers[action].add(rows), strict=True))
        if progress:
            progress(len(chunk.outcomes))
    files: dict[str, str] = {}
    for writer in writers.values():
        writer.flush()
        files.update(writer.files)
    return results, places, files


def _manifest_columns(record_ids: list[str], rules: list[str | None], results: dict[str, Outcome],
                      places: dict[str, tuple[str, int]], sigma: float) -> dict[str, list[object]]:
    names = ("record_id", "partition", "rule", "sha256", "sigma", "file", "row", "error")
    columns: dict[str, list[object]] = {k: [] for k in names}
    for record_id, rule in zip(record_ids, rules, strict=True):
        outcome = results[record_id]
        partition = "error" if outcome.error is not None else ACTION_PARTITION[outcome.action]
        file, row = places.get(record_id, (None, None))
        columns["record_id"].append(record_id)
        columns["partition"].append(partition)
        columns["rule"].append(None if partition == "error" else rule)
        columns["sha256"].append(outcome.sha256)
        columns["sigma"].append({"clean": 0.0, "protected": sigma}.get(partition))
        columns["file"].append(file)
        columns["row"].append(row)
        columns["error"].append(outcome.error)
    return columns


def _card(loaded: LoadedPolicy, spec: SourceSpec, reader: DatasetReader, manifest: pa.Table, key: NoiseKey,
          rule_counts: dict[str, int], files: dict[str, str], manifest_sha256: str, output: Path) -> dict[str, Any]:
    partitions = manifest.column("partition").to_pylist()
    policy = loaded.policy
    return {
        "policy_name": policy.name,
        "policy_sha256": loaded.sha256,
        "policy_path": card_path(loaded.path, output),  # relative to the card's folder inside the project
        "policy": policy.model_dump(mode="json"),
        "format": spec.format,
        "root": card_path(spec.root, output) if spec.root else None,
        "split": spec.split,
        "resolution": spec.resolution,
        "channels": reader.channels,
        "color": reader.color,
        "sigma": policy.noise.sigma,
        "noise_generator": GENERATOR,
        "noise_key_id": key.key_id,  # HMAC(secret, label): names the key, reveals nothing of it
        "noise_key_source": key.source,  # ephemeral (discarded: the noise can never be regenerated) or key_file
        "counts": {p: partitions.count(p) for p in PARTITIONS},
        "rule_counts": rule_counts,
        "files": files,
        "manifest_sha256": manifest_sha256,
        "fingerprint": fingerprint({**files, "manifest.parquet": manifest_sha256}),
        "shard_records": SHARD_RECORDS,
        "tool_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def noise_key(loaded: LoadedPolicy, key_file: Path | None, output: Path) -> NoiseKey:
    """The secret of the noise: --noise-key, else the policy's noise.key_file, else a fresh one."""
    path = key_file
    if path is None and loaded.policy.noise.key_file:
        path = loaded.resolve(loaded.policy.noise.key_file)
    if path is None:
        return fresh_key()
    return read_key_file(path, forbidden=(output,))


def prepare(loaded: LoadedPolicy, *, data_root: Path | None = None, out: Path | None = None, workers: int = 1,
            strict: bool = False, overwrite: bool = False, key_file: Path | None = None,
            progress: ProgressFactory | None = None) -> PrepareResult:
    """Apply `loaded` to its dataset and write the prepared directory atomically.

    The noise is keyed by `key_file` (or the policy's noise.key_file); without one, by a fresh secret
    that is forgotten when this returns. `progress(label, total)` may return a callback that is told how many
    records were just processed.
    """
    started = time.perf_counter()
    spec = source_spec(loaded, data_root)
    output = output_dir(loaded, out)
    key = noise_key(loaded, key_file, output)
    reader = open_reader(spec)
    claim = claim_output(output, overwrite=overwrite, dataset_root=spec.root, policy_dir=loaded.base_dir)
    with claim, worker_pool(spec, workers) as pool:
        metadata = reader.metadata()
        decisions = decide(metadata, list(loaded.policy.rules), base_dir=loaded.base_dir, source=str(loaded.path))
        record_ids: list[str] = [str(r) for r in metadata.column("record_id").to_pylist()]
        tasks = [Task(r, a) for r, a in zip(record_ids, decisions.actions, strict=True) if a is not None]
        noise = NoiseParams(sigma=loaded.policy.noise.sigma, key=key)
        staging = start_output(output, overwrite=overwrite)
        try:
            for partition in ("clean", "protected"):
                (staging / partition).mkdir(mode=0o700)
            tick = progress("decoding", len(tasks)) if progress else None
            results, places, files = _store(run_tasks(reader, tasks, noise, pool), staging, strict, tick)
            columns = _manifest_columns(record_ids, decisions.rules, results, places, noise.sigma)
            manifest = manifest_table(columns, metadata)
            pq.write_table(manifest, staging / "manifest.parquet")
            card = card_from_dict(_card(loaded, spec, reader, manifest, key, decisions.rule_counts(), files,
                                        sha256_file(staging / "manifest.parquet"), output))
            write_card(staging, card)
            finish_output(staging, output)
        except BaseException:
            abandon_output(staging)
            raise
    errors = [(r, e) for r in record_ids if (e := results[r].error) is not None]
    source = fingerprint({r: results[r].sha256 or "" for r in record_ids})
    return PrepareResult(output, dict(card.counts), dict(card.rule_counts), errors, card, time.perf_counter() - started,
                         source)
