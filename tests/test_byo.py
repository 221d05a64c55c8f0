"""Bring your own trainer (sfbd_guard.byo, docs/byo-trainer.md): the prepared directory as a torch and a Hugging Face
dataset, checked as guard train checks it, the engine's loss and denoise step as functions, and the doc's loop run."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.byo import PreparedDataset, RoundSet, ambient_loss, denoise_round, edm_loss, to_hf_dataset
from sfbd_guard.curation.service import prepare_recorded
from sfbd_guard.diffusion.ambient import AmbientLoss
from sfbd_guard.engine.config import DenoiseSpec, load_pipeline
from sfbd_guard.engine.data import clean_images, noisy_images, to_uint8
from sfbd_guard.errors import InputError, VerificationError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 px digits (a quarter of them: 45 clean, 404 protected at σ 0.6) prepared into a ledger: (directory, ledger)."""
    tmp = tmp_path_factory.mktemp("byo")
    prepared = prepare_recorded(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.75)), data_root=None,
                                out=None, workers=1, strict=False, overwrite=False, ledger=tmp / "ledger", command=["test"])
    return prepared.output, tmp / "ledger"


def _card(root: Path) -> dict[str, Any]:
    return json.loads((root / "card.json").read_text())


def test_the_dataset_holds_each_partition_with_its_sigma(digits: tuple[Path, Path]) -> None:
    root, ledger = digits
    counts = _card(root)["counts"]
    clean, noisy, both = (PreparedDataset(root, p, ledger=ledger) for p in ("clean", "protected", "all"))
    assert (len(clean), len(noisy), len(both)) == (counts["clean"], counts["protected"], counts["clean"] + counts["protected"])
    assert len(noisy) > 100 and len(clean) > 10
    first, last = both[0], both[-1]
    assert first["partition"] == "clean" and float(first["sigma"]) == 0.0
    assert last["partition"] == "protected" and float(last["sigma"]) == pytest.approx(0.6)
    assert {float(noisy[i]["sigma"]) for i in range(len(noisy))} == {float(np.float32(0.6))}
    for item in (first, last):
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 8, 8) and item["sigma"].dtype == torch.float32
        assert re.fullmatch(r"[0-9a-f]{64}", item["record"]), "the keyed digest, not a file name"
    assert float(first["image"].min()) >= -1 and float(first["image"].max()) <= 1
    assert float(last["image"].abs().max()) > 1, "the noisy copies are as stored, not clipped"
    # the images are those guard train trains on, in manifest order, with the manifest's digests
    import pyarrow.parquet as pq

    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    assert [both[i]["record"] for i in range(len(both))] == (
        [r["digest"] for r in manifest if r["partition"] == "clean"] + [r["digest"] for r in manifest if r["partition"] == "protected"])
    engine_clean, engine_noisy = clean_images(both.data), noisy_images(both.data)
    assert torch.equal(torch.stack([clean[i]["image"] for i in range(len(clean))]), engine_clean.gather(torch.arange(len(clean))))
    rows = [3, 0, 3, len(noisy) - 1]
    batch = noisy.__getitems__(rows)  # a DataLoader's batched fetch: the same items
    assert torch.equal(torch.stack([b["image"] for b in batch]), engine_noisy.gather(torch.tensor(rows)))
    assert [b["record"] for b in batch] == [noisy[r]["record"] for r in rows]
    with pytest.raises(IndexError):
        both[len(both)]
    with pytest.raises(InputError, match="partition 'excluded'"):
        PreparedDataset(root, "excluded", ledger=ledger)  # type: ignore[arg-type]


def _arrays(obj: object, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from `obj` through attributes, dataclass fields, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, Path, torch.Tensor)) or obj is None:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        children: list[object] = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [a for child in children for a in _arrays(child, seen)]


def test_the_pixels_stay_memory_mapped(digits: tuple[Path, Path]) -> None:
    """The constructor loads no image: every array it keeps that is as large as a partition's pixels is a map of a shard."""
    root, ledger = digits
    dataset = PreparedDataset(root, "all", ledger=ledger)
    arrays = _arrays(dataset)
    pixels = 64 * len(dataset.data.clean)  # the smaller partition's pixels, 1 × 8 × 8 each
    large = [a for a in arrays if a.size >= pixels]
    assert large, "positive control: the shards are reachable"
    assert all(isinstance(a, np.memmap) and Path(str(a.filename)).is_relative_to(root) for a in large), [type(a) for a in large]


