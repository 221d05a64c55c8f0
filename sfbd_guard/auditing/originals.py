"""The protected originals and the holdout, read from the source dataset: the only place they are opened.

The prepared directory's manifest names the protected records and the sha256 of each one's
transformed pixels. Originals are read through the same reader and transforms as `guard prepare`
and every one is checked against that sha256 before it is used; nothing here writes them anywhere.
The holdout (calibration negatives) is the records the policy held out (`action: holdout`: never stored,
read here where they are, each checked against the owner's lineage), else the dataset's other split(s),
never the prepared split's clean, excluded or error records, minus records the policy's exclude rules
match (opt-outs: never read) and minus exact copies of protected records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.base import dump
from ..datasets import READERS, DatasetReader, SourceSpec, open_reader
from ..errors import ImageDecodeError, InputError, VerificationError
from ..hashing import pixel_sha256, seeded_subset
from ..keys.owner import read_lineage
from ..prepared.card import Card
from ..prepared.layout import MANIFEST, PreparedPaths

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PreparedInfo:
    """What the audit needs from a prepared directory (card.json and manifest.parquet, verified)."""

    root: Path
    card: Card
    protected_ids: list[str]
    protected_sha256: list[str]

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    @property
    def resolution(self) -> int:
        return self.card.resolution

    @property
    def channels(self) -> int:
        return self.card.channels


def _lineage(root: Path, card: Any, columns: list[str]) -> Any:
    """The records' plain pixel sha256 and ids: from the owner's lineage (keys/owner.py) for a directory prepared since
    the trainer's manifest says only what training needs, from the manifest itself for an older one."""
    import pyarrow.parquet as pq


    if "sha256" in pq.read_schema(root / MANIFEST).names:
        return pq.read_table(root / MANIFEST, columns=columns)
    return read_lineage(card.fingerprint, columns, why="the audit (it checks each protected original it reads)")


def read_prepared(root: Path) -> PreparedInfo:
    """The prepared directory's card and the manifest's protected rows; exit 2 unless it is an intact prepared
    directory. The structural checks are `prepared.read_prepared_card`, the same as training's; the audit reads
    no array file, and needs no provenance (it reads the originals, each checked against the manifest)."""

    from ..prepared.reader import read_prepared_card

    root = root.resolve()
    card = read_prepared_card(root)
    if card.format not in READERS:
        raise InputError(f"{PreparedPaths(root).card}: format: {card.format[:40]!r} is not one guard prepare writes",
                         hint="--data must be a directory written by guard prepare")
    table = _lineage(root, card, ["record_id", "partition", "sha256"]).to_pylist()
    protected = [row for row in table if row["partition"] == "protected"]
    if not protected:
        raise InputError(f"--data {root}: the manifest has no protected records, so there is nothing to audit against")
    return PreparedInfo(root, card, [r["record_id"] for r in protected], [r["sha256"] for r in protected])


def source_spec(info: PreparedInfo, data_root: Path | None, split: str | None = None) -> SourceSpec:
    """The source dataset as prepared: the card's format, root (or --data-root), split and resolution."""
    card = info.card
    root = data_root.resolve() if data_root else card.source_root(info.root)  # card.json's root: relative to it, or absolute
    if card.format != "digits" and (root is None or not root.is_dir()):
        raise InputError(f"source dataset root {root} (recorded at prepare time) is not a directory",
                         hint="pass --data-root DIR: the audit reads the protected originals from the source dataset")
    # the policy's reader options (shards, image column, budgets) as prepare used them
    spec: SourceSpec = card_policy(info).dataset.source_spec(root)
    return replace(spec, format=card.format, split=split or card.split, resolution=info.resolution)


