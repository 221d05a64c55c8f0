"""Attacks on `guard export` and on what it hands on (the folder, the Hub upload).

- exfiltration: an export of an SFBD run (round sets on disk, samples and an audit beside it) holds the allow-list
  and nothing else: no image, no array file, no protected original or round-set image in any form, no record id,
  no path of the owner's machine;
- smuggling: a file added to an export folder, a symlink, or an export.json that lists a round set or a path
  outside the folder is refused before anything is loaded or uploaded;
- forgery: weights that no train event of the ledger recorded (changed, or from another run) are not exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_evidence_forgery import originals

import sfbd_guard as api
from helpers import digits_policy, key_file, tiny_pipeline, write_policy
from sfbd_guard.errors import InputError
from sfbd_guard.exporting.check import checked_export
from sfbd_guard.exporting.hub import push_export
from sfbd_guard.exporting.layout import FILES


@pytest.fixture(scope="module")
def sfbd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny SFBD run with one round (its denoised round set stays on disk), diffusers' U-Net; and its samples."""
    tmp = tmp_path_factory.mktemp("export-attacks")
    ledger = tmp / "ledger"
    policy = digits_policy(tmp / "prepared", drop=0.6)
    policy["noise"]["key_file"] = str(key_file(tmp / "keys"))
    api.prepare(write_policy(tmp / "policy.yaml", policy), ledger=ledger)
    run = tmp / "runs" / "sfbd"
    pipeline = tiny_pipeline(tmp / "prepared", run, method="sfbd", network="diffusers-unet2d",
                             schedule={"pretrain_kimg": 0.128, "rounds": 1, "round_kimg": 0.128},
                             denoise={"steps": 2, "batch": 256})
    api.train(write_policy(tmp / "sfbd.yaml", pipeline), ledger=ledger)
    api.sample(run, n=8, out=run / "samples", steps=4, ledger=ledger)
    return tmp / "prepared", run, ledger


def forms(pixels: np.ndarray) -> list[bytes]:
    """An image as uint8, and on [-1, 1] as float16 and float32: how weights files, arrays or tensors would hold it."""
    scaled = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
    return [pixels.tobytes(), scaled.astype(np.float16).tobytes(), scaled.tobytes()]


def test_an_export_holds_the_allow_list_and_nothing_of_the_data(sfbd_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, run, ledger = sfbd_run
    rounds = sorted((run / "rounds").rglob("*.npy"))
    assert rounds, "positive control: the run has a round set on disk"
    out = tmp_path / "export"
    api.export(run, out=out, ledger=ledger)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted(FILES["diffusers"])
    blob = b"".join((out / name).read_bytes() for name in names)
    for magic in (b"\x89PNG", b"\x93NUMPY", b"\xff\xd8\xff", b"PAR1"):  # no image, array or Parquet file inside
        assert magic not in blob
    for record, pixels in originals(data).items():
        assert not any(form in blob for form in forms(pixels)), f"{record}'s original is in the export"
        assert record.encode() not in blob
    for shard in rounds:  # the denoised round set: not one image of it
        images = np.load(shard)
        for image in images.reshape(len(images), -1)[:64]:
            assert image.tobytes() not in blob
    manifest = pq.read_table(data / "manifest.parquet", columns=["digest"]).to_pylist()
    assert not any(r["digest"] and r["digest"].encode() in blob for r in manifest)
    record = json.loads((out / "export.json").read_text())
    assert record["run"] == "sfbd" and str(tmp_path) not in json.dumps(record)  # names, never the owner's paths


class RecordingHub:
    def __init__(self) -> None:
        self.uploads: list[dict[str, Any]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None: ...

    def upload_folder(self, **kwargs: Any) -> str:
        self.uploads.append(kwargs)
        return "https://huggingface.co/x/commit/1"


@pytest.mark.parametrize("attack", ["added round set", "symlink to an original", "listed round set", "listed escape"])
def test_nothing_smuggled_into_an_export_is_loaded_or_pushed(sfbd_run: tuple[Path, Path, Path], tmp_path: Path,
                                                              attack: str) -> None:
    _, run, ledger = sfbd_run
    out = tmp_path / "export"
    api.export(run, out=out, ledger=ledger)
    shard = sorted((run / "rounds").rglob("*.npy"))[0]
    record = json.loads((out / "export.json").read_text())
    if attack == "added round set":
        shutil.copy(shard, out / "unet" / "extra.npy")
    elif attack == "symlink to an original":
        (out / "scheduler" / "scheduler_config.json").unlink()
        (out / "scheduler" / "scheduler_config.json").symlink_to(shard)
    else:  # an export.json rewritten to list a file outside the layout (with its true sha256 and size)
        target = "rounds/round-01/shard.npy" if attack == "listed round set" else "../outside.npy"
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shard, out / target)
        from sfbd_guard.hashing import sha256_file

        record["files"].append({"path": target, "sha256": sha256_file(out / target), "bytes": (out / target).stat().st_size})
        (out / "export.json").write_text(json.dumps(record))
    hub = RecordingHub()
    with pytest.raises(InputError):
        checked_export(out)
    with pytest.raises(InputError):
        push_export(out, "x/y", api=hub)
    with pytest.raises(InputError):
        api.load_exported(out)
    assert hub.uploads == []


def test_weights_the_ledger_did_not_record_are_not_exported(sfbd_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A run directory whose EMA weights were swapped for others (here: the run's pretraining checkpoint, real
    weights of the same architecture) is refused, with or without its checkpoint named."""
    _, run, ledger = sfbd_run
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 2
    final = checkpoints[-1] / "ema.safetensors"
    kept = final.read_bytes()
    try:
        shutil.copy(checkpoints[0] / "ema.safetensors", final)
        with pytest.raises(InputError, match="recorded these weights"):
            api.export(run, out=tmp_path / "e", ledger=ledger)
    finally:
        final.write_bytes(kept)
    with pytest.raises(InputError, match="recorded these weights"):
        api.export(run, out=tmp_path / "e", ledger=ledger, checkpoint=checkpoints[0])
    assert not (tmp_path / "e").exists()
