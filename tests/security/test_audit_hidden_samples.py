"""`guard audit --samples DIR` audits every image in DIR: samples.json adds metadata, it cannot hide files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import celeba_policy, plant_samples, write_policy
from sfbd_guard.auditing.images import is_grid_of
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.policy.model import load_policy


@pytest.fixture(scope="module")
def prepared(celeba_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hidden-prepared")
    return prepare(load_policy(write_policy(tmp / "p.yaml", celeba_policy(celeba_root, tmp / "prepared")))).output


def _audit(cli, tmp_path: Path, samples: Path, prepared: Path, *extra: object):  # type: ignore[no-untyped-def]
    return cli("audit", "--samples", samples, "--data", prepared, "--report", tmp_path / "report", *extra)


def test_samples_json_cannot_hide_copies(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=3, novel=4)
    novel = sorted(p.name for p in (tmp_path / "samples").glob("novel-*"))
    (tmp_path / "samples" / "samples.json").write_text(json.dumps({"images": novel, "grid": novel[0]}))
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared)
    assert result.code == 3, result.err
    rows = {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}
    assert set(rows) == set(planted) | set(novel)
    assert all(rows[name]["verdict"] == "copy" for name in planted)


def test_copies_in_subfolders_and_other_extensions_are_audited(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples" / "deep" / "er", copies=1, novel=2)
    name = next(iter(planted))
    (tmp_path / "samples" / "deep" / "er" / name).rename(tmp_path / "samples" / "deep" / "er" / "COPY.PNG")
    (tmp_path / "samples" / "samples.json").write_text(json.dumps({"images": ["deep/er/novel-000.jpg"]}))
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3


def test_a_symlink_out_of_the_folder_is_not_read(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "outside", copies=1, novel=0)
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=2)
    (tmp_path / "samples" / "link.png").symlink_to(next((tmp_path / "outside").glob("copy-*.png")))
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 0
    rows = {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}
    assert rows["link.png"]["status"] == "error" and "outside" in rows["link.png"]["error"]


def test_only_the_verified_grid_is_left_out(tmp_path: Path) -> None:
    import torch

    from sfbd_guard.engine.images import save_grid, save_pngs

    images = torch.rand(5, 1, 8, 8) * 2 - 1
    files = save_pngs(images, tmp_path, 0, 6)
    grid = save_grid(images, tmp_path / "grid.png")
    assert is_grid_of(grid, files)
    pixels = np.asarray(Image.open(grid)).copy()
    pixels[3, 3] ^= 1  # one pixel changed: not the grid of these samples, so it is audited like any image
    Image.fromarray(pixels).save(tmp_path / "forged.png")
    assert not is_grid_of(tmp_path / "forged.png", files)
    assert not is_grid_of(grid, files[:4])


def test_index_cache_is_off_by_default_and_owner_only_when_on(cli, tmp_path: Path, prepared: Path,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GUARD_AUDIT_CACHE", str(tmp_path / "env-cache"))
    plant_samples(prepared, tmp_path / "samples", copies=1, novel=1)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    assert not (tmp_path / "home").exists() and not (tmp_path / "env-cache").exists()
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["index"]["cache"] == "built (cache off)"
    assert (tmp_path / "report").stat().st_mode & 0o077 == 0, "the report folder holds thumbnails of originals"
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--index-cache-dir", tmp_path / "c").code == 3
    assert (tmp_path / "c").stat().st_mode & 0o077 == 0 and len(list((tmp_path / "c").iterdir())) == 1
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--index-cache", tmp_path / "d",
                  "--no-index-cache").code == 3
    assert not (tmp_path / "d").exists()
