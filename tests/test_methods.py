"""SFBD, online SFBD and the baselines on tiny data: end to end, record order, schedules, resume."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import DenoiseSpec, load_pipeline
from sfbd_guard.engine.denoise import denoise_rows
from sfbd_guard.engine.methods import plan
from sfbd_guard.engine.runtime import Runtime
from sfbd_guard.engine.service import train
from sfbd_guard.engine.sfbd import linear_ramp
from sfbd_guard.policy.model import load_policy

SFBD_SCHEDULE = {"pretrain_kimg": 0.064, "rounds": 2, "round_kimg": 0.048}  # 4 + 3 + 3 steps of 16


@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits8m")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.75)))).output


def _protected_count(data: Path) -> int:
    return json.loads((data / "card.json").read_text())["counts"]["protected"]


def _round_set(run: Path, round_: int) -> torch.Tensor:
    """An SFBD round's denoised set as written under rounds/round-XX/ (.npy shards in record order)."""
    folder = run / "rounds" / f"round-{round_:02d}"
    return torch.from_numpy(np.concatenate([np.load(p) for p in sorted(folder.glob("part-*.npy"))]))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _config(tmp_path: Path, data: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    overrides.setdefault("denoise", {"steps": 6, "batch": 1024})
    return load_pipeline(write_policy(tmp_path / f"{name}.yaml", tiny_pipeline(data, tmp_path / name, **overrides)))


@pytest.mark.parametrize("method", ["clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd"])
def test_each_method_runs_end_to_end(tmp_path: Path, digits8: Path, method: str) -> None:
    schedule = dict(SFBD_SCHEDULE)
    if method == "online-sfbd":
        schedule = {"pretrain_kimg": 0.064, "total_kimg": 0.16, "refresh_every": 2, "refresh_size": 200}
    outcome = train(_config(tmp_path, digits8, method, method=method, schedule=schedule), resume=False)
    assert outcome.step == 10
    metrics = pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist()
    assert all(row["loss"] == row["loss"] and row["loss"] < 1e3 for row in metrics), "finite losses"
    phases = [row["phase"] for row in metrics]
    expected = {"sfbd": ["pretrain"] * 4 + ["round-1"] * 3 + ["round-2"] * 3,
                "online-sfbd": ["pretrain"] * 4 + ["online"] * 6}.get(method, ["train"] * 10)
    assert phases == expected
    if method == "sfbd":
        rounds = sorted(p.name for p in (outcome.run_dir / "rounds").iterdir())
        assert rounds == ["round-01", "round-02"]
        denoised = _round_set(outcome.run_dir, 1)
        assert denoised.dtype == torch.uint8 and denoised.shape == (_protected_count(digits8), 1, 8, 8)
        assert {p.name for p in (outcome.run_dir / "snapshots").iterdir()} >= {"grid-round-1.png", "grid-round-2.png"}


def test_plans_follow_the_schedule(tmp_path: Path, digits8: Path) -> None:
    config = _config(tmp_path, digits8, "p1", method="sfbd", schedule={"pretrain_kimg": 10, "rounds": 3, "round_kimg": 5})
    sfbd = plan(config.method, config.schedule)
    assert [(p.name, p.round, p.end_kimg) for p in sfbd] == [("pretrain", 0, 10), ("round-1", 1, 15), ("round-2", 2, 20), ("round-3", 3, 25)]
    online = _config(tmp_path, digits8, "p2", method="online-sfbd", schedule={"pretrain_kimg": 10, "total_kimg": 30})
    assert [(p.name, p.end_kimg) for p in plan(online.method, online.schedule)] == [("pretrain", 10), ("online", 30)]
    assert online.schedule.ramp() == (10, 15)
    baseline = _config(tmp_path, digits8, "p3", method="noisy-direct", schedule={"pretrain_kimg": 10, "rounds": 3, "round_kimg": 5})
    assert plan(baseline.method, baseline.schedule)[-1].end_kimg == 25, "baselines get the same budget as sfbd"


def test_ramp_is_linear_between_its_ends() -> None:
    assert [linear_ramp(k, 10, 20) for k in (0, 10, 12.5, 15, 20, 30)] == [0, 0, 0.25, 0.5, 1, 1]
    assert linear_ramp(9.9, 10, 10) == 0 and linear_ramp(10, 10, 10) == 1


def test_online_refresh_follows_the_config(tmp_path: Path, digits8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import sfbd

    calls: list[tuple[int, int, float]] = []
    real = sfbd.denoise_rows

    def spy(denoiser, noisy, rows, sigma, spec, rt, tick=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((int(rows[0]), len(rows), sigma))
        return real(denoiser, noisy, rows, sigma, spec, rt, tick, **kwargs)

    monkeypatch.setattr(sfbd, "denoise_rows", spy)
    schedule = {"pretrain_kimg": 0.064, "total_kimg": 0.256, "refresh_every": 3, "refresh_size": 150,
                "ramp_start_kimg": 0.1, "ramp_end_kimg": 0.2}
    train(_config(tmp_path, digits8, "online", method="online-sfbd", schedule=schedule), resume=False)
    # 12 online steps: the bank is filled once, then refreshed before steps 3, 6 and 9 of the phase (cyclic)
    total = _protected_count(digits8)
    assert calls == [(0, total, 0.6), (0, 150, 0.6), (150, 150, 0.6), (300 % total, 150, 0.6)]


def test_resume_mid_round_reuses_the_denoised_set(tmp_path: Path, digits8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = train(_config(tmp_path, digits8, "straight", method="sfbd", schedule=SFBD_SCHEDULE, checkpoint_every=1), resume=False)
    from sfbd_guard.engine import sfbd, trainer

    real_step = trainer.Trainer.train_step

    def crash(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == 6:  # the middle of round 1 (steps 5-7)
            raise KeyboardInterrupt
        real_step(self, mixture, phase)

    config = _config(tmp_path, digits8, "crashed", method="sfbd", schedule=SFBD_SCHEDULE, checkpoint_every=1)
    monkeypatch.setattr(trainer.Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    round_file = tmp_path / "crashed" / "rounds" / "round-01"
    before = _files(round_file)
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    denoised_rows: list[int] = []
    real_denoise = sfbd.denoise_rows
    monkeypatch.setattr(sfbd, "denoise_rows", lambda *a, **k: denoised_rows.append(len(a[2])) or real_denoise(*a, **k))
    resumed = train(config, resume=True)
    assert _files(round_file) == before
    assert denoised_rows == [_protected_count(digits8)], "only round 2 is denoised after the resume"
    assert _round_set(resumed.run_dir, 1).equal(_round_set(straight.run_dir, 1))
    steps = [row["step"] for row in pq.read_table(resumed.run_dir / "metrics.parquet").to_pylist()]
    assert steps == list(range(1, 11))
    latest = lambda run: load_file(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "ema.safetensors")  # noqa: E731
    for name, tensor in latest(straight.run_dir).items():
        assert torch.equal(tensor, latest(resumed.run_dir)[name]), name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _denoise_worker(rank: int, world: int, port: int, noisy: torch.Tensor, results: dict,  # type: ignore[type-arg]
                    solver: str = "heun") -> None:
    from sfbd_guard.diffusion.networks import UNetConfig, build_denoiser

    torch.set_num_threads(1)  # two processes on two cores: no oversubscribed OpenMP spinning
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_denoiser(UNetConfig(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=()), 8, 1)
    rows = torch.tensor([6, 0, 5, 1, 4, 2, 3])
    out = denoise_rows(net.eval(), noisy, rows, 0.6, DenoiseSpec(steps=4, batch=2, solver=solver),  # type: ignore[arg-type]
                       Runtime(torch.device("cpu"), rank, world), noise_seed=11)
    results[(world, rank)] = out
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("solver", ["heun", "sde"])
def test_denoised_set_keeps_record_order_across_1_and_2_processes(solver: str) -> None:
    """The same set from 1 and 2 processes; a posterior sample's noise follows its row, not the process."""
    noisy = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    results = mp.Manager().dict()
    _denoise_worker(0, 1, 0, noisy, results, solver)
    mp.spawn(_denoise_worker, args=(2, _free_port(), noisy, results, solver), nprocs=2)
    single = results[(1, 0)]
    assert single.shape == (7, 1, 8, 8) and single.dtype == torch.uint8
    assert torch.equal(results[(2, 0)], single) and torch.equal(results[(2, 1)], single)
    if solver == "heun":
        alone = torch.stack([_alone(noisy[i]) for i in (6, 0, 5)])  # each row is its own record's result
        assert torch.equal(single[:3], alone)


def _alone(y: torch.Tensor) -> torch.Tensor:
    results: dict = {}  # type: ignore[type-arg]
    _denoise_worker(0, 1, 0, y.unsqueeze(0).expand(7, -1, -1, -1).contiguous(), results)
    return results[(1, 0)][0]


# ----- the methods table (sfbd_guard/engine/methods.py) ------------------------------------------------------

def test_the_table_declares_every_method_and_private_stages_are_those_reading_protected_data() -> None:
    from typing import get_args

    from sfbd_guard.engine.config import PipelineConfig
    from sfbd_guard.engine.methods import METHODS, Method, Stage, default_private_stages

    assert set(METHODS) == set(get_args(Method)) == set(get_args(PipelineConfig.model_fields["method"].annotation))
    for method, stages in METHODS.items():
        assert len({spec.stage for spec in stages}) == len(stages), f"{method}: a stage appears once"
        for spec in stages:
            assert spec.stage in get_args(Stage) and spec.sources[0] == "clean"
            # a stage that reads protected-derived data must be private by default, and only those are
            assert spec.private == spec.reads_protected, f"{method} {spec.stage}"
            assert not spec.fine_tune or len(spec.sources) == 2, "fine-tuning mixes clean with one other source"
    assert {m: default_private_stages(m) for m in METHODS} == {
        "clean-only": (), "noisy-direct": ("train",), "ambient": ("train",), "sfbd": ("rounds",), "online-sfbd": ("online",)}


def test_step_counts_are_those_of_the_training_loop() -> None:
    """phase_steps (closed form) against the trainer's loop (images seen += batch while below the end)."""
    import random

    from sfbd_guard.engine.methods import METHODS, Phase, phase_steps

    spec = METHODS["sfbd"][0]
    rng = random.Random(0)
    for _ in range(500):
        ends = sorted(rng.choice([rng.uniform(0, 1), round(rng.uniform(0, 1), 3), rng.randint(0, 40) * 0.016])
                      for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.2:  # a phase that ends before the previous one (pretrain longer than the budget)
            ends.insert(0, ends[-1] + 0.05)
        batch = rng.choice([1, 7, 16, 64, 100])
        phases = [Phase(f"p{i}", 0, end, spec) for i, end in enumerate(ends)]
        nimg, expected = 0, []
        for phase in phases:
            steps = 0
            while nimg < phase.end_kimg * 1000:
                nimg += batch
                steps += 1
            expected.append(steps)
        assert phase_steps(phases, batch) == expected, (ends, batch)


def test_config_checks_follow_the_table(tmp_path: Path, digits8: Path) -> None:
    from sfbd_guard.errors import GuardError

    with pytest.raises(GuardError, match=r"method sfbd needs schedule\.rounds >= 1"):
        _config(tmp_path, digits8, "bad1", method="sfbd", schedule={"pretrain_kimg": 1})
    with pytest.raises(GuardError, match=r"method online-sfbd needs schedule\.total_kimg"):
        _config(tmp_path, digits8, "bad2", method="online-sfbd", schedule={"pretrain_kimg": 1})
    with pytest.raises(GuardError, match="method"):
        _config(tmp_path, digits8, "bad3", method="sfbd-2")
    with pytest.raises(GuardError, match="stages"):
        _config(tmp_path, digits8, "bad4", privacy={"epsilon": 1, "stages": ["rounds", "finetune"]})


# ----- sfbd.quantize ---------------------------------------------------------------------------------------

def _ema_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "ema.safetensors")


@pytest.mark.parametrize("method", ["sfbd", "online-sfbd"])
def test_quantize_false_keeps_denoised_images_in_float16(tmp_path: Path, digits8: Path, method: str) -> None:
    """sfbd.quantize: true keeps the denoised set / bank as uint8 pixels (the reference code's PNG round trip),
    false as float16 on the [-1, 1] scale, and the model trains on those values."""
    schedule = dict(SFBD_SCHEDULE) if method == "sfbd" else {"pretrain_kimg": 0.064, "total_kimg": 0.16,
                                                             "refresh_every": 2, "refresh_size": 200}
    runs, kept = {}, {}
    for quantize in (True, False):
        name = f"{method}-q{int(quantize)}"
        outcome = train(_config(tmp_path, digits8, name, method=method, schedule=schedule, checkpoint_every=1000,
                                sfbd={"quantize": quantize}), resume=False)
        runs[quantize] = outcome.run_dir
        if method == "sfbd":
            kept[quantize] = _round_set(outcome.run_dir, 1)
        else:
            kept[quantize] = torch.from_numpy(np.load(outcome.checkpoint / "bank.npy"))
    assert kept[True].dtype == torch.uint8 and kept[False].dtype == torch.float16
    assert kept[False].shape == kept[True].shape == (_protected_count(digits8), 1, 8, 8)
    floats = kept[False].float()
    assert floats.abs().max() <= 1
    on_grid = ((floats + 1) * 127.5 - ((floats + 1) * 127.5).round()).abs() < 1e-3
    assert on_grid.float().mean() < 0.5, "float16 values are not the uint8 pixels"
    if method == "sfbd":  # the same pretraining, so the first round's sets differ by the rounding only
        assert ((floats + 1) * 127.5 - kept[True].float()).abs().max() <= 0.5 + 0.25
    weights = [_ema_weights(runs[q]) for q in (True, False)]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the kept values are trained on"
