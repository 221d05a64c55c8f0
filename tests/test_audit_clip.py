"""The CLIP path with a tiny randomly initialised open_clip model, saved and loaded back through the real
loading code (a weights file with an architecture name, and an open_clip directory), offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import celeba_policy, plant_samples, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.embedding.clip import ClipEmbedder
from sfbd_guard.errors import InputError
from sfbd_guard.policy.model import load_policy

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny CLIP: as `<dir>/open_clip_config.json` + safetensors, and as a .pt file of a registered arch."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import open_clip
    import torch
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "configs").mkdir()
    (tmp / "configs" / "guard-tiny-test.json").write_text(json.dumps(TINY))
    other = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48}}
    (tmp / "configs" / "guard-tiny-other.json").write_text(json.dumps(other))
    open_clip.add_model_config(tmp / "configs")  # registers the architecture name for the file path
    torch.manual_seed(0)
    model = open_clip.create_model("guard-tiny-test").eval()
    torch.save(model.state_dict(), tmp / "tiny.pt")
    folder = tmp / "tiny-dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {"size": 32}}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    from PIL import Image

    batch = torch.stack([model_preprocess(Image.fromarray(i.transpose(1, 2, 0))) for i in images])
    with torch.no_grad():
        expected = model.encode_image(batch, normalize=True).numpy()
    np.save(tmp / "images.npy", images)
    np.save(tmp / "expected.npy", expected)
    return {"file": tmp / "tiny.pt", "dir": folder, "images": tmp / "images.npy", "expected": tmp / "expected.npy"}


def model_preprocess(image):  # type: ignore[no-untyped-def]
    """open_clip's default eval preprocessing at 32 px (bicubic resize, centre crop, OpenAI mean/std)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(size=32), is_train=False)(image)


@pytest.mark.parametrize("source", ["file", "dir"])
def test_random_clip_round_trips_through_the_loader(clip_files: dict[str, Path], source: str) -> None:
    embedder = ClipEmbedder(weights=str(clip_files[source]), model="guard-tiny-test", quick_gelu=False)
    images = np.load(clip_files["images"])
    vectors = embedder.embed(images)
    assert vectors.shape == (4, 32) and embedder.dim == 32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors, np.load(clip_files["expected"]), atol=1e-5)  # the saved weights, not a new init
    assert np.array_equal(vectors, embedder.embed(images))
    identity = embedder.identity()
    assert identity["kind"] == "clip" and len(identity["weights_sha256"]) == 64


def test_bad_weights_are_input_errors(clip_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    (tmp_path / "w.txt").write_text("x")
    cases = {str(tmp_path / "empty"): "no .safetensors", str(tmp_path / "w.txt"): "expected one of",
             str(tmp_path): "without open_clip_config.json", None: "needs local weights"}
    for weights, message in cases.items():
        with pytest.raises(InputError, match=message):
            ClipEmbedder(weights=weights, model="ViT-B-32", quick_gelu=False)
    with pytest.raises(InputError, match="cannot load into guard-tiny-other"):  # weights of another architecture
        ClipEmbedder(weights=str(clip_files["file"]), model="guard-tiny-other", quick_gelu=False)


def test_audit_with_clip_finds_exact_copies(cli, tmp_path: Path, celeba_root: Path, clip_files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    prepared = prepare(load_policy(write_policy(tmp_path / "p.yaml", celeba_policy(celeba_root, tmp_path / "prep")))).output
    planted = plant_samples(prepared, tmp_path / "samples", copies=2, novel=3)
    result = cli("audit", "--samples", tmp_path / "samples", "--data", prepared, "--report", tmp_path / "report",
                 "--clip-weights", clip_files["dir"], "--index-cache", tmp_path / "cache")
    assert result.code == 3, result.err
    rows = {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}
    assert all(rows[n]["verdict"] == "copy" and rows[n]["top1_record_id"] == s for n, s in planted.items())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["embedder"]["kind"] == "clip" and summary["embedder"]["dim"] == 32
