"""Attacks: a copy hidden by an exact reversible transform (issue #22, 2).

A CC0 re-upload of a protected image, flipped vertically, rotated by 90, 180 or 270 degrees, colour-inverted
(255 - x) or inverted and rotated, gives the original back exactly: `guard prepare` must not train on it as a
clean original (dedup: canonical sha256 for exact copies, the near search against every variant), an inverted
re-upload of an opted-out image must be excluded, `guard verify` must see such a copy in a forged manifest or
in the clean arrays, and `guard audit` must flag a rotated or inverted memorised sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from fixtures.synthetic import write_imagefolder
from helpers import celeba_policy, key_file, lineage, plant_samples, write_policy
from sfbd_guard.compliance.verify import card_variants, check_clean_rows, check_duplicates
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.hashing import canonical_sha256
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared
from sfbd_guard.symmetry import GENERATORS, group

TRANSFORMS = {
    "vflip": lambda image: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "rot90": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "rot180": lambda image: image.transpose(Image.Transpose.ROTATE_180),
    "rot270": lambda image: image.transpose(Image.Transpose.ROTATE_270),
    "transpose": lambda image: image.transpose(Image.Transpose.TRANSPOSE),
    "invert": lambda image: ImageOps.invert(image),
    "invert-rot90": lambda image: ImageOps.invert(image.transpose(Image.Transpose.ROTATE_90)),
    "invert-vflip": lambda image: ImageOps.invert(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)),
}


def _dataset(tmp_path: Path, copies: dict[str, tuple[str, str]]) -> Path:
    """Ten images (00 protected, 01 clean, 02 opted out, ...) and `copies`: {file: (source, transform)}, all CC0."""
    kinds = ["closed", "open", "optout"]
    rows: list[dict[str, object]] = [{"file_name": f"{i:02d}.png", "kind": kinds[i % 3]} for i in range(10)]
    root = write_imagefolder(tmp_path / "images", rows)
    for name, (source, transform) in copies.items():
        with Image.open(root / source) as image:
            TRANSFORMS[transform](image.convert("RGB")).save(root / name)
        rows.append({"file_name": name, "kind": "open"})
    (root / "metadata.csv").write_text("file_name,kind\n" + "".join(f"{r['file_name']},{r['kind']}\n" for r in rows))
    return root


def _prepare(tmp_path: Path, root: Path, name: str = "out", **extra: Any) -> Path:
    policy = {"version": 1, "name": "transformed", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "optouts", "action": "exclude", "where": "kind = 'optout'"},
                        {"name": "open", "action": "clean", "where": "kind = 'open'"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "keys"))}, "output": str(tmp_path / name), **extra}
    return prepare(load_policy(write_policy(tmp_path / f"{name}.yaml", policy))).output


def _manifest(output: Path) -> dict[str, dict[str, Any]]:
    return {r["record_id"]: r for r in lineage(output).to_pylist()}  # the owner's full manifest (keys/owner.py)


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_a_transformed_cc0_copy_of_a_protected_image_is_not_clean(tmp_path: Path, transform: str) -> None:
    root = _dataset(tmp_path, {"copy.png": ("00.png", transform), "copy-b.png": ("03.png", transform)})
    rows = _manifest(_prepare(tmp_path, root))
    for copy, source in (("copy.png", "00.png"), ("copy-b.png", "03.png")):
        assert rows[source]["partition"] == "protected"
        assert rows[copy]["partition"] == "excluded" and rows[copy]["rule"] == "duplicate", (transform, rows[copy])
        assert rows[copy]["dup_of"] == source and rows[copy]["dup_similarity"] >= 0.99
    assert sum(r["partition"] == "clean" for r in rows.values()) == 3, "the distinct clean images stay clean"


def test_an_inverted_copy_of_an_opt_out_is_excluded(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"copy.png": ("02.png", "invert"), "copy-b.png": ("05.png", "invert-rot90")})
    rows = _manifest(_prepare(tmp_path, root))
    for copy, source in (("copy.png", "02.png"), ("copy-b.png", "05.png")):
        assert rows[source]["partition"] == "excluded" and rows[source]["rule"] == "optouts"
        assert rows[copy]["partition"] == "excluded" and rows[copy]["dup_of"] == source and rows[copy]["file"] is None


def _exact_dataset(tmp_path: Path, pixels: np.ndarray) -> Path:
    """00.png: protected, at the prepared resolution (no resampling); 01-03: clean; every variant of 00 as CC0."""
    rows: list[dict[str, object]] = [{"file_name": f"{i:02d}.png", "kind": "closed" if i == 0 else "open"} for i in range(4)]
    root = write_imagefolder(tmp_path / "images", rows)
    Image.fromarray(pixels.transpose(1, 2, 0)).save(root / "00.png")
    for v in group(GENERATORS)[1:]:
        Image.fromarray(v.pixels(pixels).transpose(1, 2, 0)).save(root / f"{v.name}.png")
        rows.append({"file_name": f"{v.name}.png", "kind": "open"})
    (root / "metadata.csv").write_text("file_name,kind\n" + "".join(f"{r['file_name']},{r['kind']}\n" for r in rows))
    return root


def test_an_exactly_rotated_or_inverted_copy_is_an_exact_duplicate(tmp_path: Path) -> None:
    """At the prepared resolution (no resampling), every variant has the protected image's canonical sha256."""
    pixels = np.random.default_rng(3).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    variants = group(GENERATORS)
    assert len({v.name for v in variants}) == 16
    assert len({canonical_sha256(v.pixels(pixels)[None], variants)[0] for v in variants}) == 1
    assert len({canonical_sha256(v.pixels(pixels)[None], ())[0] for v in variants}) == 16, "sha256 itself differs"
    manifest = _manifest(_prepare(tmp_path, _exact_dataset(tmp_path, pixels)))
    for v in variants[1:]:
        row = manifest[f"{v.name}.png"]
        assert (row["partition"], row["dup_of"], row["dup_kind"]) == ("excluded", "00.png", "exact"), v.name


