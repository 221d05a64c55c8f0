"""Dedup in `guard prepare` (curation/dedup.py): copies across and within partitions take their cluster's strictest
action, a cluster is stored protected once, and the output is byte-identical whatever the worker count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from fixtures.synthetic import write_imagefolder
from helpers import key_file, lineage, write_policy
from sfbd_guard.curation import dedup
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets import base as base_module
from sfbd_guard.errors import ConfigError
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared
from sfbd_guard.symmetry import GENERATORS, grid_variants, group

SIGMA = 0.5


def dataset(tmp_path: Path, count: int = 12, copies: dict[str, tuple[str, str]] | None = None) -> Path:
    """`count` distinct images (kind open → clean, closed → protect, optout → exclude by the policy below) plus
    `copies`: {new file: (source file, transform)} whose kind is `open` unless the name says otherwise."""
    kinds = ["open", "closed", "optout"]
    rows: list[dict[str, object]] = [{"file_name": f"{i:02d}.png", "kind": kinds[i % 3]} for i in range(count)]
    root = write_imagefolder(tmp_path / "images", rows)
    for name, (source, transform) in (copies or {}).items():
        image = Image.open(root / source).convert("RGB")
        if transform == "mirror":
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif transform == "resize":
            image = image.resize((int(image.width * 1.2), int(image.height * 1.2)), Image.Resampling.BICUBIC)
        elif transform.startswith("contrast"):  # contrast cut to a quarter (around the mean grey), then turned
            image = ImageEnhance.Contrast(image).enhance(0.25)
            image = image.transpose(Image.Transpose.ROTATE_90) if transform == "contrast-rot90" else image
        elif transform == "jpeg":
            name = name.replace(".png", ".jpg")
            image.save(root / name, quality=60)
            rows.append({"file_name": name, "kind": name.split("-")[0]})
            continue
        image.save(root / name)
        rows.append({"file_name": name, "kind": name.split("-")[0]})
    lines = ["file_name,kind"] + [f"{r['file_name']},{r['kind']}" for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def run(tmp_path: Path, root: Path, name: str, *, workers: int = 1, **extra: Any) -> Path:
    policy = {"version": 1, "name": "dedup", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "optouts", "action": "exclude", "where": "kind = 'optout'"},
                        {"name": "open", "action": "clean", "where": "kind = 'open'"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": SIGMA, "key_file": str(key_file(tmp_path / "keys"))},
              "output": str(tmp_path / name), **extra}
    # the tests prepare one folder with dedup on and off: other draws of the copies, allowed (test_release_register)
    return prepare(load_policy(write_policy(tmp_path / f"{name}.yaml", policy)), workers=workers,
                   allow_rerelease=True).output


def manifest(output: Path) -> dict[str, dict[str, Any]]:
    return {r["record_id"]: r for r in lineage(output).to_pylist()}  # the owner's full manifest (keys/owner.py)


def clean_hashes(output: Path) -> set[str]:
    from sfbd_guard.hashing import pixel_sha256

    data = open_prepared(output)
    return {pixel_sha256(np.ascontiguousarray(row)) for block in data.clean.pixels.blocks(256) for row in block}


OFF = {"dedup": {"enabled": False}}


def test_a_protected_image_copied_into_clean_is_not_trained_on_as_clean(tmp_path: Path) -> None:
    root = dataset(tmp_path, copies={"open-copy.png": ("01.png", "exact"), "open-mirror.png": ("04.png", "mirror")})
    before = run(tmp_path, root, "off", **OFF)  # the hole: the copies are clean originals
    rows = manifest(before)
    assert rows["open-copy.png"]["partition"] == "clean" and rows["01.png"]["partition"] == "protected"
    assert rows["01.png"]["sha256"] in clean_hashes(before), "dedup off: the protected image is in the clean arrays"

    after = run(tmp_path, root, "on")
    rows = manifest(after)
    # the mirror image is exact (canonical sha256) when cropping and resizing commute with the flip, else near
    for copy, source, kinds in (("open-copy.png", "01.png", {"exact"}), ("open-mirror.png", "04.png", {"exact", "near"})):
        assert rows[copy]["partition"] == "excluded" and rows[copy]["rule"] == "duplicate"
        assert (rows[copy]["dup_of"], rows[copy]["dup_rule"]) == (source, "open") and rows[copy]["dup_kind"] in kinds
        assert rows[copy]["dup_cluster"] == source and rows[copy]["file"] is None
        assert rows[source]["partition"] == "protected" and rows[source]["dup_of"] is None
    assert rows["01.png"]["sha256"] not in clean_hashes(after)
    assert rows["open-mirror.png"]["dup_similarity"] >= 0.99


def test_an_opt_out_is_not_overridden_by_its_re_upload(tmp_path: Path) -> None:
    root = dataset(tmp_path, copies={"open-reupload.png": ("02.png", "resize"), "closed-reupload.png": ("05.png", "jpeg")})
    rows = manifest(run(tmp_path, root, "off", **OFF))
    assert rows["open-reupload.png"]["partition"] == "clean", "dedup off: the re-upload is trained on"
    assert rows["closed-reupload.jpg"]["partition"] == "protected"

    output = run(tmp_path, root, "on")
    rows = manifest(output)
    assert rows["02.png"]["partition"] == "excluded" and rows["02.png"]["rule"] == "optouts"
    for copy, source in (("open-reupload.png", "02.png"), ("closed-reupload.jpg", "05.png")):
        assert rows[copy]["partition"] == "excluded" and rows[copy]["dup_of"] == source
        assert rows[copy]["dup_kind"] == "near" and rows[copy]["rule"] == "duplicate"
    card = open_prepared(output).card
    assert card.dedup is not None and card.dedup["demotions"] == {
        "clean copy of excluded": {"exact": 0, "near": 1}, "protected copy of excluded": {"exact": 0, "near": 1}}


def test_k_protected_copies_are_stored_once_not_averaged_down(tmp_path: Path) -> None:
    k = 6
    root = dataset(tmp_path, copies={f"closed-{i}.png": ("01.png", "exact") for i in range(k - 1)})
    off = run(tmp_path, root, "off", **OFF)
    data = open_prepared(off)
    copies = [i for i, rid in enumerate(data.protected.record_ids) if rid == "01.png" or rid.startswith("closed-")]
    assert len(copies) == k
    clean = data.clean  # noqa: F841 (only the protected rows matter here)
    target = open_prepared(run(tmp_path, root, "clean-ref", rules=[{"name": "all", "action": "clean"}], **OFF))
    original = target.clean.pixels.take(np.array([target.clean.record_ids.index("01.png")]))[0].astype(np.float32) / 127.5 - 1
    one = data.protected.pixels.take(np.array(copies[:1]))[0].astype(np.float32) - original
    mean = data.protected.pixels.take(np.array(copies)).astype(np.float32).mean(axis=0) - original
    assert mean.std() < one.std() / np.sqrt(k) * 1.3, "dedup off: k draws average to sigma/sqrt(k)"

    on = open_prepared(run(tmp_path, root, "on"))
    assert on.protected.record_ids.count("01.png") == 1
    assert not [rid for rid in on.protected.record_ids if rid.startswith("closed-")], "only one noisy copy exists"
    rows = manifest(on.root)
    assert all(rows[f"closed-{i}.png"]["dup_of"] == "01.png" for i in range(k - 1))


def test_exactly_one_protected_row_per_cluster_and_counts_fit_the_card(tmp_path: Path) -> None:
    copies = {"closed-a.png": ("01.png", "exact"), "closed-b.png": ("01.png", "mirror"), "open-c.png": ("01.png", "resize"),
              "closed-d.png": ("04.png", "jpeg"), "open-e.png": ("03.png", "exact"), "open-f.png": ("03.png", "mirror")}
    output = run(tmp_path, dataset(tmp_path, copies=copies), "on")
    rows = list(manifest(output).values())
    clusters: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["dup_cluster"]:
            clusters.setdefault(row["dup_cluster"], []).append(row)
    assert set(clusters) == {"01.png", "04.png", "03.png"}
    for members in clusters.values():
        assert sum(r["partition"] == "protected" for r in members) <= 1
    assert [r["partition"] for r in clusters["03.png"]] == ["clean"] * 3, "an all-clean cluster changes nothing"
    card = open_prepared(output).card  # open_prepared checks counts and rule counts against the manifest
    assert card.rule_counts["duplicate"] == 4 and card.counts["excluded"] == 4 + 4
    assert card.dedup is not None and card.dedup["merged"] == 9 and card.dedup["clusters"] == 3


def test_byte_identical_whatever_the_worker_count_with_dedup_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies = {"closed-a.png": ("01.png", "exact"), "open-b.png": ("01.png", "mirror"), "open-c.png": ("05.png", "jpeg")}
    root = dataset(tmp_path, 14, copies)
    monkeypatch.setattr(base_module, "PART_RECORDS", 4)
    outputs = [run(tmp_path, root, f"w{workers}", workers=workers) for workers in (1, 2)]
    files = [{p.relative_to(o).as_posix(): p.read_bytes() for p in sorted(o.rglob("*")) if p.is_file() and p.name != "card.json"}
             for o in outputs]
    assert files[0] == files[1]
    assert pq.ParquetFile(outputs[0] / "manifest.parquet").num_row_groups == 5
    assert manifest(outputs[0])["open-b.png"]["partition"] == "excluded"
    assert open_prepared(outputs[0]).card.files == open_prepared(outputs[1]).card.files


def test_dedup_off_is_recorded_and_duplicate_is_a_reserved_rule_name(tmp_path: Path) -> None:
    root = dataset(tmp_path, 6)
    assert open_prepared(run(tmp_path, root, "off", **OFF)).card.dedup == {"enabled": False}
    on = open_prepared(run(tmp_path, root, "on")).card.dedup
    assert on is not None and on["enabled"] and on["threshold"] == 0.99 and on["merged"] == 0
    assert on["transforms"] == ["flip", "rotate", "invert"] and on["variants"] == 16
    policy = {"version": 1, "name": "p", "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "duplicate", "action": "protect"}], "noise": {"sigma": 1.0}, "output": "out"}
    with pytest.raises(ConfigError, match="reserved"):
        load_policy(write_policy(tmp_path / "bad.yaml", policy))
    load_policy(write_policy(tmp_path / "ok.yaml", {**policy, **OFF}))


def test_strictest_action_rule() -> None:
    ids = pa.chunked_array([pa.array(["e", "d", "c", "b", "a", "z", "y"])])
    shas = pa.chunked_array([pa.array(["1", "1", "2", "1", "3", "4", "5"])])
    actions = np.array([dedup.STRICTNESS[a] for a in ("clean", "protect", "protect", "exclude", "clean", "clean", "protect")],
                       np.int8)
    roots = np.array([0, 0, 0, 0, 4, 4, 6])  # clusters {e,d,c,b}, {a,z} and {y}
    result = dedup.plan(roots, actions, ids, shas, None, variants=group(("flip",)), size=8)
    got = {ids[i].as_py(): (c.of, c.demoted, c.kind) for i, c in result.changes.items()}
    assert got == {"b": (None, False, None), "e": ("b", True, "exact"), "d": ("b", True, "exact"), "c": ("b", True, "near"),
                   "a": (None, False, None), "z": ("a", False, "near")}
    assert result.demotions == {"clean copy of excluded": {"exact": 1, "near": 0},
                                "protected copy of excluded": {"exact": 1, "near": 1}}
    roots = np.array([0, 0, 0, 3, 3, 3, 6])
    actions = np.array([dedup.STRICTNESS[a] for a in ("protect", "clean", "protect", "clean", "clean", "clean", "clean")],
                       np.int8)
    result = dedup.plan(roots, actions, ids, shas, None, variants=group(("flip",)), size=8)
    assert result.changes[2] == dedup.Change("c", None, None, None, False), "the smallest id among the protected ones"
    assert result.changes[0].demoted and result.changes[1].demoted and result.changes[0].of == "c"


def test_embedding_sees_every_variant_and_brightness_but_not_other_images() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    brighter = np.clip(images.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    variants = group(GENERATORS)
    vectors = dedup.embed(np.concatenate([images, brighter, *(v.pixels(images) for v in variants)]), 8)
    assert np.allclose((vectors[:4] * vectors[4:8]).sum(axis=1), 1.0, atol=0.02)
    for i, moved in enumerate(grid_variants(vectors[:4], 8, variants)):  # a variant's embedding: the moved embedding
        assert np.allclose(moved, vectors[8 + 4 * i:12 + 4 * i], atol=1e-5), variants[i].name
    others = vectors[:4] @ vectors[:4].T
    assert (others[~np.eye(4, dtype=bool)] < 0.5).all()
    for i, variant in enumerate(variants):
        copies = vectors[8 + 4 * i:12 + 4 * i]
        pairs = dedup.near_pairs(np.concatenate([vectors[:4], copies]), 0.95, variants=variants, size=8, block=3)
        found = sorted(zip(*(np.concatenate(side).tolist() for side in zip(*pairs, strict=True)), strict=True))
        assert found == [(0, 4), (1, 5), (2, 6), (3, 7)], variant.name
        plain = dedup.near_pairs(np.concatenate([vectors[:4], copies]), 0.95, variants=group(()), size=8, block=3)
        assert bool(plain) == variant.identity


def test_banded_search_finds_exactly_the_pairs_of_the_full_search() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (40, 1, 2, 2), dtype=np.uint8), 4, axis=2), 4, axis=3)
    noisy = np.clip(images[:30].astype(np.int16) + rng.integers(-6, 7, (30, 1, 8, 8)), 0, 255).astype(np.uint8)
    turned = np.rot90(255 - images[45:55], 1, axes=(2, 3))
    vectors = dedup.embed(np.concatenate([images, smooth, noisy, images[30:45, ..., ::-1], smooth[:10], turned]), 8)
    vectors[5] = 0.0  # a zero row (an exact copy's or an unreadable record's) never matches

    def pairs(found: list[tuple[np.ndarray, np.ndarray]]) -> set[tuple[int, int]]:
        return {(a, b) for rows_a, rows_b in found for a, b in zip(rows_a.tolist(), rows_b.tolist(), strict=True)}

    for threshold in (0.9, 0.97, 0.99):
        for generators in ((), ("flip",), ("rotate",), GENERATORS):
            variants = group(generators)
            full = pairs(dedup.near_pairs_all(vectors, threshold, variants=variants, size=8, block=16))
            banded = pairs(dedup.near_pairs(vectors, threshold, variants=variants, size=8, block=7, band_sample=50))
            assert banded == full and all(a < b for a, b in banded), (threshold, generators)
            assert 5 not in {row for pair in banded for row in pair}
    assert len(pairs(dedup.near_pairs(vectors, 0.97, variants=group(("flip",)), size=8))) >= 30 + 15 + 10
    assert len(pairs(dedup.near_pairs(vectors, 0.97, variants=group(GENERATORS), size=8))) >= 30 + 15 + 10 + 10


def test_the_datasheet_and_the_prepare_summary_show_demotions_by_cause(tmp_path: Path) -> None:
    from rich.console import Console

    from sfbd_guard.compliance.datasheet import _dedup
    from sfbd_guard.curation.console import print_summary
    from sfbd_guard.curation.prepare import PrepareResult

    output = run(tmp_path, dataset(tmp_path, 6, {"open-copy.png": ("01.png", "exact")}), "on")
    card = open_prepared(output).card
    text = _dedup(card)
    assert "| clean copy of protected | 1 | 0 |" in text and "1 demoted to excluded" in text
    assert "cosine ≥ 0.99 and ≥ 0.97 at 16 px" in text
    console = Console(record=True, width=200)
    print_summary(PrepareResult(output, dict(card.counts), dict(card.rule_counts), [], card, 0.1), console)
    printed = console.export_text()
    assert "dedup: 2 record(s) (28.57 %) merged into 1 cluster(s)" in printed
    assert "pixel cosine >= 0.99 and >= 0.97 at 16 px" in printed
    off = open_prepared(run(tmp_path, dataset(tmp_path / "b", 6), "off", **OFF)).card
    assert "turned off" in _dedup(off)


def test_canonical_variant_is_the_smallest_of_the_variants_and_the_same_for_each() -> None:
    from sfbd_guard.symmetry import canonical

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    images[:10, :, 0, :] = 17  # tied first rows: decided by the full comparison
    images[10:15] = np.rot90(images[10:15], 1, axes=(2, 3))[..., ::-1]
    images[15] = 0  # a constant image: its inversion is the other constant
    images[16] = np.eye(8, dtype=np.uint8) * 255  # symmetric under the transpose
    for generators in (GENERATORS, ("flip",), ("rotate", "invert"), ()):
        variants = group(generators)
        got = canonical(images, variants)
        for image, chosen in zip(images, got, strict=True):
            assert chosen.tobytes() == min(v.pixels(image).tobytes() for v in variants)
        for v in variants:
            assert np.array_equal(canonical(v.pixels(images), variants), got), (generators, v.name)


def test_the_invariant_embedding_is_the_same_for_every_variant_and_never_farther_apart() -> None:
    from sfbd_guard.symmetry import best_similarity, invariant

    rng = np.random.default_rng(5)
    vectors = dedup.embed(rng.integers(0, 256, (50, 3, 16, 16), dtype=np.uint8), 8)
    variants = group(GENERATORS)
    base = invariant(vectors, 8)
    assert np.allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    for moved in grid_variants(vectors, 8, variants):
        assert np.allclose(invariant(moved, 8), base, atol=1e-6)
    a, b = vectors[:25], vectors[25:]
    nearest = np.sqrt(np.maximum(0, 2 - 2 * best_similarity(a, b, 8, variants)))  # distance to the nearest variant
    assert (np.linalg.norm(base[:25] - base[25:], axis=1) <= nearest + 1e-5).all()


def _alike_at_8px_only(root: Path) -> None:
    """Two 16 px images with the same 2×2 block means (so the same 8×8 embedding), one of them stored rotated and
    inverted, that differ in their pixels: an independent ±40 checker inside each 2×2 block (zero block mean).
    Like the benchmark's binary silhouette tiles and step edges: variants of one another at 8×8, not at 16."""
    rng = np.random.default_rng(7)
    coarse = np.kron(rng.integers(70, 186, (8, 8)), np.ones((2, 2)))
    checker = np.kron(np.ones((8, 8)), np.array([[1, -1], [-1, 1]]))
    a, b = (coarse + 40 * checker * np.kron(rng.choice([-1, 1], (8, 8)), np.ones((2, 2))) for _ in range(2))
    b = 255 - np.rot90(b)
    for name, grey in (("closed-a.png", a), ("open-b.png", b)):
        Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)).save(root / name)
    (root / "metadata.csv").write_text("file_name,kind\nclosed-a.png,closed\nopen-b.png,open\n")


