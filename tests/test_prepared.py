"""The data boundary: the engine opens only verified prepared directories, never a raw dataset."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import celeba_policy, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.errors import InputError, VerificationError
from sfbd_guard.fileio import atomic_write_json
from sfbd_guard.hashing import sha256_file
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared

PACKAGE = Path(__file__).resolve().parents[1] / "sfbd_guard"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, celeba_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    return prepare(load_policy(write_policy(tmp / "p.yaml", celeba_policy(celeba_root, tmp / "out")))).output


@pytest.fixture
def copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_open_returns_both_partitions_in_manifest_order(prepared: Path) -> None:
    data = open_prepared(prepared)
    manifest = pq.read_table(prepared / "manifest.parquet").to_pylist()
    assert data.clean.record_ids == [r["record_id"] for r in manifest if r["partition"] == "clean"]
    assert data.protected.pixels.dtype == np.float16 and data.protected.pixels.shape[1:] == (3, 16, 16)
    assert set(data.protected.sigmas) == {0.5} and set(data.clean.sigmas) == {0.0}
    assert data.image_shape == (3, 16, 16)


def test_an_edited_array_is_refused(copy: Path) -> None:
    array = np.load(copy / "protected" / "shard-00000.npy")
    array[0] = 0
    np.save(copy / "protected" / "shard-00000.npy", array)
    with pytest.raises(VerificationError, match=r"protected/shard-00000\.npy does not match the sha256"):
        open_prepared(copy)


def test_a_missing_or_extra_file_is_refused(copy: Path, tmp_path: Path) -> None:
    extra = Path(shutil.copytree(copy, tmp_path / "extra"))
    (copy / "clean" / "shard-00000.npy").unlink()
    with pytest.raises(VerificationError, match=r"clean/shard-00000\.npy is missing"):
        open_prepared(copy)
    np.save(extra / "clean" / "shard-00001.npy", np.zeros((1, 3, 16, 16), np.uint8))
    with pytest.raises(VerificationError, match=r"not recorded in card\.json"):
        open_prepared(extra)


def test_a_protected_record_with_sigma_zero_is_refused(copy: Path) -> None:
    table = pq.read_table(copy / "manifest.parquet")
    sigma = [0.0 if p == "protected" else s for p, s in zip(table.column("partition").to_pylist(), table.column("sigma").to_pylist(), strict=True)]
    table = table.set_column(table.column_names.index("sigma"), "sigma", pa.array(sigma, pa.float64()))
    pq.write_table(table, copy / "manifest.parquet")
    card = json.loads((copy / "card.json").read_text())
    with pytest.raises(VerificationError, match=r"manifest\.parquet does not match"):
        open_prepared(copy)
    card["manifest_sha256"] = sha256_file(copy / "manifest.parquet")  # a forger who also edits the card
    from sfbd_guard.hashing import fingerprint

    card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    atomic_write_json(copy / "card.json", card)
    with pytest.raises(VerificationError, match=r"has sigma 0\.0"):
        open_prepared(copy)


def test_a_raw_dataset_folder_is_refused(celeba_root: Path) -> None:
    """Bad input (exit 2), not a failed check: the folder is no prepared directory at all."""
    with pytest.raises(InputError, match="not a prepared directory"):
        open_prepared(celeba_root)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_trainer_side_never_imports_the_dataset_readers() -> None:
    trainer_side = [PACKAGE / "prepared/reader.py"] + [p for d in ("diffusion", "engine") for p in (PACKAGE / d).rglob("*.py")]
    for path in trainer_side:
        for name in _imports(path):
            assert "datasets" not in name and "curation" not in name, f"{path.name} imports {name}"


def test_the_trainer_side_does_not_load_the_readers_even_indirectly() -> None:
    """The AST test above sees direct imports; this one imports the training path in a fresh process."""
    import subprocess
    import sys

    code = ("import sys; import sfbd_guard.engine.service, sfbd_guard.engine.trainer, sfbd_guard.engine.sfbd, "
            "sfbd_guard.engine.privacy, sfbd_guard.prepared.reader; "
            "print([m for m in sys.modules if m.startswith(('sfbd_guard.datasets', 'sfbd_guard.curation'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
