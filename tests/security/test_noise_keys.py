"""Attacks on how the noise is keyed across releases (issue 23).

- Cancellation: one key, two folders, the same file names, different images. When a record's noise was keyed
  by (secret, sigma, shape, record id) only, the two copies of a shared id carried the same eps, so
  yA - yB = xA - xB (to float16 rounding, 0.002): whoever knows B's images gets A's back. The noise is now
  bound to the pixels too.
- Averaging: the same data prepared twice with the default settings (a data owner re-running after a rule
  change). With a fresh secret per prepare the two copies had independent noise and their mean had sigma/sqrt(2).
  The owner's key is now persistent by default, so the copies are identical and the mean gives nothing.
- What remains (docs/security.md): one record with the same pixels released twice under one key carries the
  same noise, so the two releases are linkable; the same pixels under another id are not.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from helpers import digits_policy, key_file, write_image_set, write_policy
from sfbd_guard.datasets import SourceSpec, open_reader

SIGMA = 0.5


def _prepare(cli: Callable[..., Any], tmp: Path, root: Path, out: Path, *extra: object) -> Path:
    policy = {"version": 1, "name": "attack", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": SIGMA}, "output": str(out)}
    result = cli("prepare", "--policy", write_policy(tmp / f"{out.name}.yaml", policy), *extra)
    assert result.code == 0, result.err
    return out


def _noisy(prepared: Path) -> dict[str, np.ndarray]:
    """{record_id: float64 noisy copy} of a prepared directory's protected rows."""
    rows = [r for r in pq.read_table(prepared / "manifest.parquet").to_pylist() if r["partition"] == "protected"]
    arrays = {f: np.load(prepared / f) for f in {r["file"] for r in rows}}
    return {r["record_id"]: arrays[r["file"]][r["row"]].astype(np.float64) for r in rows}


def _originals(prepared: Path, ids: list[str]) -> dict[str, np.ndarray]:
    card = json.loads((prepared / "card.json").read_text())
    root = prepared / card["root"] if card["root"] else None
    reader = open_reader(SourceSpec(card["format"], root, card["split"], card["resolution"]))
    return {rid: reader.load(rid).astype(np.float64) / 127.5 - 1 for rid in ids}


