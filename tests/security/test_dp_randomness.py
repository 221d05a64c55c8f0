"""DP-SGD's randomness is secret: two private runs of one config draw different batches and noise.

Before, the Poisson batches and the Gaussian noise of the private steps came from generators seeded with
the pipeline's `seed`, which is written in the run's config.resolved.yaml: anyone with the config could
replay which records joined each step and subtract the noise from consecutive checkpoints, and the
accountant's epsilon (which assumes both are unknown) would not hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dp-secret")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.8)))).output


def _final_weights(tmp_path: Path, data: Path, name: str, private: bool) -> dict[str, torch.Tensor]:
    pipeline = tiny_pipeline(data, tmp_path / name, method="sfbd",
                             schedule={"pretrain_kimg": 0.032, "rounds": 1, "round_kimg": 0.048},
                             denoise={"steps": 3, "grid": "fitted", "batch": 1024})
    pipeline["model"]["model_channels"] = 8
    if private:
        pipeline["privacy"] = {"epsilon": 8.0, "accountant": "rdp", "physical_batch": 8}
    outcome = train(load_pipeline(write_policy(tmp_path / f"{name}.yaml", pipeline)), resume=False)
    assert outcome.checkpoint is not None
    return load_file(outcome.checkpoint / "net.safetensors")


def test_private_runs_of_one_config_differ_and_public_ones_do_not(digits: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        public = [_final_weights(tmp_path, digits, f"public{i}", private=False) for i in range(2)]
        private = [_final_weights(tmp_path, digits, f"private{i}", private=True) for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(public[0][k], public[1][k]) for k in public[0]), "positive control: the public seed reproduces"
    assert not all(torch.equal(private[0][k], private[1][k]) for k in private[0]), \
        "two private runs of the same config drew the same DP randomness: it follows from the public seed"
