"""`guard prepare`: apply a policy to a dataset and write the prepared directory.

<output>/
  manifest.parquet   one row per source record of the split, saying only what training needs (disclosure.py:
                     rule, keyed digest, sigma, file, row; excluded records opaque; metadata by allow-list)
  clean/             uint8 N×C×H×W .npy shards
  protected/         float16 N×C×H×W .npy shards of x/127.5 - 1 + sigma*eps (never the originals)
  card.json          what was done, counts, and the sha256 of every array file
No protected or excluded original is written under <output>, in any form. The full manifest (file names,
metadata, plain pixel sha256) goes to the owner's folder as lineage/<fingerprint>.parquet (keys/owner.py).

Memory does not grow with the dataset: the records' metadata is written to a memory-mapped file
(records.py), the rules keep one int per record, workers read and write their own parts
(decode.py, shards.py), and the manifest is written a part at a time. At most a few parts are in
flight at once.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..datasets import DatasetReader, Part, SourceSpec, open_reader
from ..datasets.base import ListingReport
from ..errors import DataError, InputError
from ..executor import LOCAL, ExecutorSpec, cluster_cpus, ray_session
from ..hashing import digest_key_id, fingerprint, new_sha256, sha256_file
from ..keys.owner import digest_key_path, lineage_path
from ..keys.secret import NoiseKey, OwnerKey, export_digest_key, fresh_key, owner_key, read_key_file
from ..policy.model import DedupSpec as DedupPolicy
from ..policy.model import LoadedPolicy
from ..policy.rules import Decisions, decide
from ..prepared import layout
from ..prepared.card import Card, card_from_dict, card_path, write_card
from ..prepared.manifest import (
    ACTION_PARTITION,
    DUP_COLUMNS,
    MANIFEST_FIELDS,
    PARTITIONS,
    manifest_schema,
    manifest_table,
)
from ..prepared.writer import abandon_output, claim_output, finish_output, start_output
from ..progress import ProgressFactory
from ..version import __version__
from . import dedup, disclosure, register
from . import shards as shard_files
from .decode import NoiseParams, PartResult, PartTask, init_worker, process_part, worker_part, worker_part_metadata
from .listing import check_listing
from .noise import GENERATOR
from .records import Records, collect, discard, metadata_slice, slice_ids

CHUNK_RECORDS = 64  # records per block a worker decodes, then noises and writes
IN_FLIGHT_PER_WORKER = 2  # parts queued per worker process: enough to keep it busy, few enough to bound memory
LINEAGE_FILE = ".lineage.parquet.tmp"  # in the staging folder until moved to the owner's folder (keys/owner.py)
MAX_ERRORS_KEPT = 1000  # error rows listed in the result (all of them are in the manifest)


@dataclass(frozen=True)
class PrepareResult:
    output: Path
    counts: dict[str, int]
    rule_counts: dict[str, int]
    errors: list[tuple[str, str]]  # (record_id, reason), the first MAX_ERRORS_KEPT
    card: Card
    seconds: float
    source_fingerprint: str = field(default="")
    error_count: int = 0
    listing: ListingReport | None = None  # how an image folder's metadata met its images (examples for the summary)
    key_note: str = ""  # where the key is (one line for the data owner)
    register_file: Path | None = None  # the owner's release register
    register_sha256: str = ""  # its sha256 after this prepare's releases were appended
    rerelease: register.Rerelease | None = None  # images released before with other noise (--allow-rerelease)


def source_spec(loaded: LoadedPolicy, data_root: Path | None) -> SourceSpec:
    """The dataset to read: the policy's, with --data-root overriding its root."""
    dataset = loaded.policy.dataset
    root = data_root.resolve() if data_root else (loaded.resolve(dataset.root) if dataset.root else None)
    return dataset.source_spec(root)


def output_dir(loaded: LoadedPolicy, out: Path | None) -> Path:
    return out.resolve() if out else loaded.resolve(loaded.policy.output)


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


