"""Attacks on the protected partition's noise: nothing the trainer side holds regenerates eps.

The attack that worked before keyed noise: eps was PCG64(sha256(f"{noise.seed}:{record_id}")), the
seed was in the card and the manifest, so x = round((y - sigma*eps + 1) * 127.5) rebuilt every
protected original byte for byte (its sha256 is in the manifest, so the attacker knows when it worked).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import digits_policy, key_file, lineage, tiny_pipeline, write_policy
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.keys.secret import read_key_file

SIGMA = 0.6


def _old_seed(seed: int, record_id: str) -> int:
    """The seeding of guard prepare before keyed noise (what the attacker knows from the old code)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little")


def _public_guesses(card: dict[str, Any], row: dict[str, Any]) -> Iterator[np.ndarray]:
    """Every eps an attacker can build from public values: old seeds 0..15, and generators seeded or keyed
    with the card's key id, fingerprint, policy hash and the manifest's values."""
    rid = row["record_id"]
    shape = (int(card["channels"]), int(card["resolution"]), int(card["resolution"]))
    for seed in range(16):
        yield np.random.Generator(np.random.PCG64(_old_seed(seed, rid))).standard_normal(shape, dtype=np.float32)
    for public in (card.get("noise_key_id", ""), card["fingerprint"], card["policy_sha256"], row["digest"]):
        digest = hashlib.sha256(f"{public}:{rid}".encode()).digest()
        yield np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little"))).standard_normal(shape, dtype=np.float32)
        yield np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little"))).standard_normal(shape, dtype=np.float32)
        from sfbd_guard.curation.noise import keyed_normals, record_key

        for secret in (bytes.fromhex(public) if len(public) == 64 else digest, digest):
            for pixels in (row["digest"], "00" * 32):
                key = record_key(secret, rid, sigma=float(card["sigma"]), shape=shape, pixel_sha256=pixels)
                yield keyed_normals(key, int(np.prod(shape))).reshape(shape)