def _load_verified(reader: DatasetReader, expected: dict[str, str], what: str) -> dict[str, np.ndarray]:
    """The records `expected` names (record id -> sha256 recorded at prepare time), read together (a streamed
    reader reads each shard or file once) and each checked against its sha256."""
    hint = "the source dataset changed since guard prepare, or --data-root points to another copy"
    loaded: dict[str, np.ndarray] = {}
    for record_id, pixels in reader.load_many(list(expected)):
        if isinstance(pixels, ImageDecodeError):
            raise VerificationError(f"{what} {record_id}: cannot read it from {reader.spec.root}: {pixels}", hint=hint)
        if pixel_sha256(pixels) != expected[record_id]:
            raise VerificationError(f"{what} {record_id} under {reader.spec.root} does not match the sha256 recorded "
                                    "at prepare time", hint=hint)
        loaded[record_id] = pixels
    return loaded


def iter_protected(info: PreparedInfo, data_root: Path | None, *, chunk: int = 1024,
                   progress: Progress | None = None) -> Iterator[np.ndarray]:
    """uint8 (n, C, H, W) chunks of the protected originals in manifest order, each hash-verified."""
    reader = open_reader(source_spec(info, data_root))
    pairs = list(zip(info.protected_ids, info.protected_sha256, strict=True))
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        loaded = _load_verified(reader, dict(part), "protected original")
        yield np.stack([loaded[rid] for rid, _ in part])
        if progress:
            progress(len(part))


def load_protected(info: PreparedInfo, data_root: Path | None, rows: list[int]) -> dict[int, np.ndarray]:
    """Selected protected originals (by manifest row among the protected), hash-verified: for thumbnails."""
    if not rows:
        return {}
    reader = open_reader(source_spec(info, data_root))
    chosen = sorted(set(rows))
    loaded = _load_verified(reader, {info.protected_ids[row]: info.protected_sha256[row] for row in chosen},
                            "protected original")
    return {row: loaded[info.protected_ids[row]] for row in chosen}


@dataclass(frozen=True)
class Holdout:
    """Real images never trained on: where they came from and what was left out."""

    pixels: np.ndarray  # uint8 (m, C, H, W)
    source: str  # "split:valid,test" or "dir:<path>"
    dropped: dict[str, int]  # reason -> count (excluded by policy, copy of a protected record, unreadable, over max)


def holdout_splits(info: PreparedInfo) -> list[str]:
    """The format's splits the policy did not select (none when it selected `all` or has no splits)."""
    chosen = info.card.split
    if chosen == "all":
        return []
    return [s for s in READERS[info.card.format].splits if s not in ("all", chosen)]


def card_policy(info: PreparedInfo) -> Any:
    """The policy recorded in card.json, validated (a damaged card is an input error naming it)."""
    from pydantic import ValidationError

    from ..policy.model import Policy

    try:
        return Policy.model_validate(dump(info.card.policy))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"--data {PreparedPaths(info.root).card}: policy.{where}: {first['msg']}",
                         hint="--data must be a directory written by guard prepare") from None


def _excluded_by_policy(info: PreparedInfo, metadata: Any) -> set[str]:
    """Records the policy's exclude rules match (opt-outs must never be used, not even to calibrate)."""
    from ..policy.model import Rule
    from ..policy.rules import decide

    policy = card_policy(info)
    excludes = [r for r in policy.rules if r.action == "exclude"]
    if not excludes:
        return set()
    base = (info.card.policy_file(info.root) or info.root).parent
    decisions = decide(metadata, [*excludes, Rule(name="(holdout)", action="clean")], base_dir=base,
                       source=f"{info.root}/card.json policy (exclude rules applied to the holdout)",
                       format_name=info.card.format)
    ids = metadata.column("record_id").to_pylist()
    return {rid for rid, action in zip(ids, decisions.actions, strict=True) if action == "exclude"}