def test_two_distinct_images_alike_only_at_8px_are_not_merged(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    _alike_at_8px_only(root)
    loose = manifest(run(tmp_path, root, "loose", dedup={"fine_threshold": -1}))  # the search alone: one image
    assert loose["open-b.png"]["dup_of"] == "closed-a.png" and loose["open-b.png"]["dup_similarity"] > 0.999
    output = run(tmp_path, root, "on")
    rows = manifest(output)
    assert rows["open-b.png"]["partition"] == "clean" and rows["open-b.png"]["dup_cluster"] is None
    card = open_prepared(output).card.dedup
    assert card is not None and card["fine"] == {"size": 16, "threshold": 0.97} and card["merged"] == 0
    loose_card = open_prepared(tmp_path / "loose").card.dedup
    assert loose_card is not None and "fine" not in loose_card


def test_the_finer_look_keeps_jpeg_resized_and_contrast_reduced_copies(tmp_path: Path) -> None:
    """A contrast-reduced copy is no escape: the finer look compares correlations (contrast-blind) like the search,
    and a copy's correlation falls little from 8 to 16 px."""
    copies = {"open-jpeg.png": ("01.png", "jpeg"), "open-resized.png": ("04.png", "resize"),
              "open-faint.png": ("07.png", "contrast"), "open-faint-turned.png": ("10.png", "contrast-rot90")}
    rows = manifest(run(tmp_path, dataset(tmp_path, copies=copies), "on"))
    for copy, source in (("open-jpeg.jpg", "01.png"), ("open-resized.png", "04.png"), ("open-faint.png", "07.png"),
                         ("open-faint-turned.png", "10.png")):
        assert rows[copy]["dup_of"] == source and rows[copy]["partition"] == "excluded", copy
        assert rows[copy]["dup_kind"] == "near" and rows[copy]["dup_similarity"] >= 0.99


def test_the_fine_threshold_follows_the_threshold(tmp_path: Path) -> None:
    from sfbd_guard.policy.model import DedupSpec

    assert DedupSpec().effective_fine_threshold == 0.97
    assert DedupSpec(threshold=0.95).effective_fine_threshold == 0.93
    assert DedupSpec(threshold=0.95, fine_threshold=0.99).effective_fine_threshold == 0.99
    at_8px = dedup.embedding_for(DedupSpec(), 8, tmp_path)  # nothing finer than the resolution: no second look
    assert at_8px.fine_size == 0 and at_8px.dim == 64
    assert dedup.embedding_for(DedupSpec(), 32, tmp_path).dim == 64 + 256
    assert dedup.embedding_for(DedupSpec(fine_threshold=-1), 32, tmp_path).dim == 64


def test_verify_reads_the_own_rule_of_a_demoted_copy(tmp_path: Path) -> None:
    """verify's duplicates check judges a copy dedup demoted by its own rule (`dup_rule`): the manifest reader must
    load that column (it did not, so every demoted copy counted as an opt-out, and a held-out one was never skipped)."""
    import shutil

    from fixtures.synthetic import write_imagefolder
    from helpers import write_policy
    from sfbd_guard.compliance.verify import _manifest
    from sfbd_guard.curation.prepare import prepare
    from sfbd_guard.policy.model import load_policy

    root = write_imagefolder(tmp_path / "images", [{"file_name": f"{i}.png", "license": "CC0-1.0" if i < 3 else None}
                                                   for i in range(6)])
    shutil.copy(root / "4.png", root / "copy.png")  # a CC0-less image's copy under a CC0 licence
    policy = {"version": 1, "name": "dups", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "free", "action": "clean", "where": "license = 'CC0-1.0' OR record_id = 'copy.png'"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    result = prepare(load_policy(write_policy(tmp_path / "policy.yaml", policy)))
    rows, _ = _manifest(result.output)
    demoted = [r for r in rows if r["rule"] == "duplicate"]
    assert len(demoted) == 1 and demoted[0]["dup_rule"] == "free", demoted