def _invert(noisy: np.ndarray, eps: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(np.rint((noisy.astype(np.float32) - np.float32(sigma) * eps.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def _attack(prepared: Path, arrays: dict[str, np.ndarray] | None = None) -> tuple[int, int]:
    """(records rebuilt byte-exact, protected records) from the prepared directory alone. Success is judged against
    the plain sha256 of the owner's lineage (the test's oracle: the manifest now holds keyed digests only)."""
    card = json.loads((prepared / "card.json").read_text())
    rows = [r for r in pq.read_table(prepared / "manifest.parquet").to_pylist() if r["partition"] == "protected"]
    truth = dict(zip(*lineage(prepared).select(["record_id", "sha256"]).to_pydict().values(), strict=True))
    recovered = 0
    for row in rows:
        noisy = (arrays or {}).get(row["record_id"])
        if noisy is None:
            noisy = np.load(prepared / row["file"], mmap_mode="r")[row["row"]]
        for eps in _public_guesses(card, row):
            if hashlib.sha256(_invert(noisy, eps, card["sigma"]).tobytes()).hexdigest() == truth[row["record_id"]]:
                recovered += 1
                break
    return recovered, len(rows)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sfbd_guard.curation.prepare import prepare
    from sfbd_guard.policy.model import load_policy

    tmp = tmp_path_factory.mktemp("inversion")
    policy = digits_policy(tmp / "prepared", drop=0.7)  # ~480 protected digits: enough, and fast
    return prepare(load_policy(write_policy(tmp / "policy.yaml", policy))).output


def test_the_attack_rebuilds_every_digit_under_the_old_seeding(prepared: Path) -> None:
    """Positive control: the same attack code, against noise drawn the old way, recovers everything."""
    reader = open_reader(SourceSpec("digits", None, "all", 8))
    rows = [r for r in pq.read_table(prepared / "manifest.parquet").to_pylist() if r["partition"] == "protected"]
    old = {}
    for row in rows:
        eps = np.random.Generator(np.random.PCG64(_old_seed(0, row["record_id"]))).standard_normal((1, 8, 8), dtype=np.float32)
        x = reader.load(row["record_id"]).astype(np.float32) / np.float32(127.5) - np.float32(1)
        old[row["record_id"]] = (x + np.float32(SIGMA) * eps).astype(np.float16)
    recovered, total = _attack(prepared, old)
    assert total > 300 and recovered == total


def test_the_attack_rebuilds_nothing_from_a_prepared_directory(prepared: Path) -> None:
    recovered, total = _attack(prepared)
    assert total > 300 and recovered == 0
    card = json.loads((prepared / "card.json").read_text())
    assert "noise_seed" not in card and "seed" not in card["policy"]["noise"]
    assert "noise_seed" not in pq.read_schema(prepared / "manifest.parquet").names


def test_the_noise_is_still_gaussian_independent_and_at_sigma(prepared: Path) -> None:
    reader = open_reader(SourceSpec("digits", None, "all", 8))
    rows = [r for r in pq.read_table(prepared / "manifest.parquet").to_pylist() if r["partition"] == "protected"]
    arrays = {f: np.load(prepared / f) for f in {r["file"] for r in rows}}
    x = np.stack([reader.load(r["record_id"]) for r in rows]).astype(np.float64) / 127.5 - 1
    y = np.stack([arrays[r["file"]][r["row"]] for r in rows]).astype(np.float64)
    eps = ((y - x) / SIGMA).reshape(len(rows), -1)
    n = eps.size  # ~31k draws of a fresh secret each run: tolerances of 5 standard errors
    assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.std() - 1) < 5 / np.sqrt(2 * n)
    assert abs(np.mean(eps ** 4) - 3) < 0.15, "Gaussian tails (kurtosis 3)"
    assert abs(np.corrcoef(eps.ravel(), x.reshape(len(rows), -1).ravel())[0, 1]) < 0.03, "noise independent of the image"
    between = np.corrcoef(eps[:200])  # 200 records' noise vectors: no two records share noise
    assert np.abs(between[np.triu_indices(200, 1)]).max() < 0.7  # shared noise would give 1; chance of 0.7: ~1e-10 a pair


def _guard(cli: Callable[..., Any], *args: object) -> Any:
    result = cli(*args)
    assert result.code == 0, result.err
    return result


@pytest.fixture
def watch_opens() -> Iterator[list[str]]:
    """Every path opened in this process while the fixture is active (an audit hook cannot be removed:
    it checks a flag)."""
    opened: list[str] = []
    state = {"on": True}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    yield opened
    state["on"] = False


def test_only_prepare_reads_the_key_and_no_output_holds_it(tmp_path: Path, cli: Callable[..., Any],
                                                            watch_opens: list[str]) -> None:
    """prepare → train → sample → audit → report → verify with a key file: only prepare opens the key,
    and neither the secret nor its hex form appears in any file written by the chain."""
    key = key_file(tmp_path / "owner")
    secret = read_key_file(key).secret
    write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.8))
    _guard(cli, "prepare", "--policy", tmp_path / "policy.yaml", "--noise-key", key)
    assert any(Path(p).resolve() == key.resolve() for p in watch_opens), "positive control: prepare reads the key"
    watch_opens.clear()
    write_policy(tmp_path / "pipe.yaml", tiny_pipeline(tmp_path / "prepared", tmp_path / "run"))
    _guard(cli, "train", "--pipeline", tmp_path / "pipe.yaml")
    _guard(cli, "sample", "--run", tmp_path / "run", "--n", "4", "--steps", "2", "--out", tmp_path / "samples")
    audit = cli("audit", "--samples", tmp_path / "samples", "--data", tmp_path / "prepared", "--report", tmp_path / "audit")
    assert audit.code in (0, 3), audit.err
    _guard(cli, "report", "--html", tmp_path / "report.html")
    cli("verify", "--run", tmp_path / "run")  # its verdict is another test's business; it must not read the key
    touched = [p for p in watch_opens if Path(p).name == key.name or "owner" in Path(p).parts]
    assert touched == [], f"the key was opened after prepare: {touched}"
    for folder in (tmp_path / "prepared", tmp_path / "prepared" / "protected", tmp_path / "prepared" / "clean"):
        assert folder.stat().st_mode & 0o077 == 0, f"{folder} is readable by others"
    card = json.loads((tmp_path / "prepared" / "card.json").read_text())
    assert card["noise_key_source"] == "key_file" and card["noise_key_id"] == read_key_file(key).key_id
    needles = (secret, secret.hex().encode(), secret.hex().upper().encode())
    for path in tmp_path.rglob("*"):
        if path.is_file() and key not in (path,):
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), f"{path} holds the secret"


def test_keygen_makes_an_owner_only_key_and_never_overwrites(tmp_path: Path, cli: Callable[..., Any]) -> None:
    path = tmp_path / "k.key"
    _guard(cli, "keygen", path)
    assert (path.stat().st_mode & 0o777) == 0o600
    first = path.read_bytes()
    again = cli("keygen", path)
    assert again.code == 2 and "already exists" in again.err and path.read_bytes() == first


def test_a_key_others_can_read_or_inside_the_output_is_refused(tmp_path: Path, cli: Callable[..., Any]) -> None:
    write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.9))
    key = key_file(tmp_path / "owner")
    key.chmod(0o644)
    result = cli("prepare", "--policy", tmp_path / "policy.yaml", "--noise-key", key)
    assert result.code == 2 and "group or others" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "prepared").exists()
    key.chmod(0o600)
    inside = tmp_path / "prepared" / "k.key"
    inside.parent.mkdir()
    inside.write_bytes(key.read_bytes())
    inside.chmod(0o600)
    result = cli("prepare", "--policy", tmp_path / "policy.yaml", "--noise-key", inside, "--overwrite")
    assert result.code == 2 and "inside" in result.err
    garbage = tmp_path / "owner" / "garbage.key"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    result = cli("prepare", "--policy", tmp_path / "policy.yaml", "--noise-key", garbage, "--out", tmp_path / "other")
    assert result.code == 2 and "not a key file" in result.err


