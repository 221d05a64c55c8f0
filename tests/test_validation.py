"""SFBD's validation measure (engine/validation.py): SURE against the true error, held-back copies never trained
on, rounds that make the model worse rolled back, the run ending on its best model, and the measure in the metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.diffusion.sampling import denoise_backward
from sfbd_guard.engine.config import DenoiseSpec, ValidationSpec, load_pipeline
from sfbd_guard.engine.data import RowSubset, TensorImages
from sfbd_guard.engine.service import train
from sfbd_guard.engine.validation import Measure, Validator, _sure, held_back_rows
from sfbd_guard.policy.model import load_policy


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.2, 1.0), sigma=st.floats(0.2, 1.2), shrink=st.floats(0.0, 1.2), seed=st.integers(0, 2**16))
def test_sure_estimates_the_error_against_the_originals(scale: float, sigma: float, shrink: float, seed: int) -> None:
    """For a smooth nonlinear denoiser, SURE (from the noisy copies alone) matches the mean squared error against
    the clean images (the independent oracle), within its sampling error."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((512, 1, 8, 8), generator=gen) * scale
    y = x + sigma * torch.randn(x.shape, generator=gen)

    def f(v: torch.Tensor) -> torch.Tensor:  # shrinkage with a soft nonlinearity
        return shrink * torch.tanh(v) + 0.1 * v

    probes = (torch.randint(0, 2, (2, *y.shape), generator=gen) * 2 - 1).float()
    estimate = _sure(f, y, sigma, probes)
    truth = ((f(y) - x) ** 2).mean(dim=(1, 2, 3)).double()
    spread = float((estimate - truth).std()) / math.sqrt(len(y))
    assert abs(float(estimate.mean()) - float(truth.mean())) < 4 * spread + 1e-3


def test_a_negative_denoised_floor_is_refused_naming_the_key(tmp_path: Path) -> None:
    from sfbd_guard.errors import InputError

    path = write_policy(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tmp_path / "run", sfbd={"denoised_floor": -0.1}))
    with pytest.raises(InputError, match="denoised_floor"):
        load_pipeline(path)


def test_held_back_rows_are_seeded_bounded_and_off_for_small_sets() -> None:
    spec = ValidationSpec()
    rows = held_back_rows(10_000, spec, seed=3)
    assert len(rows) == 256 and rows.unique().numel() == 256 and bool((rows[1:] > rows[:-1]).all())
    assert torch.equal(rows, held_back_rows(10_000, spec, seed=3)) and not torch.equal(rows, held_back_rows(10_000, spec, 4))
    assert len(held_back_rows(2000, spec, 0)) == 100  # 5 %
    assert len(held_back_rows(255, spec, 0)) == 0  # 64 would be over a quarter of the copies
    assert len(held_back_rows(10_000, ValidationSpec(enabled=False), 0)) == 0


def test_the_measure_ranks_a_better_denoiser_first() -> None:
    """Two 'models' on Gaussian data: the exact posterior mean measures lower than a worse shrinkage, and its
    round PSNR matches the true PSNR of its output."""
    gen = torch.Generator().manual_seed(0)
    sigma, scale = 0.6, 0.5
    x = torch.randn((256, 1, 8, 8), generator=gen) * scale
    noisy = TensorImages(x + sigma * torch.randn(x.shape, generator=gen))

    class Shrink(torch.nn.Module):
        def __init__(self, factor: float | None) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=v.dtype).reshape(-1, 1, 1, 1)
            optimal = scale**2 / (scale**2 + t**2)  # the posterior mean of Gaussian data at noise t
            return v * (optimal if self.factor is None else self.factor)

    validator = Validator(noisy, torch.arange(256), sigma, DenoiseSpec(steps=8, grid="fitted", rho=2, sigma_min=0.02),
                          ValidationSpec(probes=2), seed=0, device=torch.device("cpu"))
    best, worse = validator.measure(Shrink(None)), validator.measure(Shrink(0.9))
    assert best.loss < worse.loss
    assert validator.measure(Shrink(None)) == best  # paired: the same inputs every time

    # a posterior sampler: SURE with the sampler's noise held fixed estimates the error of the very draws it makes
    sde = DenoiseSpec(steps=6, grid="fitted", rho=2, sigma_min=0.02, solver="sde")
    sampling = Validator(noisy, torch.arange(256), sigma, sde, ValidationSpec(probes=2), seed=0,
                         device=torch.device("cpu"))
    measured = sampling.measure(Shrink(None))
    draws = denoise_backward(Shrink(None), noisy.gather(torch.arange(256)), sigma, steps=6, grid="fitted", rho=2,
                             sigma_min=0.02, solver="sde", seeds=(sampling.noise_seed, torch.arange(256))).clamp(-1, 1)
    true_psnr = 10 * math.log10(4.0 / float(((draws - x) ** 2).mean()))
    assert measured.round_psnr == pytest.approx(true_psnr, abs=0.3)
    assert measured.round_psnr < best.round_psnr - 1.5  # a draw is ~3 dB farther from x than the posterior mean
    assert sampling.measure(Shrink(None)) == measured


