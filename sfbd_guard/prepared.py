"""Opening a prepared directory for training: the only way the engine gets data.

`open_prepared` refuses anything that is not a complete directory written by `guard prepare`: every
array file is checked against the sha256 recorded in card.json at prepare time, the manifest against
its recorded sha256, and every protected record must carry a sigma > 0. The engine never imports the
dataset readers, so no code path of `guard train` can open a raw dataset or a protected original.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VerificationError
from .fileio import fingerprint, sha256_file

REQUIRED = ("card.json", "manifest.parquet", "clean", "protected")
DTYPES = {"clean": np.dtype(np.uint8), "protected": np.dtype(np.float16)}


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
    return VerificationError(f"{root}: {problem}", hint="guard train reads only directories written by guard prepare; re-run guard prepare")


def _read_card(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise _fail(root, "not a directory")
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise _fail(root, f"not a prepared directory (missing {', '.join(missing)})")
    try:
        card = json.loads((root / "card.json").read_text())
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
    columns = ["record_id", "partition", "sigma", "file", "row"]
    rows = pq.read_table(root / "manifest.parquet", columns=columns).to_pylist()
    clean = [r for r in rows if r["partition"] == "clean"]
    protected = [r for r in rows if r["partition"] == "protected"]
    bad_sigma = [r["record_id"] for r in protected if not r["sigma"] or r["sigma"] <= 0 or r["sigma"] != card["sigma"]]
    if bad_sigma:
        raise _fail(root, f"protected record {bad_sigma[0]} has sigma {next(r['sigma'] for r in protected if r['record_id'] == bad_sigma[0])}, "
                          f"expected the policy's {card['sigma']} > 0")
    if any(r["sigma"] != 0 for r in clean):
        raise _fail(root, "a clean record has a non-zero sigma")
    return PreparedData(root, card, _partition(root, clean, "clean", card), _partition(root, protected, "protected", card), files)
