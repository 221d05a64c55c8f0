"""Bring your own trainer (sfbd_guard.byo): what a user's own loop gets from a prepared directory holds no protected
original, and a directory that guard train refuses is refused here too.

The attacks: read the protected originals through the torch or the Hugging Face dataset (or the Arrow files the
latter leaves in its cache, which people hand on); and feed a forged directory (the protected arrays replaced by
the originals, every sha256 recomputed, even a prepare event added to the ledger) to a loop that skips guard train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_evidence_forgery import fake_prepare_event, forge, originals

from helpers import digits_policy, key_file, write_policy
from sfbd_guard.byo import PreparedDataset, to_hf_dataset
from sfbd_guard.curation.service import prepare_recorded
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.errors import VerificationError

SIGMA = 0.6
SECRET = bytes(range(32, 64))  # a fixed noise key: the per-image margins below do not depend on the run


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("byo-boundary")
    policy = digits_policy(tmp / "prepared", drop=0.75)
    policy["noise"] = {**policy["noise"], "key_file": str(key_file(tmp / "keys", secret=SECRET))}
    prepared = prepare_recorded(write_policy(tmp / "policy.yaml", policy), data_root=None, out=None, workers=1,
                                strict=False, overwrite=False, ledger=tmp / "ledger", command=["test"])
    return prepared.output, tmp / "ledger"


def _protected(root: Path) -> list[dict]:
    """The protected rows of the manifest, in order."""
    return [r for r in pq.read_table(root / "manifest.parquet").to_pylist() if r["partition"] == "protected"]


def test_every_protected_item_is_its_original_plus_noise_of_sigma(digits: tuple[Path, Path], tmp_path: Path) -> None:
    root, ledger = digits
    truth = originals(root)
    rows = _protected(root)
    dataset = PreparedDataset(root, "all", ledger=ledger)
    hf = to_hf_dataset(root, cache_dir=tmp_path / "cache", ledger=ledger).with_format("numpy")[:]
    clean = len(dataset) - len(rows)
    assert [dataset[clean + i]["record"] for i in range(len(rows))] == [r["digest"] for r in rows]
    x = np.stack([truth[r["record_id"]] for r in rows]).astype(np.float64) / 127.5 - 1
    for images in (np.stack([dataset[clean + i]["image"].numpy() for i in range(len(rows))]), hf["image"][clean:]):
        residual = images.astype(np.float64) - x
        rms = np.sqrt((residual**2).mean(axis=(1, 2, 3)))
        assert rms.min() > 0.6 * SIGMA and rms.max() < 1.4 * SIGMA, (rms.min(), rms.max())  # no item is an original
        assert abs(residual.std() / SIGMA - 1) < 0.02 and abs(residual.mean()) < 0.01  # pooled: noise of exactly σ
    assert (np.abs(np.rint((hf["image"][clean:].astype(np.float64) + 1) * 127.5)
                   - np.stack([truth[r["record_id"]] for r in rows]).astype(np.float64)) > 0).mean() > 0.9


def test_the_hf_cache_holds_no_original_and_no_record_id(digits: tuple[Path, Path], tmp_path: Path) -> None:
    """Byte for byte: no protected original (uint8, float16 or float32 on [-1, 1]), no record id of a protected or
    excluded record, no excluded digest in the Arrow files `datasets` wrote."""
    root, ledger = digits
    to_hf_dataset(root, cache_dir=tmp_path / "cache", ledger=ledger)
    blob = b"".join(p.read_bytes() for p in sorted((tmp_path / "cache").rglob("*")) if p.is_file())
    assert len(blob) > 404 * 256, "positive control: the images are in the cache"
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    protected = [r for r in manifest if r["partition"] == "protected"]
    clean_digest = next(r["digest"] for r in manifest if r["partition"] == "clean")
    assert clean_digest.encode() in blob, "positive control: the records' digests are"
    def forms(pixels: np.ndarray) -> list[bytes]:
        scaled = pixels.astype(np.float64) / 127.5 - 1
        return [pixels.tobytes(), scaled.astype(np.float16).tobytes(), scaled.astype(np.float32).tobytes(),
                (pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)).tobytes()]

    card = json.loads((root / "card.json").read_text())
    reader = open_reader(SourceSpec(card["format"], None, card["split"], card["resolution"]))
    clean = next(r["record_id"] for r in manifest if r["partition"] == "clean")
    assert forms(reader.load(clean))[3] in blob, "positive control: a clean image is found in the form the cache holds"
    for record, pixels in originals(root).items():
        for form in forms(pixels):
            assert form not in blob, f"{record}'s original is in the cache"
        assert record.encode() not in blob
    for row in manifest:
        if row["partition"] == "excluded":
            assert row["record_id"].encode() not in blob and row["digest"].encode() not in blob
    assert len(protected) > 100


def test_a_forged_directory_is_refused(digits: tuple[Path, Path], tmp_path: Path) -> None:
    """The originals in place of the noisy copies, re-hashed: refused for want of provenance; with allow_unrecorded, or
    with a prepare event forged into the ledger, by the noise statistics. Nothing is cached."""
    root, honest = digits
    ledger = Path(shutil.copytree(honest, tmp_path / "ledger"))  # the forged event goes into a copy
    forged = forge(root, tmp_path / "forged")
    with pytest.raises(VerificationError, match="no prepare event"):
        PreparedDataset(forged, "protected", ledger=ledger)
    for allow in (True, False):
        if not allow:
            fake_prepare_event(ledger, forged)  # an attacker with write access to the ledger
        with pytest.raises(VerificationError, match=f"not noisy copies at sigma {SIGMA}"):
            PreparedDataset(forged, "clean", ledger=ledger, allow_unrecorded=allow)
        with pytest.raises(VerificationError, match=f"not noisy copies at sigma {SIGMA}"):
            to_hf_dataset(forged, cache_dir=tmp_path / "cache", ledger=ledger, allow_unrecorded=allow)
    assert not (tmp_path / "cache").exists()
    assert json.loads((forged / "card.json").read_text())["fingerprint"] != json.loads((root / "card.json").read_text())["fingerprint"]