@pytest.fixture(scope="module")
def digits_mid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits-val")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.5)))).output


def _run(tmp_path: Path, data: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    overrides = {"schedule": {"pretrain_kimg": 0.064, "rounds": 2, "round_kimg": 0.048}, **overrides}
    pipeline = tiny_pipeline(data, tmp_path / name, method="sfbd", denoise={"steps": 4, "batch": 1024}, **overrides)
    return train(load_pipeline(write_policy(tmp_path / f"{name}.yaml", pipeline)), resume=False)


def test_held_back_copies_are_never_trained_on(tmp_path: Path, digits_mid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = RowSubset.gather

    def spy(self: RowSubset, rows: torch.Tensor) -> torch.Tensor:
        seen.append(self.keep[rows])
        return original(self, rows)

    monkeypatch.setattr(RowSubset, "gather", spy)
    outcome = _run(tmp_path, digits_mid, "held")
    import json

    protected = json.loads((digits_mid / "card.json").read_text())["counts"]["protected"]
    held = held_back_rows(protected, outcome.config.validation, outcome.config.seed)
    assert len(held) == 64 and seen, "the denoised rounds draw through the subset"
    assert not set(torch.cat(seen).tolist()) & set(held.tolist())
    rows = [r for r in pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist() if r["validation"] is not None]
    assert [r["phase"] for r in rows] == ["pretrain", "round-1", "round-2"]  # before round 1, before round 2, the end
    assert all(r["round_psnr"] > 0 and r["decision"] for r in rows)


def test_a_round_that_measures_worse_is_rolled_back(tmp_path: Path, digits_mid: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure says round 1's model is worse than the pretrained one and round 2's the best: round 2 starts
    from the pretrained weights, and the run ends on round 2's model; with a worse end, on the best earlier one."""
    losses = iter([1.0, 2.0, 0.5])
    kept: dict[str, dict[str, torch.Tensor]] = {}

    def scripted(self: Validator, net: torch.nn.Module, batch: int = 256) -> Measure:
        kept[f"m{len(kept)}"] = {k: v.clone() for k, v in net.state_dict().items()}
        return Measure(loss=next(losses), round_psnr=20.0)

    monkeypatch.setattr(Validator, "measure", scripted)
    outcome = _run(tmp_path, digits_mid, "rollback", validation={"keep_best": True})
    rows = [r for r in pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist() if r["validation"] is not None]
    assert [r["decision"] for r in rows] == ["best so far", "worse: rolled back to the model before round-1", "best so far"]
    final = load_file(outcome.checkpoint / "ema.safetensors")
    assert all(torch.equal(final[k], kept["m2"][k]) for k in final), "the end model is the best: kept as it is"

    losses2 = iter([1.0, 0.8, 3.0])
    kept.clear()
    monkeypatch.setattr(Validator, "measure",
                        lambda self, net, batch=256: (kept.__setitem__(f"m{len(kept)}", {k: v.clone() for k, v in
                                                      net.state_dict().items()}), Measure(next(losses2), 20.0))[1])
    outcome = _run(tmp_path, digits_mid, "end-worse", validation={"keep_best": True})
    final = load_file(outcome.checkpoint / "ema.safetensors")
    assert all(torch.equal(final[k], kept["m1"][k]) for k in final), "the run ends on the best model (before round 2)"
    assert not all(torch.equal(final[k], kept["m2"][k]) for k in final)


def test_without_keep_best_the_measure_only_records(tmp_path: Path, digits_mid: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    losses = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(Validator, "measure", lambda self, net, batch=256: Measure(next(losses), 20.0))
    outcome = _run(tmp_path, digits_mid, "record")
    rows = [r for r in pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist() if r["validation"] is not None]
    assert [r["decision"] for r in rows] == ["best so far"] + ["worse than the model before round-1 (kept: "
                                                               "validation.keep_best is off)"] * 2
    outcome = _run(tmp_path, digits_mid, "off", validation={"enabled": False})
    assert all(r["validation"] is None for r in pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist())


def test_bf16_autocast_on_a_cpu_with_native_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision: bf16 runs the network in bf16 on a CPU that computes it natively, and stays fp32 elsewhere."""
    from sfbd_guard.engine import runtime

    net = torch.nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda native=native: native)
        with runtime.Runtime(torch.device("cpu"), precision="bf16").autocast():
            assert net(x).dtype == expected
    with runtime.Runtime(torch.device("cpu"), precision="fp32").autocast():
        assert net(x).dtype == torch.float32


def test_the_report_reads_the_measure_from_the_metrics(tmp_path: Path) -> None:
    """The HTML report's validation table: the measured rows of metrics.parquet; none from a run that predates it."""
    import pyarrow as pa

    from sfbd_guard.compliance.html import validation_rows
    from sfbd_guard.engine.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.parquet")
    log.append(step=1, kimg=0.064, round=0, phase="pretrain", loss=0.5, lr=1e-3, seconds_per_kimg=1.0)
    log.annotate(1, validation=0.2, round_psnr=21.5, decision="best so far")
    log.append(step=2, kimg=0.128, round=1, phase="round-1", loss=0.4, lr=1e-3, seconds_per_kimg=1.0)
    log.write()
    assert [(r["step"], r["validation"], r["decision"]) for r in validation_rows(tmp_path / "metrics.parquet")] == [
        (1, 0.2, "best so far")]
    pq.write_table(pa.table({"step": [1], "phase": ["train"], "loss": [0.5]}), tmp_path / "old.parquet")
    assert validation_rows(tmp_path / "old.parquet") == [] and validation_rows(tmp_path / "missing.parquet") == []


# ----- schedule.pretrain_until: converged -------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=1, max_size=30), st.floats(0.5, 5), st.floats(0, 0.5))
def test_converged_against_its_definition(losses: list[float], window: float, tol: float) -> None:
    """The rule, against a direct reading of its definition: the checks are one kimg apart."""
    from sfbd_guard.engine.methods import converged

    checks = [[float(k + 1), loss] for k, loss in enumerate(losses)]
    now = len(losses)
    before = [loss for k, loss in enumerate(losses, start=1) if k <= now - window]
    expected = bool(before) and not losses[-1] <= (1 - tol) * min(before)
    assert converged(checks, window, tol) == expected


ADAPTIVE = {"pretrain_kimg": 0.032, "rounds": 2, "total_kimg": 0.16, "pretrain_until": "converged",
            "check_every_kimg": 0.016, "converge_window_kimg": 0.032, "converge_tol": 0.05}  # 10 steps of 16 images


def _scripted_losses(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Validator.loss gives `values` in turn (pretraining's checks), then 1.0 (the measures before the rounds)."""
    it = iter(values)
    monkeypatch.setattr(Validator, "loss", lambda self, net, batch=256: next(it, 1.0))


def test_rounds_start_when_pretraining_has_converged(tmp_path: Path, digits_mid: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks after steps 1, 2, 3, 4: at step 4 the loss is less than 5 % below the best of the checks a window
    (two steps) before (0.87 against 0.9): the rounds share the other 6 steps, 3 each; the decisions are in the
    metrics."""
    _scripted_losses(monkeypatch, [1.0, 0.9, 0.88, 0.87])
    outcome = _run(tmp_path, digits_mid, "adaptive", schedule=ADAPTIVE)
    rows = pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist()
    assert [r["phase"] for r in rows] == ["pretrain"] * 4 + ["round-1"] * 3 + ["round-2"] * 3
    decisions = [r["decision"] for r in rows if r["decision"]]
    assert decisions[:4] == ["pretraining: still improving"] * 3 + ["converged: the rounds start; best so far"]
    assert (outcome.run_dir / "rounds" / "round-02").is_dir()


def test_pretraining_that_never_converges_runs_no_round(tmp_path: Path, digits_mid: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that keeps falling: the whole budget is pretraining on the clean images, no round set is made."""
    from sfbd_guard.engine import sfbd

    _scripted_losses(monkeypatch, [1.0 / (k + 1) for k in range(20)])
    monkeypatch.setattr(sfbd, "denoise_rows", lambda *a, **k: pytest.fail("no round may denoise"))
    outcome = _run(tmp_path, digits_mid, "never", schedule=ADAPTIVE)
    rows = pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist()
    assert [r["phase"] for r in rows] == ["pretrain"] * 10
    assert not (outcome.run_dir / "rounds").exists() or not any((outcome.run_dir / "rounds").iterdir())


def test_a_resume_keeps_where_pretraining_converged(tmp_path: Path, digits_mid: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in round 1: the resumed run keeps the decided pretraining end and ends on the same weights."""
    from sfbd_guard.engine import trainer

    losses = [1.0, 0.9, 0.88, 0.87]
    _scripted_losses(monkeypatch, losses)
    straight = _run(tmp_path, digits_mid, "straight", schedule=ADAPTIVE, checkpoint_every=1)
    real_step = trainer.Trainer.train_step

    def crash(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == 6:
            raise KeyboardInterrupt
        real_step(self, mixture, phase)

    _scripted_losses(monkeypatch, losses)
    monkeypatch.setattr(trainer.Trainer, "train_step", crash)
    pipeline = tiny_pipeline(digits_mid, tmp_path / "crashed", method="sfbd", denoise={"steps": 4, "batch": 1024},
                             schedule=ADAPTIVE, checkpoint_every=1)
    config = load_pipeline(write_policy(tmp_path / "crashed.yaml", pipeline))
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    _scripted_losses(monkeypatch, [0.1])  # a check now would converge later: pretraining's end is in the checkpoint
    resumed = train(config, resume=True)
    phases = [r["phase"] for r in pq.read_table(resumed.run_dir / "metrics.parquet").to_pylist()]
    assert phases == ["pretrain"] * 4 + ["round-1"] * 3 + ["round-2"] * 3
    a, b = load_file(straight.checkpoint / "ema.safetensors"), load_file(resumed.checkpoint / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_converged_pretraining_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    """Refused without the measure and with round_kimg; another method (`--method` on an SFBD pipeline) ignores it."""
    from sfbd_guard.errors import InputError

    for method in ("clean-only", "online-sfbd"):
        pipeline = tiny_pipeline(tmp_path, tmp_path / "x", method=method, schedule=ADAPTIVE)
        assert load_pipeline(write_policy(tmp_path / f"{method}.yaml", pipeline)).schedule.budget_kimg() == 0.16

    cases: list[tuple[str, dict[str, object], str]] = [
        ("sfbd", {"validation": {"enabled": False}}, "pretrain_until"),
        ("sfbd", {"schedule": {**ADAPTIVE, "round_kimg": 0.1}}, "round_kimg")]
    for method, extra, key in cases:
        pipeline = tiny_pipeline(tmp_path, tmp_path / "x", method=method, **{"schedule": ADAPTIVE, **extra})
        with pytest.raises(InputError, match=key):
            load_pipeline(write_policy(tmp_path / f"{method}.yaml", pipeline))


def test_without_held_back_copies_the_rounds_start_at_pretrain_kimg(tmp_path: Path, digits_mid: Path) -> None:
    """A set too small to hold copies back has no measure: pretraining then ends at pretrain_kimg (2 steps here),
    not at the end of the budget, and the metrics say why."""
    outcome = _run(tmp_path, digits_mid, "small", schedule=ADAPTIVE, validation={"size": 100_000})
    rows = pq.read_table(outcome.run_dir / "metrics.parquet").to_pylist()
    assert [r["phase"] for r in rows] == ["pretrain"] * 2 + ["round-1"] * 4 + ["round-2"] * 4
    assert any("no held-back copies" in (r["decision"] or "") for r in rows)