def test_a_tampered_directory_is_refused_with_the_trainers_error(digits: tuple[Path, Path], tmp_path: Path) -> None:
    from sfbd_guard.engine.service import train

    root, ledger = digits
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    array = np.load(copy / "protected" / "shard-00000.npy")
    array[0] = 0
    np.save(copy / "protected" / "shard-00000.npy", array)
    config = load_pipeline(write_policy(tmp_path / "pipeline.yaml", tiny_pipeline(copy, tmp_path / "run")))
    with pytest.raises(VerificationError) as trainer:
        train(config, resume=False)
    for partition in ("clean", "all"):
        with pytest.raises(VerificationError) as ours:
            PreparedDataset(copy, partition, ledger=ledger, allow_unrecorded=True)
        assert str(ours.value) == str(trainer.value) and "does not match the sha256" in str(ours.value)
    with pytest.raises(VerificationError) as hf:
        to_hf_dataset(copy, cache_dir=tmp_path / "cache", ledger=ledger, allow_unrecorded=True)
    assert str(hf.value) == str(trainer.value)
    assert not (tmp_path / "cache").exists()


def test_an_unrecorded_directory_is_refused_as_the_trainer_refuses_it(digits: tuple[Path, Path], tmp_path: Path) -> None:
    from sfbd_guard.engine.service import check_trusted
    from sfbd_guard.prepared.reader import open_prepared

    root, _ = digits
    other = tmp_path / "other-ledger"
    config = load_pipeline(write_policy(tmp_path / "pipeline.yaml", tiny_pipeline(root, tmp_path / "run")))
    with pytest.raises(VerificationError) as trainer:
        check_trusted(open_prepared(root), config, other, allow_unrecorded=False)
    with pytest.raises(VerificationError) as ours:
        PreparedDataset(root, ledger=other)
    assert str(ours.value) == str(trainer.value) and "no prepare event" in str(ours.value)
    dataset = PreparedDataset(root, ledger=other, allow_unrecorded=True)  # --allow-unrecorded
    assert not dataset.provenance.established and dataset.noise_check.passed


def test_the_hf_dataset_has_the_torch_datasets_rows(digits: tuple[Path, Path], tmp_path: Path) -> None:
    import datasets

    root, ledger = digits
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    torch_rows = PreparedDataset(root, "all", ledger=ledger)
    hf = to_hf_dataset(root, cache_dir=tmp_path / "cache", ledger=ledger)
    assert hf.features["image"] == datasets.Array3D(shape=(1, 8, 8), dtype="float32")
    assert hf.features["sigma"] == datasets.Value("float32") and hf.features["record"] == datasets.Value("string")
    assert hf.features["partition"].names == ["clean", "protected"]
    counts = _card(root)["counts"]
    assert hf.num_rows == len(torch_rows) and np.bincount(hf["partition"]).tolist() == [counts["clean"], counts["protected"]]
    rows = hf.with_format("numpy")[:]
    expected = torch.stack([torch_rows[i]["image"] for i in range(len(torch_rows))]).numpy()
    assert rows["image"].dtype == np.float32 and np.array_equal(rows["image"], expected)
    assert np.array_equal(rows["sigma"], np.array([float(torch_rows[i]["sigma"]) for i in range(len(torch_rows))], np.float32))
    assert list(rows["record"]) == [torch_rows[i]["record"] for i in range(len(torch_rows))]
    assert all(Path(f["filename"]).is_relative_to(tmp_path / "cache") for f in hf.cache_files)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing written next to the data"
    noisy = to_hf_dataset(root, "protected", cache_dir=tmp_path / "cache", ledger=ledger)
    assert noisy.num_rows == counts["protected"] and set(noisy["partition"]) == {1}
    with pytest.raises(InputError, match="inside the prepared directory"):
        to_hf_dataset(root, cache_dir=root / "cache", ledger=ledger)
    assert not (root / "cache").exists()


def test_without_a_cache_dir_the_arrow_files_go_to_a_new_temporary_folder(digits: tuple[Path, Path]) -> None:
    import tempfile

    root, ledger = digits
    hf = to_hf_dataset(root, "clean", ledger=ledger)
    file = Path(hf.cache_files[0]["filename"])
    folder = next(p for p in file.parents if p.name.startswith("sfbd-guard-hf-"))
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and hf.num_rows == _card(root)["counts"]["clean"]
    finally:
        shutil.rmtree(folder)


