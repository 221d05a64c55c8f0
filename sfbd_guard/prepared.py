"""Opening a prepared directory for training: the only way the engine gets data.

`open_prepared` refuses anything that is not a complete directory written by `guard prepare`: every
array file is checked against the sha256 recorded in card.json at prepare time, the manifest against
its recorded sha256, the card's counts against the manifest, and every protected record must carry the
policy's sigma > 0. The engine never imports the dataset readers, so no code path of `guard train` can open
a raw dataset or a protected original.

Re-hashing defeats those checks (a forger can replace the arrays and recompute every sha256 in the card),
so `guard train` and `guard verify` also establish where the directory came from (`establish_provenance`):
the ledger's `prepare` event that wrote exactly this fingerprint, or a valid Ed25519 signature of card.json
by the data owner (`signing.py`); and they test the protected pixels themselves (`noise_check.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VerificationError
from .fileio import fingerprint, sha256_file
from .noise_check import NoiseStats

REQUIRED = ("card.json", "manifest.parquet", "clean", "protected")
DTYPES: dict[str, np.dtype[Any]] = {"clean": np.dtype(np.uint8), "protected": np.dtype(np.float16)}


@dataclass(frozen=True)
class Partition:
    """The rows of one partition, in manifest order: record ids and their pixels (N, C, H, W)."""

    record_ids: list[str]
    pixels: np.ndarray  # clean: uint8; protected: float16 x/127.5 - 1 + sigma*eps
    sigmas: np.ndarray  # per row: 0 for clean, the noise sigma for protected


@dataclass(frozen=True)
class PreparedData:
    root: Path
    card: dict[str, Any]
    clean: Partition
    protected: Partition
    files: dict[str, str]  # relative path → sha256, verified

    @property
    def fingerprint(self) -> str:
        return str(self.card["fingerprint"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return int(self.card["channels"]), int(self.card["resolution"]), int(self.card["resolution"])


def _fail(root: Path, problem: str) -> VerificationError:
    return VerificationError(f"{root}: {problem}",
                             hint="guard train reads only directories written by guard prepare; re-run guard prepare")


def _read_card(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise _fail(root, "not a directory")
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise _fail(root, f"not a prepared directory (missing {', '.join(missing)})")
    try:
        card: dict[str, Any] = json.loads((root / "card.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(root, f"card.json is unreadable ({err})") from None
    for key in ("files", "manifest_sha256", "sigma", "channels", "resolution", "fingerprint"):
        if key not in card:
            raise _fail(root, f"card.json has no {key!r}")
    return card


def _check_keyed_noise(root: Path, card: dict[str, Any]) -> None:
    """Refuse directories made before the noise was keyed by a secret: their noise can be regenerated."""
    if "noise_seed" in card or "noise_key_id" not in card:
        raise VerificationError(
            f"{root}: its noise is invertible (an earlier guard prepare seeded it from public values: anyone holding "
            "this directory can rebuild its protected originals); delete it and its copies, and re-run guard prepare")


def _verify_files(root: Path, card: dict[str, Any]) -> dict[str, str]:
    recorded: dict[str, str] = card["files"]
    for name in recorded:  # a card names only the directory's own shards: nothing outside is ever read
        if not re.fullmatch(r"(clean|protected)/[A-Za-z0-9_.-]+\.npy", name) or ".." in name or (root / name).is_symlink():
            raise _fail(root, f"card.json names {name!r}, not a shard of this directory")
    present = {p.relative_to(root).as_posix() for part in ("clean", "protected") for p in (root / part).rglob("*") if p.is_file()}
    unexpected = sorted(present - set(recorded))
    if unexpected:
        raise _fail(root, f"{unexpected[0]} is not recorded in card.json")
    for name, digest in sorted(recorded.items()):
        if not (root / name).is_file():
            raise _fail(root, f"{name} is missing")
        if sha256_file(root / name) != digest:
            raise _fail(root, f"{name} does not match the sha256 recorded at prepare time")
    if sha256_file(root / "manifest.parquet") != card["manifest_sha256"]:
        raise _fail(root, "manifest.parquet does not match the sha256 recorded at prepare time")
    if fingerprint({**recorded, "manifest.parquet": card["manifest_sha256"]}) != card["fingerprint"]:
        raise _fail(root, "card.json fingerprint does not match its files")
    return recorded


def _check_counts(root: Path, card: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The card's counts, rule counts and sigma must be those of the manifest (bound by its sha256)."""
    counts = {p: 0 for p in card["counts"]}
    for row in rows:
        counts[row["partition"]] = counts.get(row["partition"], 0) + 1
    if counts != card["counts"]:
        raise _fail(root, f"card.json counts {card['counts']} do not match the manifest's {counts}")
    rules: dict[str, int] = {}
    for row in rows:
        if row["rule"] is not None:
            rules[row["rule"]] = rules.get(row["rule"], 0) + 1
    recorded = card.get("rule_counts") or {}
    errors = counts.get("error", 0)
    over = sorted(name for name, n in rules.items() if n > recorded.get(name, 0))
    if over or sum(recorded.values()) != sum(rules.values()) + errors:
        name = over[0] if over else "(total)"
        raise _fail(root, f"card.json rule_counts {recorded} do not match the manifest (rule {name}: "
                          f"{rules.get(name, sum(rules.values()))} record(s), {errors} error row(s))")
    policy_sigma = ((card.get("policy") or {}).get("noise") or {}).get("sigma")
    if policy_sigma != card["sigma"]:
        raise _fail(root, f"card.json sigma {card['sigma']} is not its policy's noise.sigma {policy_sigma}")


