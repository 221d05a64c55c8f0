"""Opening a prepared directory for training: the only way the engine gets data.

`open_prepared` refuses anything that is not a complete directory written by `guard prepare`: every
array file is checked against the sha256 recorded in card.json at prepare time, the manifest against
its recorded sha256, the card's counts against the manifest, and every protected record must carry the
policy's sigma > 0. The engine never imports the dataset readers, so no code path of `guard train` can open
a raw dataset or a protected original.

Re-hashing defeats those checks (a forger can replace the arrays and recompute every sha256 in the card),
so `guard train` and `guard verify` also establish where the directory came from (`establish_provenance`):
the ledger's `prepare` event that wrote exactly this fingerprint, or a valid Ed25519 signature of card.json
by the data owner (`keys/signing.py`); and they test the protected pixels themselves (`prepared/noise_check.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.events import Event, read_events
from ..errors import InputError, VerificationError
from ..hashing import fingerprint, sha256_file
from .card import Card, read_card
from .layout import MANIFEST, REQUIRED, SHARD_FOLDERS
from .mapped import MappedRows
from .noise_check import NoiseStats

DTYPES: dict[str, np.dtype[Any]] = {"clean": np.dtype(np.uint8), "protected": np.dtype(np.float16)}


@dataclass(frozen=True)
class Partition:
    """The rows of one partition, in manifest order: record ids, their pixels (N, C, H, W) memory-mapped from the
    directory's shards (gathered a batch at a time, never all loaded), and their sigmas."""

    record_ids: list[str]
    pixels: MappedRows  # clean: uint8; protected: float16 x/127.5 - 1 + sigma*eps
    sigmas: np.ndarray  # per row: 0 for clean, the noise sigma for protected

    def __len__(self) -> int:
        return len(self.record_ids)


@dataclass(frozen=True)
class PreparedData:
    root: Path
    card: Card
    clean: Partition
    protected: Partition
    files: dict[str, str]  # relative path → sha256, verified

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.card.image_shape


HINT = "guard train, guard audit and guard verify read only directories written by guard prepare; re-run guard prepare"


def _fail(root: Path, problem: str) -> VerificationError:
    """A directory that fails a check against what prepare recorded (exit 1)."""
    return VerificationError(f"{root}: {problem}", hint=HINT)


def _not_prepared(root: Path, problem: str) -> InputError:
    """A path that is no prepared directory at all, or a file of it that cannot be read (a card.json that is not a
    card, a FIFO): bad input, exit 2. A file that reads but differs from the record is a failed check (`_fail`)."""
    return InputError(f"{root}: {problem}", hint=HINT)


def read_prepared_card(root: Path) -> Card:
    """The structural checks of a prepared directory, the same for every reader (training, audit, verify):
    a directory holding the prepared entries, a card.json that is a `Card` naming only shards of this
    directory, and a manifest.parquet matching the sha256 and the fingerprint recorded in the card.
    Array files are not read here (`open_prepared` verifies them). A path that is not a prepared directory, or a file
    of it that cannot be read, is an InputError (bad input); a file that differs from the record is a
    VerificationError (a failed check)."""
    if not root.is_dir():
        raise _not_prepared(root, "not a directory")
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise _not_prepared(root, f"not a prepared directory (missing {', '.join(missing)})")
    card = read_card(root, error=InputError, hint=HINT)
    for name in card.files:  # a card names only the directory's own shards: nothing outside is ever read
        if not re.fullmatch(r"(clean|protected)/[A-Za-z0-9_.-]+\.npy", name) or ".." in name or (root / name).is_symlink():
            raise _fail(root, f"card.json names {name!r}, not a shard of this directory")
    try:
        manifest_sha256 = sha256_file(root / MANIFEST)
    except OSError as err:
        raise _not_prepared(root, f"manifest.parquet: cannot read it ({err.strerror or err})") from None
    if manifest_sha256 != card.manifest_sha256:
        raise _fail(root, "manifest.parquet does not match the sha256 recorded at prepare time")
    if fingerprint({**card.files, MANIFEST: card.manifest_sha256}) != card.fingerprint:
        raise _fail(root, "card.json fingerprint does not match its files")
    return card


