"""Training in bounded memory: memory-mapped partitions give today's batches, the noise check streams,
SFBD's round sets are fingerprinted .npy shards, online SFBD's bank is a mapped file each checkpoint captures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from helpers import digits_policy, key_file, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.data import MappedImages, Mixture, Source, TensorImages
from sfbd_guard.engine.service import pipeline_of_run, train
from sfbd_guard.hashing import sha256_file
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.mapped import MappedRows
from sfbd_guard.prepared.noise_check import check_protected
from sfbd_guard.prepared.reader import open_prepared

SFBD_SCHEDULE = {"pretrain_kimg": 0.064, "rounds": 2, "round_kimg": 0.048}  # 4 + 3 + 3 steps of 16
ONLINE_SCHEDULE = {"pretrain_kimg": 0.064, "total_kimg": 0.192, "refresh_every": 2, "refresh_size": 100}  # 4 + 8


@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits8tm")
    policy = digits_policy(tmp / "prepared", drop=0.75)
    policy["noise"]["key_file"] = str(key_file(tmp / "keys", secret=bytes(range(32))))
    return prepare(load_policy(write_policy(tmp / "policy.yaml", policy))).output


def _config(tmp_path: Path, data: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    overrides.setdefault("denoise", {"steps": 6, "batch": 1024})
    return load_pipeline(write_policy(tmp_path / f"{name}.yaml", tiny_pipeline(data, tmp_path / name, **overrides)))


def _ema(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "ema.safetensors")


def _same_ema(a: Path, b: Path) -> bool:
    left, right = _ema(a), _ema(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# ----- the same batches as before -------------------------------------------------------------------------

# sha256 of 6 batches of 9 drawn by Mixture.batch as it was before memory mapping (commit d34763f: sources held
# as float32 tensors), from the fixed shards below, per (seed, shares)
BEFORE = {(0, None): "ef3c331ec0f14146b2910de4b4714104cbf7216297846de4a2b21cb381077b65",
          (0, (0.3, 0.7)): "48fa9dfe72f4119080a3d75338d2c07b4a6156a7111f4c6685ab665439fa51df",
          (1, None): "b391f8f3e090c41e92a0aa6a24831067b88bde1fe0482754475c8f6bde42b787",
          (1, (0.3, 0.7)): "4b6bea0129604fc953ad48079f52c95050d0a6b3fede0bb631c8ae26aaf2842a"}


def _fixed_shards(folder: Path) -> tuple[list[Path], list[Path], list[tuple[int, int]], list[tuple[int, int]]]:
    """Clean uint8 and noisy float16 shards of uneven sizes, and a manifest order that interleaves them."""
    rng = np.random.default_rng(14)
    clean = [rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8) for n in (5, 7)]
    noisy = [(rng.standard_normal((n, 3, 4, 4)) * 0.7).astype(np.float16) for n in (6, 3, 4)]
    order = np.random.default_rng(15)
    c = [(s, r) for s, n in enumerate((5, 7)) for r in range(n)]
    p = [(s, r) for s, n in enumerate((6, 3, 4)) for r in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arrays in (("clean", clean), ("noisy", noisy)):
        paths.append([folder / f"{name}-{k}.npy" for k in range(len(arrays))])
        for path, array in zip(paths[-1], arrays, strict=True):
            np.save(path, array)
    return paths[0], paths[1], [c[i] for i in order.permutation(len(c))], [p[i] for i in order.permutation(len(p))]


def _mapped(paths: list[Path], order: list[tuple[int, int]], dtype: type) -> MappedImages:
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    assert all(isinstance(a, np.memmap) for a in arrays)
    index = np.array(order)
    return MappedImages(MappedRows(arrays, index[:, 0], index[:, 1], (3, 4, 4), np.dtype(dtype)))


def _in_memory(paths: list[Path], order: list[tuple[int, int]]) -> TensorImages:
    """What engine/data.py built before: the rows stacked in manifest order, converted to float32 at once."""
    arrays = [np.load(p) for p in paths]
    stacked = np.stack([arrays[s][r] for s, r in order])
    if stacked.dtype == np.uint8:
        return TensorImages(torch.from_numpy(stacked).float() / 127.5 - 1.0)
    return TensorImages(torch.from_numpy(np.asarray(stacked, dtype=np.float32)))


def _digest(clean: object, noisy: object, seed: int, shares: tuple[float, float] | None) -> str:
    mixture = Mixture([Source("clean", clean), Source("noisy", noisy, floor=0.5, weight=0.25)],  # type: ignore[arg-type]
                      list(shares) if shares else None)
    generator = torch.Generator().manual_seed(seed)
    digest = hashlib.sha256()
    for _ in range(6):
        images, floors, weights = mixture.batch(9, generator)
        assert images.dtype == torch.float32 and images.shape == (9, 3, 4, 4)
        for tensor in (images, floors, weights):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("seed", "shares"), list(BEFORE))
def test_mapped_training_data_draws_the_same_batches_as_before(tmp_path: Path, seed: int,
                                                               shares: tuple[float, float] | None) -> None:
    clean, noisy, clean_order, noisy_order = _fixed_shards(tmp_path)
    mapped = _digest(_mapped(clean, clean_order, np.uint8), _mapped(noisy, noisy_order, np.float16), seed, shares)
    in_memory = _digest(_in_memory(clean, clean_order), _in_memory(noisy, noisy_order), seed, shares)
    assert mapped == in_memory == BEFORE[(seed, shares)]


def test_open_prepared_maps_the_shards_in_manifest_order(digits8: Path) -> None:
    data = open_prepared(digits8)
    manifest = pq.read_table(digits8 / "manifest.parquet").to_pylist()
    for name in ("clean", "protected"):
        part = getattr(data, name)
        rows = [r for r in manifest if r["partition"] == name]
        assert part.record_ids == [r["record_id"] for r in rows] and len(part) == len(rows)
        assert all(isinstance(a, np.memmap) for a in part.pixels.arrays), "mapped, not loaded"
        stacked = np.stack([np.load(digits8 / r["file"])[r["row"]] for r in rows])  # how it was read before
        assert np.array_equal(part.pixels.take(np.arange(len(rows))), stacked)
        assert np.array_equal(np.concatenate(list(part.pixels.blocks(7))), stacked)


def test_the_noise_check_streamed_over_shards_gives_the_same_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    noisy = (0.5 * rng.standard_normal((4500, 1, 8, 8))).astype(np.float16)
    forged = noisy.copy()
    forged[3000:3005] = (rng.integers(0, 256, (5, 1, 8, 8)) / 127.5 - 1).astype(np.float16)  # originals
    ids = [f"r{i}" for i in range(len(noisy))]
    for pixels in (noisy, forged):
        whole = check_protected(pixels, 0.5, ids)
        for cuts in ([1000, 3000], [1, 2047, 2048, 4400], [4499]):
            shards = np.split(pixels, cuts)
            assert check_protected(iter(shards), 0.5, ids) == whole, cuts
    assert check_protected(noisy, 0.5, ids).passed and not check_protected(forged, 0.5, ids).passed
    empty = np.zeros((0, 1, 8, 8), np.float16)
    assert check_protected(iter([empty]), 0.5, []) == check_protected(empty, 0.5, [])


# ----- SFBD round sets --------------------------------------------------------------------------------------

def test_a_round_set_is_uint8_shards_mapped_and_fingerprinted_in_the_checkpoint(
        tmp_path: Path, digits8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import denoise

    monkeypatch.setattr(denoise, "ROUND_SHARD_ROWS", 64)
    outcome = train(_config(tmp_path, digits8, "sfbd", method="sfbd", schedule=SFBD_SCHEDULE), resume=False)
    count = json.loads((digits8 / "card.json").read_text())["counts"]["protected"]
    folder = outcome.run_dir / "rounds" / "round-02"
    shards = sorted(folder.glob("part-*.npy"))
    assert len(shards) == -(-count // 64) > 1
    arrays = [np.load(p) for p in shards]
    assert all(a.dtype == np.uint8 and a.shape[1:] == (1, 8, 8) for a in arrays) and sum(map(len, arrays)) == count
    meta = json.loads((folder / "round.json").read_text())
    assert meta["shards"] == {p.name: sha256_file(p) for p in shards} and meta["records"] == count
    from safetensors import safe_open

    with safe_open(outcome.checkpoint / "state.safetensors", framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
    assert state["info"]["round_set"] == {"round": 2, "shards": meta["shards"]}, "the checkpoint holds the fingerprint"
    assert "bank" not in state["info"] and state["attachments"] == {}


def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    from sfbd_guard.engine import trainer

    real_step = trainer.Trainer.train_step

    def crash(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == step:
            raise KeyboardInterrupt
        real_step(self, mixture, phase)

    monkeypatch.setattr(trainer.Trainer, "train_step", crash)


def _straight_and_crashed(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, name: str, crash_step: int,
                          **overrides: object) -> tuple[Path, Any]:
    """An uninterrupted run, and the config of its twin `name` stopped by a crash at `crash_step`: (the
    uninterrupted run's directory, the twin's config to resume)."""
    straight = train(_config(tmp_path, data, "straight", **overrides), resume=False)
    config = _config(tmp_path, data, name, **overrides)
    _crash_at(monkeypatch, crash_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.undo()
    return straight.run_dir, config


# ----- online SFBD's bank -----------------------------------------------------------------------------------

def test_online_bank_is_a_mapped_file_each_checkpoint_captures_and_prunes(tmp_path: Path, digits8: Path) -> None:
    outcome = train(_config(tmp_path, digits8, "online", method="online-sfbd", schedule=ONLINE_SCHEDULE,
                            checkpoint_every=1, keep_checkpoints=3), resume=False)
    bank = outcome.run_dir / "bank" / "bank.npy"
    assert isinstance(np.load(bank, mmap_mode="r"), np.memmap)
    kept = sorted((outcome.run_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in kept] == ["step-000000010", "step-000000011", "step-000000012"]
    assert sorted(p.name for p in (outcome.run_dir / "checkpoints").rglob("bank.npy")) == ["bank.npy"] * 3
    assert (kept[-1] / "bank.npy").read_bytes() == bank.read_bytes()
    assert (kept[0] / "bank.npy").read_bytes() != bank.read_bytes(), "a refresh after step 10 changed the live bank"


def test_a_resume_from_any_kept_checkpoint_gives_the_uninterrupted_run(tmp_path: Path, digits8: Path) -> None:
    """The live bank has every refresh of the run; resuming from an earlier checkpoint must use that checkpoint's
    bank, or the training differs."""
    straight = train(_config(tmp_path, digits8, "straight", method="online-sfbd", schedule=ONLINE_SCHEDULE,
                             checkpoint_every=1, keep_checkpoints=20), resume=False)
    for step in (5, 8):  # after the bank is filled (step 4) and after two refreshes (steps 6 and 8)
        run = Path(shutil.copytree(straight.run_dir, tmp_path / f"from-{step}"))
        for later in (run / "checkpoints").glob("step-*"):
            if int(later.name.split("-")[1]) > step:
                shutil.rmtree(later)
        (run / "checkpoints" / "latest").write_text(f"step-{step:09d}")
        resumed = train(pipeline_of_run(run), resume=True)
        assert resumed.resumed and resumed.step == 12
        assert _same_ema(straight.run_dir, run), f"resumed from step {step}"


def test_a_crashed_online_run_resumes_exactly(tmp_path: Path, digits8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoint at step 9; refreshes at steps 6, 8 and 10 (before the crash)
    straight, config = _straight_and_crashed(tmp_path, digits8, monkeypatch, "crashed", 10, method="online-sfbd",
                                             schedule=ONLINE_SCHEDULE, checkpoint_every=3)
    assert train(config, resume=True).step == 12
    assert _same_ema(straight, tmp_path / "crashed")


def test_a_checkpoint_inside_the_online_phase_without_its_bank_is_refused(
        tmp_path: Path, digits8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume needs the bank as of its checkpoint: one without it (damaged, or not written by guard train) would
    silently train on another bank, so it is refused in one line, and nothing of the run is lost."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sfbd_guard.errors import InputError

    _, config = _straight_and_crashed(tmp_path, digits8, monkeypatch, "old", 10, method="online-sfbd",
                                      schedule=ONLINE_SCHEDULE, checkpoint_every=3)
    latest = tmp_path / "old" / "checkpoints" / "step-000000009"
    with safe_open(latest / "state.safetensors", framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    state = json.loads(meta["state"])
    del state["attachments"]
    save_file(tensors, latest / "state.safetensors", metadata={**meta, "state": json.dumps(state)})
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*"))
    with pytest.raises(InputError, match="holds no copy of the bank"):
        train(config, resume=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*")) == before


@pytest.mark.parametrize("method", ["sfbd", "online-sfbd"])
def test_two_process_ddp_ranks_map_the_files_rank_0_writes(tmp_path: Path, method: str) -> None:
    """Under torchrun, rank 0 writes the round sets and the bank, every rank maps them: the run ends with one
    round set per round and the bank attached to the checkpoint, as in one process."""
    import os
    import subprocess
    import sys

    from sfbd_guard.curation.service import prepare_recorded

    policy = write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.75))
    prepared = prepare_recorded(policy, data_root=None, out=None, workers=1, strict=False, overwrite=False,
                                ledger=tmp_path / "ledger", command=["test"]).output
    schedule = SFBD_SCHEDULE if method == "sfbd" else ONLINE_SCHEDULE
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run", method=method, schedule=schedule,
                                                              denoise={"steps": 4, "batch": 64}))
    env = {**os.environ, "GUARD_LEDGER": str(tmp_path / "ledger"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sfbd_guard.cli", "train", "--pipeline", str(pipeline)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    count = json.loads((prepared / "card.json").read_text())["counts"]["protected"]
    if method == "sfbd":
        assert sorted(p.name for p in (run / "rounds").iterdir()) == ["round-01", "round-02"]
        meta = json.loads((run / "rounds" / "round-02" / "round.json").read_text())
        assert meta["records"] == count and meta["shards"] == {"part-00000.npy": sha256_file(run / "rounds" / "round-02" / "part-00000.npy")}
    else:
        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
        assert np.load(latest / "bank.npy").shape == (count, 1, 8, 8)
        assert (latest / "bank.npy").read_bytes() == (run / "bank" / "bank.npy").read_bytes()
    assert not list(run.rglob("*.partial*")), "no staging files left"
