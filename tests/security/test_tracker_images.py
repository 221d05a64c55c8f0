"""Trackers (`tracker: tensorboard | mlflow`) are files people hand on: they may hold model samples, never a protected
original, a noisy copy or SFBD's denoised round set.

The attack: read back every image a tracker holds (TensorBoard's image events of every tag, every file of the MLflow
store that opens as an image) and search every byte it wrote for the raw pixels of the round sets, the prepared
arrays and the protected originals. The only images must be exactly the run's snapshot grids; the tracker refuses
any other file (a round image, a symlink planted in snapshots/). A copied run directory resumed with MLflow logs into
its own store, not the original's (MLflow's file store keeps absolute paths).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import pipeline_of_run, train
from sfbd_guard.engine.trackers import make_tracker
from sfbd_guard.policy.model import load_policy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _mlflow_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits-tracker-leaks")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.8)))).output


def _sfbd(tmp_path: Path, data: Path, kind: str, **overrides: Any) -> Path:
    pipeline = tiny_pipeline(data, tmp_path / kind, method="sfbd", tracker=kind, snapshot_every=3,
                             schedule={"pretrain_kimg": 0.032, "rounds": 2, "round_kimg": 0.032},
                             denoise={"steps": 3, "grid": "fitted", "batch": 1024}, **overrides)
    pipeline["model"]["model_channels"] = 8
    return train(load_pipeline(write_policy(tmp_path / f"{kind}.yaml", pipeline)), resume=False).run_dir


def _logged_images(run: Path, kind: str) -> list[bytes]:
    """Every image the tracker holds, as its grayscale pixels."""
    found = []
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "histograms": 0})
        events.Reload()
        tags = events.Tags()
        assert not tags["histograms"] and not tags["audio"] and tags["tensors"] == ["config/text_summary"]
        encoded = [e.encoded_image_string for tag in tags["images"] for e in events.Images(tag)]
    else:
        encoded = [p.read_bytes() for p in (run / "mlruns").rglob("*") if p.is_file()]
    for data in encoded:
        try:
            with Image.open(io.BytesIO(data)) as image:
                found.append(np.asarray(image.convert("L")).tobytes())
        except OSError:
            continue  # not an image: metrics, params, meta.yaml
    return found


def _protected_pixels(run: Path, data: Path) -> list[bytes]:
    """The raw pixels of what must never leave: round sets, the prepared arrays, the protected originals."""
    arrays = [np.load(p) for p in sorted((run / "rounds").rglob("*.npy"))]
    arrays += [np.load(p) for p in sorted(data.rglob("shard-*.npy"))]
    card = json.loads((data / "card.json").read_text())
    reader = open_reader(SourceSpec(card["format"], None, card["split"], card["resolution"]))
    import pyarrow.parquet as pq

    rows = pq.read_table(data / "manifest.parquet", columns=["record_id", "partition"]).to_pylist()
    arrays.append(np.stack([reader.load(str(r["record_id"])) for r in rows if r["partition"] == "protected"]))
    patterns = [image.tobytes() for array in arrays for image in array]
    return [p for p in patterns if len(set(p)) > 4]  # images with a few distinct bytes could match by chance


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_tracker_holds_the_snapshot_grids_and_nothing_protected(tmp_path: Path, digits: Path, kind: str) -> None:
    run = _sfbd(tmp_path, digits, kind)
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["round-01", "round-02"], "round sets were made"
    grids = {np.asarray(Image.open(p).convert("L")).tobytes() for p in (run / "snapshots").glob("*.png")}
    logged = _logged_images(run, kind)
    assert len(grids) >= 3 and set(logged) == grids, "the logged images are exactly the snapshot grids"

    folder = run / ("tensorboard" if kind == "tensorboard" else "mlruns")
    written = [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
    patterns = _protected_pixels(run, digits)
    shard = next((run / "rounds" / "round-01").glob("*.npy")).read_bytes()
    assert sum(pattern in shard for pattern in patterns) > 100, "positive control: the search finds a round set"
    leaked = sum(pattern in blob for pattern in patterns for blob in written)
    assert leaked == 0, f"{leaked} raw protected or denoised images in the tracker's files"

    # the tracker itself refuses anything but a snapshot grid of this run
    tracker = make_tracker(pipeline_of_run(run), run, start_step=None)
    try:
        round_png = run / "rounds" / "round-01" / "sample.png"
        Image.fromarray(np.load(next((run / "rounds" / "round-01").glob("*.npy")))[0, 0]).save(round_png)
        planted = run / "snapshots" / "planted.png"
        planted.symlink_to(round_png)
        for path in (round_png, planted, digits / "card.json"):
            with pytest.raises(ValueError, match="only the run's snapshot grids"):
                tracker.log_image("snapshots/x", 99, path)
    finally:
        tracker.close()
    assert set(_logged_images(run, kind)) == grids


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_copied_run_resumed_with_mlflow_leaves_the_original_untouched(tmp_path: Path, digits: Path) -> None:
    pipeline = tiny_pipeline(digits, tmp_path / "original", tracker="mlflow", snapshot_every=4)
    pipeline["model"]["model_channels"] = 8
    original = train(load_pipeline(write_policy(tmp_path / "p.yaml", pipeline)), resume=False).run_dir
    before = _tree(original)
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    shutil.rmtree(copy / "checkpoints" / "step-000000008")
    (copy / "checkpoints" / "latest").write_text("step-000000004")
    resolved = yaml.safe_load((copy / "config.resolved.yaml").read_text())
    resolved["schedule"]["pretrain_kimg"] = 0.256  # 16 steps
    (copy / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    train(pipeline_of_run(copy), resume=True)
    assert _tree(original) == before, "the original run (its MLflow store included) was written to"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(copy / "mlruns").resolve().as_uri())
    run_id = json.loads((copy / "tracker.json").read_text())["run_id"]
    artifacts = client.get_run(run_id).info.artifact_uri
    assert artifacts.startswith((copy / "mlruns").resolve().as_uri()), artifacts
    assert {a.path for a in client.list_artifacts(run_id, "snapshots")} >= {"snapshots/grid-step-000000016.png"}