def _partition(root: Path, rows: list[dict[str, Any]], name: str, card: dict[str, Any]) -> Partition:
    shape = (int(card["channels"]), int(card["resolution"]), int(card["resolution"]))
    arrays: dict[str, np.ndarray] = {}
    pixels, sigmas = [], []
    for row in rows:
        file = row["file"]
        if not file or not file.startswith(f"{name}/") or file not in card["files"]:
            raise _fail(root, f"record {row['record_id']} points to {file!r}, not a recorded {name} file")
        if file not in arrays:
            arrays[file] = np.load(root / file, mmap_mode="r", allow_pickle=False)
            if arrays[file].dtype != DTYPES[name] or arrays[file].shape[1:] != shape:
                raise _fail(root, f"{file} holds {arrays[file].dtype} {arrays[file].shape[1:]}, expected {DTYPES[name]} {shape}")
        pixels.append(arrays[file][row["row"]])
        sigmas.append(row["sigma"])
    stacked = np.stack(pixels) if pixels else np.zeros((0, *shape), DTYPES[name])
    return Partition([r["record_id"] for r in rows], stacked, np.asarray(sigmas, dtype=np.float64))


def open_prepared(root: Path) -> PreparedData:
    """Verify a prepared directory against its card and return its clean and protected partitions."""
    import pyarrow.parquet as pq

    root = root.resolve()
    card = _read_card(root)
    _check_keyed_noise(root, card)
    files = _verify_files(root, card)
    columns = ["record_id", "partition", "rule", "sigma", "file", "row"]
    rows = pq.read_table(root / "manifest.parquet", columns=columns).to_pylist()
    _check_counts(root, card, rows)
    clean = [r for r in rows if r["partition"] == "clean"]
    protected = [r for r in rows if r["partition"] == "protected"]
    bad_sigma = [r["record_id"] for r in protected if not r["sigma"] or r["sigma"] <= 0 or r["sigma"] != card["sigma"]]
    if bad_sigma:
        sigma = next(r["sigma"] for r in protected if r["record_id"] == bad_sigma[0])
        raise _fail(root, f"protected record {bad_sigma[0]} has sigma {sigma}, expected the policy's {card['sigma']} > 0")
    if any(r["sigma"] != 0 for r in clean):
        raise _fail(root, "a clean record has a non-zero sigma")
    return PreparedData(root, card, _partition(root, clean, "clean", card), _partition(root, protected, "protected", card), files)


def check_noise_statistics(data: PreparedData) -> NoiseStats:
    """The protected pixels tested for noise at the card's sigma (see noise_check.py)."""
    from .noise_check import check_protected

    return check_protected(data.protected.pixels, float(data.card["sigma"]), data.protected.record_ids)


def require_noisy(data: PreparedData) -> NoiseStats:
    """`check_noise_statistics`, raising VerificationError when the protected arrays are not noisy copies."""
    stats = check_noise_statistics(data)
    if not stats.passed:
        raise VerificationError(f"{data.root}: {stats.detail(float(data.card['sigma']))}",
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


def _artifacts(value: Any) -> list[dict[str, Any]]:
    return [dict(a) for a in (value or [])]


def find_prepare_event(ledger: Path, card: dict[str, Any]) -> str | None:
    """The id of an ok `prepare` event of `ledger` that wrote a directory with this card's fingerprint,
    array files, policy, sigma and counts; None if there is none."""
    import pyarrow.parquet as pq

    for path in sorted((ledger / "prepare").glob("*.parquet")):
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError):
            continue  # an unreadable file is not evidence of anything
        for row in rows:
            if row.get("kind") != "prepare" or row.get("status") != "ok":
                continue
            outputs = _artifacts(row.get("outputs"))
            prepared = [a for a in outputs if a["role"] == "prepared" and a["sha256"] == card["fingerprint"]]
            if not prepared:
                continue
            base = prepared[0]["path"].rstrip("/") + "/"
            arrays = {a["path"][len(base):] if a["path"].startswith(base) else a["path"]: a["sha256"]
                      for a in outputs if a["role"] == "array"}
            policy = [a["sha256"] for a in _artifacts(row.get("inputs")) if a["role"] == "policy"]
            try:
                summary = json.loads(row.get("summary") or "{}")
            except json.JSONDecodeError:
                continue
            if (arrays == card["files"] and policy == [card.get("policy_sha256")] and summary.get("sigma") == card["sigma"]
                    and summary.get("counts") == card["counts"] and summary.get("rule_counts") == card.get("rule_counts")):
                return str(row["event_id"])
    return None


def establish_provenance(data: PreparedData, ledger: Path, verify_key: Path | None) -> Provenance:
    """Look up the prepare event in `ledger`; with `verify_key`, also check card.sig (raises if it fails)."""
    from .signing import verify_card

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