def test_verify_sees_a_transformed_copy_in_a_forged_manifest_or_in_the_clean_arrays(tmp_path: Path) -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    output = _prepare(tmp_path, _exact_dataset(tmp_path, pixels))
    prepared = open_prepared(output)
    # the owner's full manifest, its plain digests under the names verify reads (`_manifest`: digest, canonical)
    table = lineage(output)
    plain = {"sha256": "digest", "canonical_sha256": "canonical"}
    rows = table.rename_columns([plain.get(n, n) for n in table.column_names]).to_pylist()
    variants = card_variants(prepared.card)
    assert len(variants) == 16
    assert check_duplicates(prepared.card, rows).passed and check_clean_rows(output, rows, variants).passed

    forged = [dict(r) for r in rows]
    copy = next(r for r in forged if r["record_id"] == "rot90.png")
    copy["partition"], copy["rule"] = "clean", "open"  # the rotated re-upload put back in training
    check = check_duplicates(prepared.card, forged)
    assert not check.passed and "rotated, flipped or inverted exact copy of protected" in check.detail, check.detail

    # a clean row whose stored pixels are a variant of a protected image, whatever the manifest says of it
    forged = [dict(r) for r in rows]
    clean = next(r for r in forged if r["partition"] == "clean")
    stored = np.load(output / clean["file"])[clean["row"]]
    protected = next(r for r in forged if r["partition"] == "protected")
    protected["canonical"] = canonical_sha256(np.rot90(255 - stored, 1, axes=(1, 2))[None], variants)[0]
    check = check_clean_rows(output, forged, variants)
    assert not check.passed and f"holds the pixels of {protected['record_id']}" in check.detail
    assert check_clean_rows(output, forged, ()).passed, "the plain sha256 alone does not see it"


def test_an_old_policy_with_mirror_still_loads(tmp_path: Path) -> None:
    from sfbd_guard.errors import ConfigError

    base = {"version": 1, "name": "p", "dataset": {"format": "digits", "resolution": 8},
            "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 0.5}, "output": "out"}
    on = load_policy(write_policy(tmp_path / "on.yaml", {**base, "dedup": {"mirror": True}})).policy.dedup
    off = load_policy(write_policy(tmp_path / "off.yaml", {**base, "dedup": {"mirror": False}})).policy.dedup
    assert on.transforms == ["flip", "rotate", "invert"] and off.transforms == []
    with pytest.raises(ConfigError, match="transforms only"):
        load_policy(write_policy(tmp_path / "both.yaml", {**base, "dedup": {"mirror": True, "transforms": []}}))
    with pytest.raises(ConfigError, match="transforms"):
        load_policy(write_policy(tmp_path / "bad.yaml", {**base, "dedup": {"transforms": ["shuffle"]}}))


@pytest.fixture(scope="module")
def celeba_prepared(celeba_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("transformed-audit")
    return prepare(load_policy(write_policy(tmp / "p.yaml", celeba_policy(celeba_root, tmp / "prepared")))).output


@pytest.mark.parametrize("name, transform", [("rot90", lambda x: np.rot90(x, 1, axes=(1, 2)).copy()),
                                             ("invert", lambda x: 255 - x),
                                             ("vflip+invert", lambda x: 255 - x[:, ::-1].copy())])
def test_the_audit_flags_a_rotated_or_inverted_memorised_sample(cli, tmp_path: Path, celeba_prepared: Path,  # type: ignore[no-untyped-def]
                                                                name: str, transform: Any) -> None:
    samples = tmp_path / "samples"
    planted = plant_samples(celeba_prepared, samples, copies=2, novel=2, transform=transform)
    result = cli("audit", "--samples", samples, "--data", celeba_prepared, "--report", tmp_path / "report",
                 "--index-cache", tmp_path / "cache")
    assert result.code == 3, (name, result.out, result.err)
    rows = {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}
    for sample, source in planted.items():
        row = rows[sample]
        assert row["verdict"] == "copy" and row["top1_record_id"] == source and row["hash_match"], (name, row)
        assert row["flipped"] and row["transform"] != "identity" and row["s1"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["verdict"] == "novel" for n, r in rows.items() if n.startswith("novel"))


def test_a_metadata_column_named_canonical_sha256_is_refused(tmp_path: Path) -> None:
    from sfbd_guard.errors import InputError

    rows: list[dict[str, object]] = [{"file_name": f"{i:02d}.png", "kind": "open", "canonical_sha256": "0" * 64}
                                     for i in range(3)]
    root = write_imagefolder(tmp_path / "images", rows)
    with pytest.raises(InputError, match="canonical_sha256"):
        _prepare(tmp_path, root)
    assert not (tmp_path / "out").exists()