class PartRunner(Protocol):
    """Runs the part work of a prepare, in part order, with a bounded number of parts in flight."""

    def metadata(self, parts: Iterable[Part]) -> Iterator[pa.Table]:
        """`reader.part_metadata(part)` for each part, in order."""

    def decode(self, jobs: Iterable[tuple[PartTask, NoiseParams]]) -> Iterator[PartResult]:
        """`process_part` for each job, in order (the work writes the part's shards itself)."""


@dataclass
class LocalParts:
    """The part work in this machine's process pool (or in this process, without a pool)."""

    pool: Pool | None
    reader: DatasetReader
    window: int

    def metadata(self, parts: Iterable[Part]) -> Iterator[pa.Table]:
        return ordered_map(self.pool, worker_part_metadata, self.reader.part_metadata, parts, self.window)

    def decode(self, jobs: Iterable[tuple[PartTask, NoiseParams]]) -> Iterator[PartResult]:
        return ordered_map(self.pool, worker_part, lambda job: process_part(self.reader, *job), jobs, self.window)


@contextmanager
def part_runner(spec: SourceSpec, reader: DatasetReader, workers: int, executor: ExecutorSpec) -> Iterator[PartRunner]:
    """The local pool of `workers` processes, or Ray tasks (ray_parts.py) with as many in flight per cluster CPU."""
    if not executor.is_ray:
        with worker_pool(spec, workers) as pool:
            yield LocalParts(pool, reader, max(1, workers) * IN_FLIGHT_PER_WORKER)
        return
    from .ray_parts import IN_FLIGHT_PER_CPU, RayParts

    local_cpus = executor.cpus or (workers if workers > 1 else None)
    with ray_session(replace(executor, cpus=local_cpus)) as ray:
        yield RayParts(ray, spec, cluster_cpus(ray) * IN_FLIGHT_PER_CPU)