def test_the_losses_are_the_engines() -> None:
    x = torch.randn(8, 1, 4, 4)

    def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t) / (1 + sigma.view(-1, 1, 1, 1))

    floors = torch.tensor([0.0, 0.6] * 4)
    ours = ambient_loss(denoiser, x, floors, generator=torch.Generator().manual_seed(1))
    engine = AmbientLoss()(denoiser, x, floors, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, engine) and ours.shape == (8,)
    same = ambient_loss(denoiser, x, 0.6, generator=torch.Generator().manual_seed(2))  # one sigma for the batch
    assert torch.equal(same, AmbientLoss()(denoiser, x, torch.full((8,), 0.6), generator=torch.Generator().manual_seed(2)))
    assert torch.equal(edm_loss(denoiser, x, generator=torch.Generator().manual_seed(3)),
                       AmbientLoss()(denoiser, x, torch.zeros(8), generator=torch.Generator().manual_seed(3)))


class _Shrink(torch.nn.Module):
    """D(x; σ) = x / (1 + σ²) · w: a denoiser with one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.w * x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def test_denoise_round_is_the_engines_backward_step(digits: tuple[Path, Path]) -> None:
    root, ledger = digits
    noisy = PreparedDataset(root, "protected", ledger=ledger)
    mean = denoise_round(_Shrink(), noisy, spec=DenoiseSpec(solver="mean"), floor=0.2)
    y = torch.stack([noisy[i]["image"] for i in range(len(noisy))])
    assert isinstance(mean, RoundSet) and len(mean) == len(noisy) and mean.stored.dtype == torch.uint8
    assert torch.equal(mean.stored, to_uint8((y / (1 + 0.36)).clamp(-1, 1)))  # the posterior mean, quantized
    item = mean[5]
    assert item["partition"] == "denoised" and float(item["sigma"]) == pytest.approx(0.2)
    assert item["record"] == noisy[5]["record"] and item["image"].dtype == torch.float32
    heun = denoise_round(_Shrink(), y[:7], 0.6, quantize=False)  # a tensor of copies: the engine's heun, float16
    assert heun.stored.dtype == torch.float16 and heun.images.shape == (7, 1, 8, 8)
    with pytest.raises(InputError, match="clean partition only"):
        denoise_round(_Shrink(), PreparedDataset(root, "clean", ledger=ledger))
    with pytest.raises(ValueError, match="needs their sigma"):
        denoise_round(_Shrink(), y[:2])


def _doc_loop() -> str:
    text = (REPO / "docs" / "byo-trainer.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text.split("## A complete loop", 1)[1], flags=re.S)
    assert len(blocks) == 1, "docs/byo-trainer.md's loop is one python block"
    return blocks[0]


def _replace(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, old
    return code.replace(old, new)


def test_the_documented_loop_runs(digits: tuple[Path, Path]) -> None:
    """docs/byo-trainer.md's loop as written, on the CPU, for a handful of steps."""
    root, ledger = digits
    code = _replace(_doc_loop(), 'Path("prepared/digits"), Path("guard-ledger")', f"Path({str(root)!r}), Path({str(ledger)!r})")
    code = _replace(code, "PRETRAIN_STEPS, ROUND_STEPS, BATCH = 2000, 1000, 64", "PRETRAIN_STEPS, ROUND_STEPS, BATCH = 3, 2, 16")
    code = _replace(code, "Accelerator()", "Accelerator(cpu=True)")
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/byo-trainer.md", "exec"), namespace)
    assert math.isfinite(namespace["pretrain_loss"]) and math.isfinite(namespace["round_loss"])
    round_set = namespace["round_set"]
    assert isinstance(round_set, RoundSet) and round_set.images.shape == (_card(root)["counts"]["protected"], 1, 8, 8)
    assert round_set.images.dtype == torch.float32 and float(round_set.images.abs().max()) <= 1


def test_byo_loads_neither_the_dataset_readers_nor_hf_datasets() -> None:
    """The trainer side's boundary (test_prepared.py) holds for these modules too; `datasets` loads only when asked."""
    code = ("import sys; import sfbd_guard.byo; "
            "print([m for m in sys.modules if m.startswith(('sfbd_guard.datasets', 'sfbd_guard.curation')) or m == 'datasets'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]", out