def test_a_policy_with_a_public_seed_is_refused(tmp_path: Path, cli: Callable[..., Any]) -> None:
    policy = digits_policy(tmp_path / "prepared")
    policy["noise"]["seed"] = 0
    write_policy(tmp_path / "policy.yaml", policy)
    result = cli("prepare", "--policy", tmp_path / "policy.yaml")
    assert result.code == 2 and "seed is no longer accepted" in result.err and not (tmp_path / "prepared").exists()


def test_train_refuses_a_directory_with_invertible_noise(tmp_path: Path, cli: Callable[..., Any], prepared: Path) -> None:
    """A prepared directory made by an earlier version (noise_seed in the card and the manifest)."""
    import shutil

    import pyarrow as pa

    from sfbd_guard.fileio import atomic_write_json
    from sfbd_guard.hashing import fingerprint, sha256_file

    old = Path(shutil.copytree(prepared, tmp_path / "old"))
    table = pq.read_table(old / "manifest.parquet")
    table = table.append_column("noise_seed", pa.array([None] * table.num_rows, pa.uint64()))
    pq.write_table(table, old / "manifest.parquet")
    card = json.loads((old / "card.json").read_text())
    for key in ("noise_key_id", "noise_key_source", "noise_generator"):
        card.pop(key)
    card["noise_seed"] = 0
    card["manifest_sha256"] = sha256_file(old / "manifest.parquet")
    card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    atomic_write_json(old / "card.json", card)
    write_policy(tmp_path / "pipe.yaml", tiny_pipeline(old, tmp_path / "run"))
    result = cli("train", "--pipeline", tmp_path / "pipe.yaml", "--allow-unrecorded")
    assert result.code == 1 and "invertible" in result.err and "re-run guard prepare" in result.err
    assert len(result.err.strip().splitlines()) <= 2 and "Traceback" not in result.err


def test_only_curation_and_keygen_import_the_key_module() -> None:
    """Static half of the key boundary (the chain test above is the runtime half): reading a key file is
    `keys/secret.py`, imported by prepare, its decoding workers and `guard keygen` only."""
    import ast

    package = Path(__file__).resolve().parents[2] / "sfbd_guard"
    allowed = {package / "curation" / "prepare.py", package / "curation" / "decode.py", package / "cli.py"}
    importers = set()
    for path in package.rglob("*.py"):
        here = ["sfbd_guard", *path.relative_to(package).with_suffix("").parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module, *(f"{module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if "sfbd_guard.keys.secret" in names:
                importers.add(path)
    assert importers, "positive control: prepare imports the key module"
    assert importers <= allowed, f"{sorted(str(p.relative_to(package)) for p in importers - allowed)} import the key module"
    cli = (package / "cli.py").read_text()
    assert cli.count("keys.secret import") == 2 and "def keygen" in cli and "def key_export_digest" in cli


def test_train_and_sample_open_nothing_of_the_owner_nor_the_originals(tmp_path: Path, cli: Callable[..., Any],
                                                                       owner_config: Path, watch_opens: list[str]) -> None:
    """The training boundary: `guard train` and `guard sample` read only the prepared directory and the run. Neither
    opens the owner's folder (key, release register, digest keys, lineage) nor the source data (the digits'
    file in scikit-learn), whatever the owner's files next to them."""
    write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.8))
    _guard(cli, "prepare", "--policy", tmp_path / "policy.yaml")
    opened_by_prepare = list(watch_opens)
    assert any("digits" in Path(p).name for p in opened_by_prepare), "positive control: prepare reads the originals"
    assert any(Path(p).resolve().is_relative_to(owner_config.resolve()) for p in opened_by_prepare), (
        "positive control: prepare uses the owner's folder")
    watch_opens.clear()
    write_policy(tmp_path / "pipe.yaml", tiny_pipeline(tmp_path / "prepared", tmp_path / "run"))
    _guard(cli, "train", "--pipeline", tmp_path / "pipe.yaml")
    _guard(cli, "sample", "--run", tmp_path / "run", "--n", "4", "--steps", "2", "--out", tmp_path / "samples")
    owner = [p for p in watch_opens if Path(p).resolve().is_relative_to(owner_config.resolve())]
    originals = [p for p in watch_opens if "digits" in Path(p).name and "sklearn" in p]
    assert owner == [] and originals == [], f"train or sample opened {owner or originals}"
