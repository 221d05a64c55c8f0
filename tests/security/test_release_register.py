"""The owner's release register: an image released twice with independent noise can be averaged (sigma/sqrt(k) after
k draws), so a prepare that would do it stops with exit 2, unless --allow-rerelease (recorded, with sigma_eff)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from helpers import digits_policy, key_file, read_events, write_policy
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.hashing import pixel_sha256


def _policy(tmp_path: Path, name: str, sigma: float = 0.6) -> Path:
    policy = digits_policy(tmp_path / name, drop=0.9)
    policy["noise"]["sigma"] = sigma
    return write_policy(tmp_path / f"{name}.yaml", policy)


def _ok(result: Any) -> Any:
    assert result.code == 0, result.err
    return result


def test_a_release_under_another_key_stops_naming_the_earlier_prepare(tmp_path: Path, cli: Callable[..., Any],
                                                                      owner_config: Path) -> None:
    _ok(cli("prepare", "--policy", _policy(tmp_path, "one")))
    first = read_events(tmp_path / "ledger").to_pylist()[-1]
    protected = json.loads((tmp_path / "one" / "card.json").read_text())["counts"]["protected"]
    other = key_file(tmp_path / "keys")
    refused = cli("prepare", "--policy", _policy(tmp_path, "two"), "--noise-key", other)
    assert refused.code == 2 and not (tmp_path / "two").exists()
    lines = refused.err.strip().splitlines()
    assert lines[0] == (
        f"error: {protected} protected image(s) were already released with other noise (another key, sigma, resolution "
        f"or record id) by prepare {first['event_id'][:12]} ({protected} image(s)), in "
        f"{owner_config / 'sfbd_guard' / 'releases.parquet'}: releasing them again lets their noisy copies be averaged "
        f"down to sigma_eff {0.6 / np.sqrt(2):.3g}"), lines
    assert lines[1].startswith("hint: ") and "--allow-rerelease" in lines[1] and len(lines) == 2
    failed = read_events(tmp_path / "ledger").to_pylist()[-1]
    assert failed["status"] == "failed" and "already released" in failed["summary"]
    # the same at another sigma (same key): a second, independent draw too
    assert cli("prepare", "--policy", _policy(tmp_path, "three", sigma=0.8)).code == 2
    # allowed: the prepare goes through and says so in the card and the ledger, with sigma_eff
    _ok(cli("prepare", "--policy", _policy(tmp_path, "two"), "--noise-key", other, "--allow-rerelease"))
    card = json.loads((tmp_path / "two" / "card.json").read_text())
    assert card["rerelease"] == {"allowed": True, "images": protected, "earlier": [first["event_id"]],
                                 "min_sigma_eff": round(0.6 / np.sqrt(2), 6),
                                 "sigma_eff_images": {f"{0.6 / np.sqrt(2):.3g}": protected}, "near": 0}
    event = read_events(tmp_path / "ledger").to_pylist()[-1]
    assert event["status"] == "ok" and json.loads(event["summary"])["rerelease"] == card["rerelease"]
    _attention_downstream(tmp_path / "two", tmp_path / "one")
    # a third draw, at sigma 0.8: sigma_eff over the three distinct draws
    _ok(cli("prepare", "--policy", _policy(tmp_path, "three", sigma=0.8), "--allow-rerelease"))
    card = json.loads((tmp_path / "three" / "card.json").read_text())
    assert card["rerelease"]["min_sigma_eff"] == round((2 / 0.6 ** 2 + 1 / 0.8 ** 2) ** -0.5, 6)
    assert card["rerelease"]["sigma_eff_images"] == {f"{(2 / 0.6 ** 2 + 1 / 0.8 ** 2) ** -0.5:.3g}": protected}
    assert len(card["rerelease"]["earlier"]) == 2


def _attention_downstream(rereleased: Path, first: Path) -> None:
    """guard verify's releases check, the report's verdict and the datasheet: ATTENTION with sigma_eff (not for the
    first release)."""
    from sfbd_guard.compliance.chains import Chain, judge
    from sfbd_guard.compliance.datasheet import _releases
    from sfbd_guard.compliance.verify import check_releases
    from sfbd_guard.prepared.card import read_card

    card = read_card(rereleased)
    check = check_releases(card)
    assert check.passed and check.attention and check.word == "ATTENTION"
    assert f"sigma_eff = {0.6 / np.sqrt(2):.3g} < the policy's sigma 0.6" in check.detail
    chain = Chain(rereleased, checks=[check])
    chain.reasons += judge(chain)
    assert chain.verdict == "ATTENTION" and any(r.level == "attention" and "releases:" in r.text for r in chain.reasons)
    assert "ATTENTION" in _releases(card) and "σ_eff" in _releases(card)
    assert f"| {0.6 / np.sqrt(2):.3g} | {card.rerelease.images if card.rerelease else 0} |" in _releases(card)
    clean = check_releases(read_card(first))
    assert clean.word == "PASS" and "ATTENTION" not in _releases(read_card(first))


def test_preparing_the_same_release_again_is_not_a_rerelease(tmp_path: Path, cli: Callable[..., Any],
                                                             owner_config: Path) -> None:
    """Same key, sigma, resolution, record ids and pixels: the same noisy copies, nothing new to average."""
    _ok(cli("prepare", "--policy", _policy(tmp_path, "one")))
    again = _ok(cli("prepare", "--policy", _policy(tmp_path, "again")))
    assert "already released" not in again.out
    assert json.loads((tmp_path / "again" / "card.json").read_text())["rerelease"] is None
    register = owner_config / "sfbd_guard" / "releases.parquet"
    assert register.stat().st_mode & 0o777 == 0o600
    events = read_events(tmp_path / "ledger").to_pylist()
    inputs = {a["role"]: a for a in events[-1]["inputs"]}
    from sfbd_guard.hashing import sha256_file

    assert inputs["register"]["sha256"] == sha256_file(register) == json.loads(events[-1]["summary"])["register_sha256"]
    rows = pq.read_table(register).to_pylist()
    protected = json.loads((tmp_path / "one" / "card.json").read_text())["counts"]["protected"]
    assert len(rows) == 2 * protected and {r["event_id"] for r in rows} == {e["event_id"] for e in events}
    # the register names images only by a keyed digest: no plain pixel sha256 of a released image is in it
    reader = open_reader(SourceSpec("digits", None, "all", 8))
    plain = {pixel_sha256(reader.load(r["record_id"])) for r in rows[:20]}
    assert not plain & {r["digest"] for r in rows} and not any(p.encode() in register.read_bytes() for p in plain)


def test_throwaway_keys_are_new_draws_each_time(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """The averaging attack with --ephemeral-key: the second throw-away release of the same images is refused."""
    _ok(cli("prepare", "--policy", _policy(tmp_path, "one"), "--ephemeral-key"))
    again = cli("prepare", "--policy", _policy(tmp_path, "two"), "--ephemeral-key")
    assert again.code == 2 and "already released with other noise" in again.err


def test_a_near_copy_of_a_released_image_is_a_rerelease(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """Brightened, re-encoded or mirrored copies of released images under new names: other pixels, so another draw of
    noise on (almost) the same image; found by dedup's embedding search, not by the digest."""
    from PIL import Image, ImageOps

    from helpers import write_image_set

    root = write_image_set(tmp_path / "a", 12, formats=("imagefolder",), seed=0)["imagefolder"]
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, image in enumerate(sorted(root.glob("*.png"))):
        with Image.open(image) as original:
            pixels = original.convert("RGB")
            if i % 3 == 0:
                pixels = Image.eval(pixels, lambda v: min(255, v + 3))
            elif i % 3 == 1:
                pixels = ImageOps.mirror(pixels)
            pixels.save(copies / f"copy-{image.stem}.jpg", quality=95)
    others = write_image_set(tmp_path / "b", 12, formats=("imagefolder",), seed=1)["imagefolder"]

    def policy(name: str, folder: Path) -> Path:
        return write_policy(tmp_path / f"{name}.yaml", {
            "version": 1, "name": name, "dataset": {"format": "imagefolder", "root": str(folder), "resolution": 16},
            "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 0.5}, "output": str(tmp_path / "out" / name)})

    _ok(cli("prepare", "--policy", policy("released", root)))
    _ok(cli("prepare", "--policy", policy("unrelated", others)))  # other images: no false match
    refused = cli("prepare", "--policy", policy("copies", copies))
    assert refused.code == 2 and "12 protected image(s) (12 of them as near copies) were already released" in refused.err
    _ok(cli("prepare", "--policy", policy("copies", copies), "--allow-rerelease"))
    card = json.loads((tmp_path / "out" / "copies" / "card.json").read_text())
    assert card["rerelease"]["near"] == 12 and card["rerelease"]["min_sigma_eff"] == round(0.5 / np.sqrt(2), 6)