def ordered_map(pool: Pool | None, work: Callable[[Any], Any], local: Callable[[Any], Any],
                jobs: Iterable[Any], window: int) -> Iterator[Any]:
    """`work(job)` for each job, in job order, by the pool's workers with at most `window` jobs in flight
    (`Pool.imap` would queue every job at once), or `local(job)` here when there is no pool."""
    if pool is None:
        yield from map(local, jobs)
        return
    pending: deque[Any] = deque()
    for job in jobs:
        pending.append(pool.apply_async(work, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ManifestWriter:
    """Writes the manifest a part at a time (one Parquet row group per part) and counts as it goes."""

    def __init__(self, path: Path, metadata_schema: pa.Schema, sigma: float) -> None:
        self.schema = manifest_schema(metadata_schema)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.sigma = sigma
        self.counts = dict.fromkeys(PARTITIONS, 0)
        self.rule_counts: dict[str, int] = {}  # records each rule decided that were read (an error row has no rule)
        self.errors: list[tuple[str, str]] = []
        self.error_count = 0
        self.source = new_sha256()  # over "record_id\tsha256\n" in manifest order

    def add(self, record_ids: list[str], rules: list[str | None], actions: list[str], result: PartResult,
            places: list[tuple[str, int] | None], metadata: pa.Table) -> None:
        columns: dict[str, list[object]] = {f.name: [] for f in MANIFEST_FIELDS}
        for row, record_id in enumerate(record_ids):
            error = result.errors[row]
            partition = "error" if error is not None else ACTION_PARTITION[actions[row]]
            file, place_row = places[row] or (None, None)
            sha = result.sha256[row]
            columns["record_id"].append(record_id)
            columns["partition"].append(partition)
            columns["rule"].append(None if partition == "error" else rules[row])
            columns["sha256"].append(sha)
            columns["canonical_sha256"].append(result.canonical[row] if result.canonical else None)
            columns["sigma"].append({"clean": 0.0, "protected": self.sigma}.get(partition))
            columns["file"].append(file)
            columns["row"].append(place_row)
            columns["error"].append(error)
            for name in DUP_COLUMNS:  # filled in by dedup (dedup.write_final_manifest)
                columns[name].append(None)
            self.counts[partition] += 1
            if partition != "error" and rules[row] is not None:
                self.rule_counts[str(rules[row])] = self.rule_counts.get(str(rules[row]), 0) + 1
            if error is not None:
                self.error_count += 1
                if len(self.errors) < MAX_ERRORS_KEPT:
                    self.errors.append((record_id, error))
            self.source.update(f"{record_id}\t{sha or ''}\n".encode())
        self.writer.write_table(manifest_table(columns, metadata))

    def close(self) -> None:
        self.writer.close()


def _part_tasks(records: Records, decisions: Decisions, staging: Path, embedding: dedup.Embedding | None
                ) -> Iterator[PartTask]:
    for part in records.parts:
        start, stop = records.rows(part.index)
        actions = [str(a) for a in decisions.actions_of(start, stop)]
        yield PartTask(part, slice_ids(records, part.index), actions, staging, shard_files.SHARD_RECORDS, CHUNK_RECORDS,
                       embedding)


def _publish_shards(staging: Path, result: PartResult, numbering: dict[str, int], files: dict[str, str],
                    ) -> list[tuple[str, int] | None]:
    """Give the part's shard files their final names (in part order) and return the records' final places."""
    renamed: dict[str, str] = {}
    for shard in result.shards:
        name = layout.shard_name(shard.partition, numbering[shard.partition])
        numbering[shard.partition] += 1
        (staging / shard.temp).rename(staging / name)
        renamed[shard.temp] = name
        files[name] = shard.sha256
    return [None if place is None else (renamed[place[0]], place[1]) for place in result.places]


def _card(loaded: LoadedPolicy, spec: SourceSpec, reader: DatasetReader, counts: dict[str, int], key: NoiseKey,
          rule_counts: dict[str, int], files: dict[str, str], manifest_sha256: str, output: Path,
          dedup_card: dict[str, Any], listing: ListingReport | None) -> dict[str, Any]:
    policy = loaded.policy
    card: dict[str, Any] = {
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
        "digest_key_id": digest_key_id(key.digest_subkey),  # lets verify tell another directory's digest key
        "noise_key_source": key.source,  # ephemeral (discarded: the noise can never be regenerated) or key_file
        "counts": counts,
        "rule_counts": rule_counts,
        "holdout": sum(rule_counts.get(r.name, 0) for r in policy.rules if r.action == "holdout"),
        "files": dict(sorted(files.items())),
        "manifest_sha256": manifest_sha256,
        "fingerprint": fingerprint({**files, layout.MANIFEST: manifest_sha256}),
        "shard_records": shard_files.SHARD_RECORDS,
        "dedup": dedup_card,
        "tool_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if loaded.overrides:  # guard prepare --set: `policy` above has them applied
        card["policy_overrides"] = dict(loaded.overrides)
    if listing is not None:
        card["listing"] = {"metadata_files": listing.metadata_files, "metadata_rows": listing.rows,
                           "images_without_row": len(listing.images_without_row),
                           "rows_without_image": len(listing.rows_without_image),
                           "unreadable_rows": len(listing.unreadable_rows)}
    return card


def _deduplicate(staging: Path, records: Records, decisions: Decisions, store: dedup.EmbeddingStore | None,
                 files: dict[str, str], spec: DedupPolicy, embedding: dedup.Embedding | None, decided: dict[str, int],
                 ) -> tuple[dict[str, int], dict[str, int], dict[str, Any], np.ndarray | None]:
    """Merge the copies (dedup.py): rewrite the shards that hold demoted rows, write the final manifest from the
    staged one, and delete the staged manifest and the embeddings. Returns counts, rule counts, the card entry, and
    the embeddings of the released protected records (for the release register's near search), in manifest order."""
    import pyarrow.compute as pc

    staged = staging / dedup.STAGED_MANIFEST
    try:
        sha256 = pq.read_table(staged, columns=["canonical_sha256"]).column("canonical_sha256")
        strictness = np.array([dedup.STRICTNESS[a] for a in decisions.rule_actions] or [0], np.int8)
        actions = strictness[np.maximum(decisions.chosen, 0)]
        actions[pc.is_null(sha256).to_numpy(zero_copy_only=False)] = -1
        assert embedding is not None
        plan = dedup.find_plan(staged, store, actions, records.table.column("record_id"), sha256, spec, embedding)
        removed = dedup.removed_rows(staged, plan)
        dedup.rewrite_shards(staging, files, removed)
        counts = dedup.write_final_manifest(staged, staging / layout.MANIFEST, plan, removed)
        rule_counts = dedup.rule_counts(decided, plan, staged)
        released = None
        if store is not None:
            rows = _released_rows(pq.read_table(staging / layout.MANIFEST, columns=["partition", "sha256"]))
            released = np.array(store.vectors[rows, :embedding.searched_dim], np.float32)  # the register's search
            store.close()
            store = None
    finally:
        if store is not None:
            store.close()
        staged.unlink(missing_ok=True)
    return counts, rule_counts, dedup.card_section(spec, embedding, plan, records.table.num_rows), released


@dataclass(frozen=True)
class KeyChoice:
    """The key a prepare uses, the owner's key (its register's root), and the lines that tell the data owner where
    they are (printed by the CLI)."""

    key: NoiseKey
    owner: OwnerKey
    note: str


def _keep_digest_key(key: NoiseKey, folder: Path, card: Card) -> None:
    """The digest subkey of `key` in the owner's folder (keys/owner.py), for the owner's own checks of the directory."""
    assert card.digest_key_id is not None
    path = digest_key_path(card.digest_key_id, folder)
    if not path.is_file():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        export_digest_key(key, path)


def noise_key(loaded: LoadedPolicy, key_file: Path | None, output: Path, *, ephemeral: bool = False) -> KeyChoice:
    """The owner's secret: --noise-key, else the policy's noise.key_file, else the owner's key at its default place
    ($GUARD_KEY_FILE or the configuration folder, created on first use); a throw-away one only if `ephemeral`.
    The owner's key is loaded (created on first use) in every case: it keys the release register."""
    path = key_file
    if path is None and loaded.policy.noise.key_file:
        path = loaded.resolve(loaded.policy.noise.key_file)
    if ephemeral and path is not None:
        raise InputError(f"--ephemeral-key and the key file {path} exclude each other",
                         hint="drop --ephemeral-key to use the key file, or the key file for a throw-away key")
    key = fresh_key() if ephemeral else read_key_file(path, forbidden=(output,)) if path is not None else None
    owner = owner_key(forbidden=(output,))
    lines = []
    if owner.created:
        lines.append(f"created your owner key {owner.path} (mode 0600): this file plus any prepared directory made "
                     "with it rebuilds the protected originals; keep it private and backed up")
    if key is None:
        if not owner.created:
            lines.append(f"noise: keyed by your owner key {owner.path} (key id {owner.key.key_id[:16]})")
        return KeyChoice(owner.key, owner, "\n".join(lines))
    if ephemeral:
        lines.append(f"noise: keyed by a throw-away secret that was never stored (key id {key.key_id[:16]}): no one "
                     "can regenerate this noise")
    else:
        lines.append(f"noise: keyed by {path} (key id {key.key_id[:16]}); keep that file away from this directory")
    return KeyChoice(key, owner, "\n".join(lines))


def _released_rows(table: pa.Table) -> np.ndarray:
    """Rows of the protected records stored in the prepared directory (`table`: the manifest's partition and
    sha256 columns): what this prepare releases."""
    protected = np.array([p == "protected" for p in table.column("partition").to_pylist()], bool)
    return np.flatnonzero(protected & table.column("sha256").is_valid().to_numpy(zero_copy_only=False))


def _released(manifest: Path) -> pa.Table:
    """(record_id, sha256) of the protected records stored in the prepared directory, in manifest order."""
    table = pq.read_table(manifest, columns=["record_id", "partition", "sha256"])
    return table.take(pa.array(_released_rows(table))).select(["record_id", "sha256"])


def _near(spec: DedupPolicy, embedding: dedup.Embedding | None) -> register.Near | None:
    """How the register matches near copies: as this prepare's dedup does (None with dedup off)."""
    if embedding is None:
        return None
    identity = (f"{embedding.kind}:{embedding.size}:{embedding.dim}:{','.join(embedding.transforms)}:"
                f"{dict(embedding.clip_identity)}")
    return register.Near(identity, spec.effective_threshold, embedding.search_variants, embedding.size)


def _rerelease_card(found: register.Rerelease | None, allowed: bool) -> dict[str, Any] | None:
    if found is None:
        return None
    per_image = Counter(f"{value:.3g}" for value in found.sigma_eff)
    return {"allowed": allowed, "images": found.images, "earlier": [event for event, _ in found.earlier],
            "min_sigma_eff": round(found.min_sigma_eff, 6),
            "sigma_eff_images": dict(sorted(per_image.items(), key=lambda item: float(item[0]))), "near": found.near}


def prepare(loaded: LoadedPolicy, *, data_root: Path | None = None, out: Path | None = None, workers: int = 1,
            strict: bool = False, overwrite: bool = False, key_file: Path | None = None, ephemeral_key: bool = False,
            allow_rerelease: bool = False, event_id: str | None = None, progress: ProgressFactory | None = None,
            executor: ExecutorSpec = LOCAL, ledger_head: dict[str, Any] | None = None) -> PrepareResult:
    """Apply `loaded` to its dataset and write the prepared directory atomically.

    The noise is keyed by `key_file` (or the policy's noise.key_file); without one, by the owner's key at its
    default place (created on first use), or with `ephemeral_key` by a fresh secret forgotten when this returns.
    `progress(label, total)` may return a callback that is told how many records were just processed. `executor`
    runs the part work in this machine's pool of `workers` processes or as Ray tasks (ray_parts.py): the output
    is the same, byte for byte.

    The protected images it releases are checked against the owner's release register (register.py) before the
    directory is published, and appended to it after: an image released before with other noise stops the prepare
    (InputError) unless `allow_rerelease`. `event_id` (the ledger event) names this prepare in the register;
    `ledger_head` (ledger.current_head) is the ledger's head when it began, recorded in the card.
    """
    started = time.perf_counter()
    spec = source_spec(loaded, data_root)
    output = output_dir(loaded, out)
    choice = noise_key(loaded, key_file, output, ephemeral=ephemeral_key)
    key = choice.key
    dedup_spec = loaded.policy.dedup
    embedding = dedup.embedding_for(dedup_spec, spec.resolution, loaded.base_dir) if dedup_spec.enabled else None
    reader = open_reader(spec)
    claim = claim_output(output, overwrite=overwrite, dataset_root=spec.root, policy_dir=loaded.base_dir)
    with claim, part_runner(spec, reader, workers, executor) as runner:
        staging = start_output(output, overwrite=overwrite)
        try:
            for partition in ("clean", "protected"):
                (staging / partition).mkdir(mode=0o700)
            records = collect(reader, staging, runner.metadata, progress)
            decisions = decide(records.table, list(loaded.policy.rules), base_dir=loaded.base_dir, source=str(loaded.path),
                               format_name=spec.format)
            listing = reader.listing_report()
            check_listing(listing, records.table, list(loaded.policy.rules), base_dir=loaded.base_dir,
                          source=str(loaded.path), format_name=spec.format)
            noise = NoiseParams(sigma=loaded.policy.noise.sigma, key=key)
            tick = progress("decoding", records.table.num_rows) if progress else None
            staged = staging / (dedup.STAGED_MANIFEST if dedup_spec.enabled else layout.MANIFEST)
            manifest = ManifestWriter(staged, records.table.schema, noise.sigma)
            store = dedup.EmbeddingStore(staging, records.table.num_rows, embedding.dim) if embedding else None
            numbering = {"clean": 0, "protected": 0}
            files: dict[str, str] = {}
            in_flight: deque[PartTask] = deque()  # the tasks whose results are pending, in order

            def jobs() -> Iterator[tuple[PartTask, NoiseParams]]:
                for task in _part_tasks(records, decisions, staging, embedding):
                    in_flight.append(task)
                    yield task, noise

            for result in runner.decode(jobs()):
                task = in_flight.popleft()
                assert task.part.index == result.index
                start, stop = records.rows(result.index)
                bad = [row for row, error in enumerate(result.errors) if error is not None]
                if strict and bad:
                    raise DataError(f"record {task.record_ids[bad[0]]}: {result.errors[bad[0]]}",
                                    hint="--strict makes unreadable records fatal")
                places = _publish_shards(staging, result, numbering, files)
                if store is not None and result.embeddings is not None:
                    store.add(staging, result.embeddings, start)
                manifest.add(task.record_ids, decisions.rules_of(start, stop), task.actions, result, places,
                             metadata_slice(records, result.index))
                if tick:
                    tick(stop - start)
            manifest.close()
            counts, rule_counts, dedup_card = manifest.counts, manifest.rule_counts, {"enabled": False}
            vectors = None
            if dedup_spec.enabled:
                counts, rule_counts, dedup_card, vectors = _deduplicate(staging, records, decisions, store, files,
                                                                        dedup_spec, embedding, rule_counts)
            discard(staging)
            full = staging / LINEAGE_FILE  # the full manifest: the owner's lineage, never published
            (staging / layout.MANIFEST).rename(full)
            disclosure.write_trainer_manifest(full, staging / layout.MANIFEST, digest_key=key.digest_subkey,
                                              opaque_key=key.opaque_subkey, allowed=loaded.policy.manifest.metadata)
            register_file = register.register_path(choice.owner.path)
            with register.locked(register_file):
                near = _near(dedup_spec, embedding)
                new = register.entries(choice.owner.key.register_subkey, _released(full),
                                       key_id=key.key_id, sigma=noise.sigma, resolution=spec.resolution,
                                       event_id=event_id or uuid.uuid4().hex, embedder=near.embedder if near else None,
                                       vectors=vectors)
                found = register.find_rereleases(register.read(register_file), new, near)
                if found is not None and not allow_rerelease:
                    raise register.rerelease_error(found, register_file)
                card = card_from_dict({**_card(loaded, spec, reader, counts, key, rule_counts, files,
                                                sha256_file(staging / layout.MANIFEST), output, dedup_card, listing),
                                       "rerelease": _rerelease_card(found, allow_rerelease),
                                       **({"ledger_head": ledger_head} if ledger_head else {})})
                write_card(staging, card)
                kept = lineage_path(card.fingerprint, choice.owner.path.parent)
                kept.parent.mkdir(mode=0o700, exist_ok=True)
                shutil.move(full, kept)
                kept.chmod(0o600)
                _keep_digest_key(key, choice.owner.path.parent, card)
                finish_output(staging, output)
                register_sha256 = register.append(register_file, new)
        except BaseException:
            abandon_output(staging)
            raise
    return PrepareResult(output, dict(card.counts), dict(card.rule_counts), manifest.errors, card,
                         time.perf_counter() - started, manifest.source.hexdigest(), manifest.error_count, listing,
                         choice.note, register_file, register_sha256, found)
