"""The owner's release register: every protected image that left the owner's hands, and with which noise.

Two releases of one image with independent noise (another key, sigma, resolution or record id) can be averaged:
k draws at sigma_i leave sigma_eff = (sum sigma_i^-2)^(-1/2). The register lets `guard prepare` see that coming.
It lives with the owner's key (`releases.parquet` in the same folder: $XDG_CONFIG_HOME/sfbd_guard/ by default),
outside every prepared directory, and holds one row per released protected image and prepare:

    digest      HMAC-SHA256(register subkey, pixel sha256): the image, under a key only the owner holds
    key_id      the noise key's id (keys.py)       sigma, resolution, record_id: the rest of what keys the noise
    event_id    the prepare's ledger event          released_at: when

Two rows with one digest and the same (key_id, sigma, resolution, record_id) are one draw (the noise is a function
of them and the pixels, noise.py); any other pair is two draws. The register subkey is derived from the owner's
key at its default place (even when a prepare's noise is keyed by another key file), so one register sees the
releases under every key the owner uses. Matching is exact (same pixels after the policy's resize); near copies
(a re-encoded or cropped image) are not matched here: dedup's embeddings of protected originals are never kept.

Writes are atomic (a new file renamed over the old) under an exclusive lock (`releases.parquet.lock`), so two
prepares running at once both land.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..hashing import keyed_digest, sha256_file

REGISTER_NAME = "releases.parquet"
_FIELDS: list[pa.Field[Any]] = [
    pa.field("digest", pa.string()), pa.field("key_id", pa.string()), pa.field("sigma", pa.float64()),
    pa.field("resolution", pa.int32()), pa.field("record_id", pa.string()), pa.field("event_id", pa.string()),
    pa.field("released_at", pa.timestamp("us", tz="UTC")),
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
            event_id: str) -> pa.Table:
    """The register rows of this prepare's released protected images (`released`: record_id, sha256)."""
    count = released.num_rows
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
    }, schema=SCHEMA)


def sigma_eff(sigmas: np.ndarray) -> float:
    """sigma_eff = (sum sigma_i^-2)^(-1/2) of independent Gaussian draws (their precision-weighted mean's noise)."""
    return float(np.sum(np.asarray(sigmas, np.float64) ** -2.0) ** -0.5)


def find_rereleases(register: pa.Table, new: pa.Table) -> Rerelease | None:
    """The images of `new` already in `register` under another draw, or None."""
    if register.num_rows == 0 or new.num_rows == 0:
        return None
    wanted = pc.is_in(register.column("digest"), value_set=new.column("digest"))
    earlier = register.filter(wanted)
    if earlier.num_rows == 0:
        return None
    ours = new.select(["digest", *DRAW]).rename_columns(["digest", *(f"new_{c}" for c in DRAW)])
    joined = earlier.join(ours, "digest")
    other = pc.or_(pc.or_(pc.not_equal(joined["key_id"], joined["new_key_id"]),
                          pc.not_equal(joined["sigma"], joined["new_sigma"])),
                   pc.or_(pc.not_equal(joined["resolution"], joined["new_resolution"]),
                          pc.not_equal(joined["record_id"], joined["new_record_id"])))
    conflicts = joined.filter(other)
    if conflicts.num_rows == 0:
        return None
    images = pc.unique(conflicts.column("digest"))
    by_event: dict[str, set[str]] = {}
    for event, digest in zip(conflicts.column("event_id").to_pylist(), conflicts.column("digest").to_pylist(),
                             strict=True):
        by_event.setdefault(str(event), set()).add(str(digest))
    # sigma_eff per such image over its distinct draws: the register's, and this release's
    draws = pa.concat_tables([earlier.filter(pc.is_in(earlier.column("digest"), value_set=images)).select(["digest", *DRAW]),
                              new.filter(pc.is_in(new.column("digest"), value_set=images)).select(["digest", *DRAW])])
    distinct = draws.group_by(["digest", *DRAW]).aggregate([])
    grouped = distinct.group_by("digest").aggregate([("sigma", "list")])
    effs = [sigma_eff(np.array(s)) for s in grouped.column("sigma_list").to_pylist()]
    ranked = sorted(((event, len(d)) for event, d in by_event.items()), key=lambda item: (-item[1], item[0]))
    return Rerelease(len(images), ranked, min(effs), effs)


def append(path: Path, rows: pa.Table) -> str:
    """Append `rows` to the register atomically (call under `locked`); returns the new file's sha256."""
    table = pa.concat_tables([read(path), rows])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(path)


def rerelease_error(found: Rerelease, register: Path) -> InputError:
    """The refusal of a prepare that would release images again with other noise (exit 2)."""
    first, count = found.earlier[0]
    others = f" and {len(found.earlier) - 1} other prepare(s)" if len(found.earlier) > 1 else ""
    return InputError(
        f"{found.images} protected image(s) were already released with other noise (another key, sigma, resolution or "
        f"record id) by prepare {first[:12]} ({count} image(s)){others}, in {register}: releasing them again lets their "
        f"noisy copies be averaged down to sigma_eff {found.min_sigma_eff:.3g}",
        hint="prepare them with the key, sigma and record ids of that release, or pass --allow-rerelease (recorded in "
             "the card and the ledger)")