def holdout_from_splits(info: PreparedInfo, data_root: Path | None, *, limit: int, seed: int) -> Holdout | None:
    """The other splits' records (after exclude rules), at most `limit`, minus exact protected copies."""
    splits = holdout_splits(info)
    if not splits:
        return None
    candidates: list[tuple[DatasetReader, str]] = []
    excluded = 0
    for split in splits:
        reader = open_reader(source_spec(info, data_root, split))
        metadata = reader.metadata()
        skip = _excluded_by_policy(info, metadata)
        excluded += len(skip)
        candidates += [(reader, str(rid)) for rid in metadata.column("record_id").to_pylist() if rid not in skip]
    chosen = set(seeded_subset([rid for _, rid in candidates], limit, seed))
    pixels, dropped = [], {"excluded_by_policy": excluded, "over_max_holdout": len(candidates) - len(chosen),
                           "unreadable": 0}
    by_reader: dict[int, tuple[DatasetReader, list[str]]] = {}
    for reader, rid in candidates:
        if rid in chosen:
            by_reader.setdefault(id(reader), (reader, []))[1].append(rid)
    for reader, ids in by_reader.values():  # each split's records read together, in candidate order
        loaded = dict(reader.load_many(ids))
        for rid in ids:
            result = loaded[rid]
            if isinstance(result, ImageDecodeError):
                dropped["unreadable"] += 1
            else:
                pixels.append(result)
    return _without_protected(np.stack(pixels) if pixels else None, info, f"split:{','.join(splits)}", dropped)


def _without_protected(pixels: np.ndarray | None, info: PreparedInfo, source: str,
                       dropped: dict[str, int]) -> Holdout | None:
    if pixels is None:
        return None
    protected = set(info.protected_sha256)
    keep = np.asarray([pixel_sha256(p) not in protected for p in pixels], dtype=bool)
    dropped = {**dropped, "copy_of_protected": int((~keep).sum())}
    return Holdout(pixels[keep], source, dropped) if keep.any() else None


def holdout_from_rules(info: PreparedInfo, data_root: Path | None, rules: list[str], *, limit: int,
                       seed: int) -> Holdout | None:
    """Records the policy held out (`action: holdout`) by the named rules: never stored, read where they are.

    They are read like protected originals: same reader and transforms, checked against the manifest's sha256.
    """

    actions = {r.name: r.action for r in card_policy(info).rules}
    known = sorted(name for name, action in actions.items() if action == "holdout")
    for name in rules:
        if actions.get(name) == "exclude":  # configs from before `action: holdout` named exclude rules
            raise InputError(f"calibration.holdout_rules: {name!r} is an exclude rule: excluded records are opt-outs, "
                             "never read again, not even by the audit",
                             hint=f"make {name!r} `action: holdout` in the policy and run guard prepare again (the "
                                  "audit then calibrates on its records by itself: drop calibration.holdout_rules)")
        if actions.get(name) != "holdout":
            raise InputError(f"calibration.holdout_rules: {name!r} is not a holdout rule of the policy",
                             hint=f"holdout rules: {', '.join(known) or 'none'}")
    rows = _lineage(info.root, info.card, ["record_id", "partition", "rule", "sha256"]).to_pylist()
    held = {r["record_id"]: r["sha256"] for r in rows if r["partition"] == "excluded" and r["rule"] in rules}
    chosen = seeded_subset(list(held), limit, seed)
    reader = open_reader(source_spec(info, data_root))
    loaded = _load_verified(reader, {rid: held[rid] for rid in chosen}, "held-out record")
    pixels = [loaded[rid] for rid in chosen]
    dropped = {"over_max_holdout": len(held) - len(chosen)}
    source = f"rules:{','.join(rules)}"
    return _without_protected(np.stack(pixels) if pixels else None, info, source, dropped)


def holdout_from_dir(info: PreparedInfo, folder: Path, *, limit: int, seed: int) -> Holdout | None:
    """A folder of real unseen images (--holdout), brought to the prepared resolution like the samples."""
    from .images import load_folder

    loaded = load_folder(folder, info.resolution, info.channels, what="--holdout")
    names = [n for n, ok in zip(loaded.names, loaded.ok, strict=True) if ok]
    keep = set(seeded_subset(names, limit, seed))
    mask = np.asarray([n in keep for n in names], dtype=bool)
    dropped = {"unreadable": len(loaded.errors), "over_max_holdout": int((~mask).sum())}
    return _without_protected(loaded.pixels[mask], info, f"dir:{folder.resolve()}", dropped)
