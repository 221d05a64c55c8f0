"""Attacks on what a resumed run reads back from its run directory: SFBD's round sets and online SFBD's bank.

A run resumed inside an SFBD round trains on the round set it made then (rounds/round-XX/, .npy shards whose
sha256 the checkpoint records); a checkpoint holds the online bank as of its step (bank.npy, its sha256 in
the state). A changed, truncated or swapped file is refused with one error naming it, never trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import pipeline_of_run, train
from sfbd_guard.errors import InputError
from sfbd_guard.hashing import sha256_file
from sfbd_guard.policy.model import load_policy

SFBD_SCHEDULE = {"pretrain_kimg": 0.064, "rounds": 2, "round_kimg": 0.048}  # round 1: steps 5-7
ONLINE_SCHEDULE = {"pretrain_kimg": 0.064, "total_kimg": 0.128, "refresh_every": 2, "refresh_size": 100}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An sfbd run stopped inside round 1 and an online-sfbd run stopped inside its online phase."""
    from sfbd_guard.engine import trainer

    tmp = tmp_path_factory.mktemp("trainmem-resume")
    data = prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.75)))).output
    runs = {}
    real_step = trainer.Trainer.train_step
    for method, schedule, stop in (("sfbd", SFBD_SCHEDULE, 6), ("online-sfbd", ONLINE_SCHEDULE, 7)):
        def crash(self, mixture, phase, stop=stop):  # type: ignore[no-untyped-def]
            if self.state.step == stop:
                raise KeyboardInterrupt
            real_step(self, mixture, phase)

        pipeline = tiny_pipeline(data, tmp / method, method=method, schedule=schedule, checkpoint_every=1,
                                 denoise={"steps": 4, "batch": 1024})
        trainer.Trainer.train_step = crash  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                train(load_pipeline(write_policy(tmp / f"{method}.yaml", pipeline)), resume=False)
        finally:
            trainer.Trainer.train_step = real_step  # type: ignore[method-assign]
        runs[method] = tmp / method
    return runs


def _copy(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / run.name))


def _resume(run: Path) -> None:
    train(pipeline_of_run(run), resume=True)


def test_a_changed_round_shard_is_refused(crashed: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(crashed["sfbd"], tmp_path)
    shard = run / "rounds" / "round-01" / "part-00000.npy"
    array = np.load(shard)
    array[0] = 255 - array[0]  # an edited denoised image
    np.save(shard, array)
    with pytest.raises(InputError, match=r"round-01/part-00000\.npy: does not match the sha256"):
        _resume(run)


def test_a_truncated_round_shard_is_refused(crashed: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(crashed["sfbd"], tmp_path)
    shard = run / "rounds" / "round-01" / "part-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"part-00000\.npy: does not match the sha256"):
        _resume(run)


def test_a_swapped_round_set_with_a_rehashed_round_json_is_refused(crashed: dict[str, Path], tmp_path: Path) -> None:
    """A forger who replaces the shards and re-hashes round.json: the checkpoint's record of the shards differs."""
    run = _copy(crashed["sfbd"], tmp_path)
    folder = run / "rounds" / "round-01"
    shard = folder / "part-00000.npy"
    np.save(shard, np.zeros_like(np.load(shard)))
    meta = json.loads((folder / "round.json").read_text())
    meta["shards"]["part-00000.npy"] = sha256_file(shard)
    (folder / "round.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"round-01: its shards are not those recorded in the checkpoint"):
        _resume(run)


def test_a_deleted_round_set_is_refused_not_remade(crashed: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(crashed["sfbd"], tmp_path)
    shutil.rmtree(run / "rounds" / "round-01")
    with pytest.raises(InputError, match=r"round-01/round\.json: missing"):
        _resume(run)


def test_a_changed_checkpoint_bank_is_refused(crashed: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(crashed["online-sfbd"], tmp_path)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    bank = np.load(latest / "bank.npy")
    np.save(latest / "bank.npy", np.zeros_like(bank))
    with pytest.raises(InputError, match=r"bank\.npy: does not match the sha256 recorded in the checkpoint"):
        _resume(run)
    (latest / "bank.npy").unlink()
    with pytest.raises(InputError, match=r"bank\.npy: missing"):
        _resume(run)


def test_the_untampered_copies_resume(crashed: dict[str, Path], tmp_path: Path) -> None:
    for method in ("sfbd", "online-sfbd"):
        run = _copy(crashed[method], tmp_path)
        _resume(run)
        assert (run / "checkpoints" / "latest").read_text() in ("step-000000010", "step-000000008")


@pytest.mark.parametrize(("method", "key", "value"), [
    ("sfbd", "round_set", "../../../etc/passwd"),  # a path where the record of the round's shards belongs
    ("sfbd", "round_set", {"round": 1, "shards": ["part-00000.npy"]}),
    ("sfbd", "entered_phase", "1"),
    ("sfbd", "validation", {"history": [], "best": {"before": "round-1"}}),  # would be a KeyError mid-run
    ("online-sfbd", "bank_cursor", "0; rm -rf /"),
    ("online-sfbd", "online_start_step", None),  # the cursor without its start step
])
def test_a_forged_training_state_is_refused_before_any_step(crashed: dict[str, Path], tmp_path: Path, method: str,
                                                            key: str, value: object) -> None:
    """The checkpoint's `info` (engine/state.py) is JSON inside state.safetensors: a value of the wrong shape is
    refused on resume with one error naming the checkpoint and the key, and the run directory is left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = _copy(crashed[method], tmp_path)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    with safe_open(latest / "state.safetensors", framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    state = json.loads(meta["state"])
    assert key in state["info"] or value is None, "positive control: the forged key is one the run really wrote"
    if value is None:
        del state["info"][key]
    else:
        state["info"][key] = value
    save_file(tensors, latest / "state.safetensors", metadata={**meta, "state": json.dumps(state)})
    _resume_in_place = pipeline_of_run(run)  # a copied run records its new folder in its config first, by design

    def files() -> dict[Path, bytes]:
        return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    before = files()
    with pytest.raises(InputError, match=rf"state\.safetensors: state\.info\.(bank_cursor|{key})"):
        train(_resume_in_place, resume=True)
    after = files()
    assert {k for k in after if after[k] != before.get(k)} <= {Path("config.resolved.yaml")}, "nothing else changed"