def _check_keyed_noise(root: Path, card: Card) -> None:
    """Refuse directories made before the noise was keyed by a secret: their noise can be regenerated."""
    if card.invertible_noise:
        raise VerificationError(
            f"{root}: its noise is invertible (an earlier guard prepare seeded it from public values: anyone holding "
            "this directory can rebuild its protected originals); delete it and its copies, and re-run guard prepare")


def _verify_files(root: Path, card: Card) -> dict[str, str]:
    recorded = dict(card.files)
    present = {p.relative_to(root).as_posix() for part in SHARD_FOLDERS for p in (root / part).rglob("*") if p.is_file()}
    unexpected = sorted(present - set(recorded))
    if unexpected:
        raise _fail(root, f"{unexpected[0]} is not recorded in card.json")
    for name, digest in sorted(recorded.items()):
        if not (root / name).is_file():
            raise _fail(root, f"{name} is missing")
        try:
            matches = sha256_file(root / name) == digest
        except OSError as err:  # e.g. swapped for a FIFO after the check above
            raise _not_prepared(root, f"{name}: cannot read it ({err.strerror or err})") from None
        if not matches:
            raise _fail(root, f"{name} does not match the sha256 recorded at prepare time")
    return recorded


class _Manifest:
    """The manifest's columns that training needs, as Arrow/numpy columns (never one Python object per row)."""

    def __init__(self, root: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = ["record_id", "partition", "rule", "sigma", "file", "row"]
        try:
            table = pq.read_table(root / MANIFEST, columns=columns, use_threads=False)  # fewer buffers
            types = {"record_id": pa.string(), "partition": pa.string(), "rule": pa.string(), "sigma": pa.float64(),
                     "file": pa.string(), "row": pa.int64()}
            self.table = pa.table({name: table.column(name).cast(kind) for name, kind in types.items()})
        except (pa.ArrowException, KeyError, ValueError) as err:
            raise _fail(root, f"manifest.parquet: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None

    def counts(self, column: str) -> dict[str | None, int]:
        """{value: rows} of a string column (nulls counted under None)."""
        codes, names = _encode(self.table.column(column))
        found = np.bincount(codes + 1, minlength=len(names) + 1)  # code -1 (null) counts at 0
        counts: dict[str | None, int] = {name: int(n) for name, n in zip(names, found[1:], strict=True) if n}
        if found[0]:
            counts[None] = int(found[0])
        return counts

    def of(self, partition: str) -> Any:
        """The rows of one partition, in manifest order."""
        codes, names = _encode(self.table.column("partition"))
        return self.table.filter(codes == names.index(partition) if partition in names else np.zeros(len(codes), bool))


def _encode(column: Any) -> tuple[np.ndarray, list[str]]:
    """A string column as integer codes (-1 for null) into its distinct values: no Python object per row."""
    import pyarrow.compute as pc

    if not len(column):
        return np.zeros(0, np.int64), []
    encoded: Any = pc.dictionary_encode(column).combine_chunks()
    codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return codes, list(encoded.dictionary.to_pylist())


def _check_counts(root: Path, card: Card, manifest: _Manifest) -> None:
    """The card's counts, rule counts and sigma must be those of the manifest (bound by its sha256)."""
    counts: dict[str | None, int] = {p: 0 for p in card.counts}
    counts.update(manifest.counts("partition"))
    if counts != card.counts:
        raise _fail(root, f"card.json counts {card.counts} do not match the manifest's {counts}")
    rules = {name: n for name, n in manifest.counts("rule").items() if name is not None}
    recorded = card.rule_counts
    errors = counts.get("error", 0)
    over = sorted(name for name, n in rules.items() if n > recorded.get(name, 0))
    # the manifest's own counts (records each rule decided that were read), or, in cards written before they
    # were, those plus the error rows (which the rules had also decided)
    if recorded != rules and (over or sum(recorded.values()) != sum(rules.values()) + errors):
        name = over[0] if over else "(total)"
        raise _fail(root, f"card.json rule_counts {recorded} do not match the manifest (rule {name}: "
                          f"{rules.get(name, sum(rules.values()))} record(s), {errors} error row(s))")
    if card.policy.noise.sigma != card.sigma:
        raise _fail(root, f"card.json sigma {card.sigma} is not its policy's noise.sigma {card.policy.noise.sigma}")


def _sigmas(table: Any) -> np.ndarray:
    """The sigma column as float64, a null as NaN (which no check accepts)."""
    return np.asarray(table.column("sigma").to_numpy(zero_copy_only=False), dtype=np.float64)


def _check_sigmas(root: Path, card: Card, clean: Any, protected: Any) -> None:
    sigmas = _sigmas(protected)
    bad = np.flatnonzero(~(sigmas > 0) | (sigmas != card.sigma))
    if len(bad):
        i = int(bad[0])
        found = None if np.isnan(sigmas[i]) else float(sigmas[i])
        raise _fail(root, f"protected record {protected.column('record_id')[i].as_py()} has sigma {found}, "
                          f"expected the policy's {card.sigma} > 0")
    if np.any(_sigmas(clean) != 0):
        raise _fail(root, "a clean record has a non-zero sigma")


def _partition(root: Path, table: Any, name: str, card: Card) -> Partition:
    """The partition's rows memory-mapped from its shards, through the manifest's file and row columns."""

    shape, dtype = card.image_shape, DTYPES[name]
    record_ids = table.column("record_id").to_pylist()
    codes, names = _encode(table.column("file"))
    valid = np.array([f.startswith(f"{name}/") and f in card.files for f in names] + [False], dtype=bool)
    bad = np.flatnonzero(~valid[codes])  # code -1 (a null file) picks the trailing False
    if len(bad):
        i = int(bad[0])
        raise _fail(root, f"record {record_ids[i]} points to {names[codes[i]] if codes[i] >= 0 else None!r}, "
                          f"not a recorded {name} file")
    rows_column = table.column("row")
    if rows_column.null_count:
        i = int(np.flatnonzero(np.asarray(rows_column.is_null().to_numpy(zero_copy_only=False)))[0])
        raise _fail(root, f"record {record_ids[i]} has no row in {names[codes[i]]}")
    rows = np.asarray(rows_column.to_numpy(zero_copy_only=False), dtype=np.int64)
    arrays = []
    for file in names:
        array = np.load(root / file, mmap_mode="r", allow_pickle=False)
        if array.dtype != dtype or array.shape[1:] != shape:
            raise _fail(root, f"{file} holds {array.dtype} {array.shape[1:]}, expected {dtype} {shape}")
        arrays.append(array)
    sizes = np.array([len(a) for a in arrays] + [0], dtype=np.int64)
    outside = np.flatnonzero((rows < 0) | (rows >= sizes[codes]))
    if len(outside):
        i = int(outside[0])
        raise _fail(root, f"record {record_ids[i]} points to row {rows[i]} of {names[codes[i]]}, "
                          f"which holds {sizes[codes[i]]} rows")
    return Partition(record_ids, MappedRows(arrays, codes, rows, shape, dtype), _sigmas(table))


def open_prepared(root: Path) -> PreparedData:
    """Verify a prepared directory against its card and return its clean and protected partitions (memory-mapped)."""
    root = root.resolve()
    card = read_prepared_card(root)
    _check_keyed_noise(root, card)
    files = _verify_files(root, card)
    manifest = _Manifest(root)
    _check_counts(root, card, manifest)
    clean, protected = manifest.of("clean"), manifest.of("protected")
    _check_sigmas(root, card, clean, protected)
    return PreparedData(root, card, _partition(root, clean, "clean", card), _partition(root, protected, "protected", card),
                        files)


def check_noise_statistics(data: PreparedData) -> NoiseStats:
    """The protected pixels tested for noise at the card's sigma (see prepared/noise_check.py)."""
    from .noise_check import CHUNK, check_protected

    return check_protected(data.protected.pixels.blocks(CHUNK), data.card.sigma, data.protected.record_ids)


def require_noisy(data: PreparedData) -> NoiseStats:
    """`check_noise_statistics`, raising VerificationError when the protected arrays are not noisy copies."""
    stats = check_noise_statistics(data)
    if not stats.passed:
        raise VerificationError(f"{data.root}: {stats.detail(data.card.sigma)}",
                                hint="the protected arrays must be the noisy copies guard prepare wrote; re-run guard prepare")
    return stats


@dataclass(frozen=True)
class Provenance:
    """Where a prepared directory comes from: the ledger event that wrote it, and/or the owner's signature."""

    event_id: str | None  # the `prepare` event (status ok) whose output has this fingerprint
    signer: str | None  # sha256 of the public key whose signature of card.json verified
    ledger: Path

    @property
    def established(self) -> bool:
        return self.event_id is not None or self.signer is not None


def is_prepare_event_of(event: Event, card: Card) -> bool:
    """Whether `event` is an ok `prepare` event that wrote a directory with this card's fingerprint, array files,
    policy, sigma and counts."""
    from ..contracts.events import PrepareSummary

    summary = event.summary
    if event.kind != "prepare" or event.status != "ok" or not isinstance(summary, PrepareSummary):
        return False
    prepared = [a for a in event.artifacts("outputs", "prepared") if a.sha256 == card.fingerprint]
    if not prepared:
        return False
    base = prepared[0].path.rstrip("/") + "/"
    arrays = {a.path[len(base):] if a.path.startswith(base) else a.path: a.sha256 for a in event.artifacts("outputs", "array")}
    policy = [a.sha256 for a in event.artifacts("inputs", "policy")]
    return (arrays == card.files and policy == [card.policy_sha256] and summary.sigma == card.sigma
            and summary.counts == card.counts and summary.rule_counts == card.rule_counts)


def find_prepare_event(ledger: Path, card: Card) -> str | None:
    """The id of an ok `prepare` event of `ledger` that wrote a directory with this card (`is_prepare_event_of`);
    None if there is none. Ledger files that are not valid events are skipped: they are not evidence."""
    for event in read_events(ledger, "prepare", skip_invalid=True):
        if is_prepare_event_of(event, card):
            return event.event_id
    return None


def establish_provenance(data: PreparedData, ledger: Path, verify_key: Path | None) -> Provenance:
    """Look up the prepare event in `ledger`; with `verify_key`, also check card.sig (raises if it fails)."""
    from ..keys.signing import verify_card

    signer = verify_card(data.root, verify_key) if verify_key is not None else None
    return Provenance(find_prepare_event(ledger, data.card), signer, ledger)


def require_provenance(data: PreparedData, ledger: Path, verify_key: Path | None, *, allow_unrecorded: bool) -> Provenance:
    """`establish_provenance`, refusing a directory with neither a prepare event nor a valid signature
    unless `allow_unrecorded`."""
    provenance = establish_provenance(data, ledger, verify_key)
    if not provenance.established and not allow_unrecorded:
        raise VerificationError(
            f"{data.root}: no prepare event in the ledger {ledger} wrote this directory (fingerprint "
            f"{data.fingerprint[:16]}…) and no owner signature was checked; refused without --allow-unrecorded",
            hint="prepare it with guard prepare into this ledger, check the owner's signature with --verify-key OWNER.pub, "
                 "or pass --allow-unrecorded (recorded in the ledger; guard verify then fails the provenance check)")
    return provenance
