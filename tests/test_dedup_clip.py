"""Dedup with the clip embedder (local weights only): a tiny random open_clip model saved to disk and loaded back
through the real loading code, by the parent (checked before any work) and by every worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import guard, key_file, write_policy
from sfbd_guard.errors import ConfigError, InputError
from sfbd_guard.policy.model import CLIP_THRESHOLD, load_policy
from test_audit_clip import clip_files  # noqa: F401  (the module-scoped fixture that writes the tiny model)
from test_dedup import dataset, manifest, run

POLICY = {"version": 1, "name": "p", "dataset": {"format": "digits", "resolution": 8},
          "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 0.5}, "output": "out"}


def test_clip_dedup_merges_copies_and_records_the_model(tmp_path: Path, clip_files: dict[str, Path]) -> None:  # noqa: F811
    root = dataset(tmp_path, count=9, copies={"open-copy.png": ("01.png", "exact"), "open-mirror.png": ("04.png", "mirror")})
    # a random model maps all images close together: only (near-)identical embeddings may join here
    # (mirror images only: summed over all 16 variants, the random model's embeddings are all but one point)
    out = run(tmp_path, root, "clip", workers=2, dedup={"embedder": "clip", "clip_weights": str(clip_files["dir"]),
                                                        "threshold": 0.9995, "transforms": ["flip"]})
    rows = manifest(out)
    assert {r for r, row in rows.items() if row["dup_cluster"]} == {"01.png", "open-copy.png", "04.png", "open-mirror.png"}
    assert rows["open-copy.png"]["partition"] == "excluded" and rows["open-copy.png"]["dup_kind"] == "exact"
    # an image and its mirror image share one clip embedding (features of both, summed): cosine 1 up to resampling
    # (exact, by the canonical sha256, when cropping and resizing commute with the flip)
    mirror = rows["open-mirror.png"]
    assert mirror["partition"] == "excluded" and mirror["dup_of"] == "04.png" and mirror["dup_kind"] in ("near", "exact")
    assert mirror["dup_similarity"] > 0.999
    card = json.loads((out / "card.json").read_text())["dedup"]
    assert card["embedder"] == "clip" and card["threshold"] == 0.9995 and not card["threshold_default"]
    assert card["transforms"] == ["flip"] and card["variants"] == 2
    assert load_policy(write_policy(tmp_path / "d.yaml", {**POLICY, "dedup": {"embedder": "clip", "clip_weights": "w"}}
                                    )).policy.dedup.effective_threshold == CLIP_THRESHOLD
    assert card["clip"]["model"] == "local-dir" and len(card["clip"]["weights_sha256"]) == 64
    assert str(clip_files["dir"]) not in json.dumps(card)  # a path of the owner's machine is not in the card


def test_clip_needs_local_weights_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = POLICY
    with pytest.raises(ConfigError, match="clip_weights"):
        load_policy(write_policy(tmp_path / "a.yaml", {**base, "dedup": {"embedder": "clip"}}))
    loaded = load_policy(write_policy(tmp_path / "b.yaml", {**base, "dedup": {"embedder": "clip", "clip_weights": "none.pt"}}))
    from sfbd_guard.curation.prepare import prepare

    with pytest.raises(InputError, match="no such file"):
        prepare(loaded)
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.pt").write_bytes(b"not weights")
    policy = write_policy(tmp_path / "c.yaml", {**base, "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "k"))},
                                                 "dedup": {"embedder": "clip", "clip_weights": "bad.pt"}})
    capsys.readouterr()
    assert guard("prepare", "--policy", policy, "--ledger", tmp_path / "ledger") == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err


def test_clip_embeds_every_variant_of_an_image_as_one(clip_files: dict[str, Path]) -> None:  # noqa: F811
    import numpy as np

    from sfbd_guard.curation.dedup import Embedding
    from sfbd_guard.symmetry import GENERATORS, group

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    embedding = Embedding("clip", 0, 0, GENERATORS, str(clip_files["dir"]))
    embed = embedding.embedder()
    plain = embed(images)
    for variant in group(GENERATORS):  # the features of the 16 variants, summed: the same sum for each variant
        assert np.allclose(embed(variant.pixels(images)), plain, atol=1e-4), variant.name