def test_two_folders_under_one_key_do_not_cancel(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """The attacker holds B's images and both prepared directories: (yA - yB) + xB must not give xA back."""
    key = key_file(tmp_path / "owner")
    roots_a = write_image_set(tmp_path / "a", 12, formats=("imagefolder",), seed=0)
    roots_b = write_image_set(tmp_path / "b", 12, formats=("imagefolder",), seed=1)
    a = _noisy(_prepare(cli, tmp_path, roots_a["imagefolder"], tmp_path / "pa", "--noise-key", key))
    prepared_b = _prepare(cli, tmp_path, roots_b["imagefolder"], tmp_path / "pb", "--noise-key", key)
    b = _noisy(prepared_b)
    shared = sorted(set(a) & set(b))
    assert len(shared) == 12
    xa = _originals(tmp_path / "pa", shared)
    xb = _originals(prepared_b, shared)
    assert all(not np.array_equal(xa[r], xb[r]) for r in shared), "positive control: the images differ"
    rebuilt = np.stack([a[r] - b[r] + xb[r] for r in shared])
    truth = np.stack([xa[r] for r in shared])
    error = rebuilt - truth  # = sigma * (epsA - epsB): sigma * sqrt(2) if the draws are independent
    assert error.std() > 0.8 * SIGMA * np.sqrt(2), f"the noise cancels: A rebuilt to {error.std():.4f}"
    within = np.abs(error) < 1 / 127.5  # pixels the attacker gets to within one grey level
    assert within.mean() < 0.05


def test_preparing_again_with_the_default_settings_releases_identical_copies(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """The data owner prepares, changes one rule, prepares again (no key flag either time): every record
    protected in both carries the same noise, so the mean of the two copies is as noisy as one."""
    first = digits_policy(tmp_path / "one", drop=0.7)
    second = digits_policy(tmp_path / "two", drop=0.7)
    second["rules"][1]["sample"]["fraction"] = 0.15  # the rule change: a few more clean records
    for name, policy in (("one", first), ("two", second)):
        result = cli("prepare", "--policy", write_policy(tmp_path / f"{name}.yaml", policy))
        assert result.code == 0, result.err
    one, two = _noisy(tmp_path / "one"), _noisy(tmp_path / "two")
    shared = sorted(set(one) & set(two))
    assert len(shared) > 300
    x = _originals(tmp_path / "one", shared)
    mean = np.stack([(one[r] + two[r]) / 2 - x[r] for r in shared])
    single = np.stack([one[r] - x[r] for r in shared])
    assert mean.std() > 0.97 * single.std(), (
        f"averaging two releases thins the noise: {mean.std():.3f} against {single.std():.3f} for one copy")
    assert all(np.array_equal(one[r], two[r]) for r in shared), "the same record and pixels: the same noisy copy"


def test_what_remains_identical_records_are_linkable_under_one_key(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """Documented (docs/security.md): the same record id with the same pixels, released twice under one key, gives
    byte-identical noisy copies (linkable across releases; nothing to average). The same pixels under another id
    draw other noise, so a submitted image never tests a victim's record (and the owner's release register counts
    them as another draw of the image: refused without --allow-rerelease)."""
    key = key_file(tmp_path / "owner")
    root = write_image_set(tmp_path / "a", 8, formats=("imagefolder",), seed=0)["imagefolder"]
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for image in root.glob("*.png"):
        shutil.copy(image, renamed / f"submitted-{image.name}")
    one = _noisy(_prepare(cli, tmp_path, root, tmp_path / "one", "--noise-key", key))
    again = _noisy(_prepare(cli, tmp_path, root, tmp_path / "again", "--noise-key", key))
    policy = {"version": 1, "name": "attack", "dataset": {"format": "imagefolder", "root": str(renamed), "resolution": 16},
              "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": SIGMA}, "output": str(tmp_path / "x")}
    refused = cli("prepare", "--policy", write_policy(tmp_path / "x.yaml", policy), "--noise-key", key)
    assert refused.code == 2 and "8 protected image(s) were already released with other noise" in refused.err
    other = _noisy(_prepare(cli, tmp_path, renamed, tmp_path / "other", "--noise-key", key, "--allow-rerelease"))
    assert one.keys() == again.keys() and all(np.array_equal(one[r], again[r]) for r in one), "linkable"
    for rid, copy in one.items():
        difference = other[f"submitted-{rid}"] - copy  # same pixels: sigma * (eps' - eps)
        assert difference.std() > 0.8 * SIGMA * np.sqrt(2), f"{rid}: another id shares the noise"


def test_the_owner_key_is_made_once_owner_only_and_found_through_a_path(tmp_path: Path, cli: Callable[..., Any],
                                                                         monkeypatch: Any) -> None:
    """First prepares racing make one key (never a half-written one); GUARD_KEY_FILE holds a path, not a key."""
    from concurrent.futures import ThreadPoolExecutor

    from sfbd_guard.keys.secret import owner_key

    monkeypatch.setenv("GUARD_KEY_FILE", str(tmp_path / "keys" / "mine.key"))
    refused = cli("key", "export-digest", tmp_path / "digest.key")
    assert refused.code == 2 and "not there yet" in refused.err and not (tmp_path / "digest.key").exists()
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: owner_key(), range(16)))
    assert len({k.key.secret for k in keys}) == 1 and sum(k.created for k in keys) == 1
    assert (tmp_path / "keys" / "mine.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["mine.key"], "no temporary file left"
    pasted = keys[0].key.secret.hex()
    monkeypatch.setenv("GUARD_KEY_FILE", pasted)  # the key pasted into the variable: refused, never echoed or a file
    monkeypatch.chdir(tmp_path)
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", digits_policy(tmp_path / "out", drop=0.9)))
    assert result.code == 2 and "must hold the absolute path" in result.err and pasted not in result.err + result.out
    assert not (tmp_path / pasted).exists() and not (tmp_path / "out").exists()
