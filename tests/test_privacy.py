"""DP-SGD (Opacus) in the stages that learn from protected data: accounting, clipping, validation, resume, DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine import trainer as trainer_module
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.runtime import Runtime
from sfbd_guard.engine.service import train, train_recorded
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared

EPSILON = 8.0
FIXED_PRIVATE_SEED = 20261202  # tests that compare two private runs fix the secret seed of the DP randomness
SCHEDULE = {"pretrain_kimg": 0.032, "rounds": 2, "round_kimg": 0.048}  # 2 clean steps, then 3 + 3 private steps of 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny models on busy shared cores: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 px digits, a quarter of them: about 40 clean and 400 protected records."""
    tmp = tmp_path_factory.mktemp("digits-dp")
    policy = digits_policy(tmp / "prepared")
    policy["rules"].insert(0, {"name": "drop", "action": "exclude", "sample": {"fraction": 0.75, "seed": 3}})
    return prepare(load_policy(write_policy(tmp / "policy.yaml", policy))).output


def _pipeline(tmp_path: Path, data: Path, name: str, **overrides: object) -> dict:
    overrides.setdefault("method", "sfbd")
    overrides.setdefault("schedule", SCHEDULE)
    overrides.setdefault("privacy", {"epsilon": EPSILON, "accountant": "rdp", "physical_batch": 8})
    pipeline = tiny_pipeline(data, tmp_path / name, **overrides)
    pipeline["model"]["model_channels"] = 8
    pipeline.update(denoise={"steps": 3, "grid": "fitted", "batch": 1024}, checkpoint_every=2)
    return pipeline


def _config(tmp_path: Path, data: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    return load_pipeline(write_policy(tmp_path / f"{name}.yaml", _pipeline(tmp_path, data, name, **overrides)))


def _ledger_privacy(ledger: Path) -> dict:
    rows = duckdb.sql(f"SELECT summary FROM read_parquet('{ledger}/train/*.parquet') WHERE status = 'ok'").fetchall()
    assert len(rows) == 1
    return json.loads(rows[0][0])["privacy"]


def _ema(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "ema.safetensors")


@pytest.fixture(scope="module")
def straight(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One uninterrupted private SFBD run, recorded in its own ledger."""
    tmp = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "private_seed", lambda: FIXED_PRIVATE_SEED)  # compared with a resumed run below
        outcome = train_recorded(_config(tmp, digits, "run"), resume=False, ledger=tmp / "ledger", command=["test"],
                                 allow_unrecorded=True)  # `digits` was prepared without a ledger event
    return outcome.run_dir, _ledger_privacy(tmp / "ledger")


def test_reported_epsilon_equals_opacus_accountant_on_the_same_parameters(digits: Path, straight: tuple[Path, dict]) -> None:
    run, privacy = straight
    data = open_prepared(digits)
    n_clean, n_protected = len(data.clean.record_ids), len(data.protected.record_ids)
    q, steps, delta = 16 / (n_clean + n_protected), 6, 1 / (10 * n_protected)
    sigma = get_noise_multiplier(target_epsilon=EPSILON, target_delta=delta, sample_rate=q, steps=steps,
                                 accountant="rdp", epsilon_tolerance=0.01 * EPSILON)
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert privacy["noise_multiplier"] == pytest.approx(sigma)
    assert privacy["sample_rate"] == pytest.approx(q) and privacy["steps"] == steps
    assert privacy["delta"] == pytest.approx(delta) and privacy["accountant"] == "rdp"
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert EPSILON * 0.98 <= privacy["epsilon"] <= EPSILON, "the whole budget, composed over both rounds"
    rounds = privacy["phases"]
    assert [r["phase"] for r in rounds] == ["round-1", "round-2"] and [r["steps"] for r in rounds] == [3, 6]
    assert rounds[0]["epsilon"] < rounds[1]["epsilon"] == pytest.approx(privacy["epsilon"])
    phases = [row["phase"] for row in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert phases == ["pretrain"] * 2 + ["round-1"] * 3 + ["round-2"] * 3, "clean pretraining stays non-private"


def test_resume_keeps_the_accountant_state(digits: Path, straight: tuple[Path, dict], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import trainer as module

    real_step = module.Trainer.train_step

    def crash_in_round_2(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == 7:
            raise KeyboardInterrupt
        real_step(self, mixture, phase)

    config = _config(tmp_path, digits, "crashed")
    monkeypatch.setattr(module, "private_seed", lambda: FIXED_PRIVATE_SEED)  # the straight run's secret, to compare
    monkeypatch.setattr(module.Trainer, "train_step", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.setattr(module.Trainer, "train_step", real_step)
    monkeypatch.setattr(module, "private_seed", lambda: FIXED_PRIVATE_SEED + 1)  # a resume must restore, not re-seed
    latest = tmp_path / "crashed" / "checkpoints" / "latest"
    assert latest.read_text() == "step-000000006"
    with __import__("safetensors").safe_open(latest.parent / latest.read_text() / "state.safetensors", "pt") as handle:
        saved = json.loads(handle.metadata()["state"])["info"]["privacy"]
    assert saved["steps"] == 4 and saved["history"][0][2] == 4, "4 private steps in the checkpoint"
    resumed = train(config, resume=True)
    run, privacy = straight
    assert resumed.privacy["history"] == privacy["history"]
    assert resumed.privacy["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-12)
    for name, tensor in _ema(run).items():
        assert torch.equal(tensor, _ema(resumed.run_dir)[name]), name


def test_per_sample_gradients_are_clipped(digits: Path, tmp_path: Path) -> None:
    from sfbd_guard.engine.trainer import Trainer

    clip = 1e-3
    config = _config(tmp_path, digits, "clip", method="ambient", schedule={"pretrain_kimg": 0.032},
                     privacy={"epsilon": EPSILON, "max_grad_norm": clip, "physical_batch": 5})
    trainer = Trainer(config, open_prepared(digits), tmp_path / "clip", Runtime(torch.device("cpu")))
    phase = trainer.phases[0]
    assert phase.name == "train"  # the baselines' single phase reads the noisy copies: private by default
    trainer.privacy.account.noise_multiplier = 0.0  # so the update is exactly the clipped mean
    trainer.enter(0)
    mixture = trainer.sources.mixture(phase)
    private = trainer.private = trainer.make_private(phase, mixture)
    params = dict(trainer.net.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    generators = trainer.private_batch_gen.get_state(), trainer.noise_gen.get_state()
    applied: dict[str, torch.Tensor] = {}
    adam_step = trainer.optimizer.step

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        applied.update({name: p.grad.clone() for name, p in params.items()})
        return adam_step(*args, **kwargs)

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    trainer.train_step(mixture, phase)  # the one training step, with DP-SGD's parts
    private.leave(phase)

    # the same batch and loss noise again, per-sample gradients one sample at a time, clipped by hand
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(before[name])
    trainer.private_batch_gen.set_state(generators[0])
    trainer.noise_gen.set_state(generators[1])
    images, floors, weights = private.poisson_batch(mixture)
    assert len(images) > 5 and (floors > 0).any()  # several physical batches; noisy copies with their floor
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = []
    for rows in torch.arange(len(images)).split(5):  # the physical batches draw the loss noise in this order
        losses = trainer.loss(trainer.net, images[rows], floors[rows], generator=trainer.noise_gen)
        for i, row in enumerate(rows):
            grads = torch.autograd.grad(losses[i] * weights[row], list(params.values()), retain_graph=True)
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            norms.append(float(norm))
            factor = min(1.0, clip / (float(norm) + 1e-6))
            for (name, _), g in zip(params.items(), grads, strict=True):
                expected[name] += factor * g
    assert min(norms) > 10 * clip, "every sample's gradient is above the clipping norm"
    total = torch.sqrt(sum(g.square().sum() for g in applied.values()))
    assert float(total) <= clip * len(images) / trainer.local_batch * (1 + 1e-4)
    for name in params:
        torch.testing.assert_close(applied[name], expected[name] / trainer.local_batch, rtol=1e-3, atol=1e-9)


def test_an_empty_poisson_batch_takes_a_noise_only_step_and_is_accounted(digits: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine.trainer import Trainer

    clip, noise_multiplier = 0.5, 2.0
    config = _config(tmp_path, digits, "empty", method="ambient", schedule={"pretrain_kimg": 0.032},
                     privacy={"epsilon": EPSILON, "max_grad_norm": clip, "physical_batch": 5})
    trainer = Trainer(config, open_prepared(digits), tmp_path / "empty", Runtime(torch.device("cpu")))
    phase = trainer.phases[0]
    trainer.privacy.account.noise_multiplier = noise_multiplier
    trainer.enter(0)
    mixture = trainer.sources.mixture(phase)
    private = trainer.private = trainer.make_private(phase, mixture)
    shape = trainer.data.image_shape
    monkeypatch.setattr(private, "poisson_batch", lambda _: (torch.zeros((0, *shape)), torch.zeros(0), torch.zeros(0)))
    applied: list[torch.Tensor] = []
    adam_step = trainer.optimizer.step

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        applied.extend(p.grad.clone() for p in trainer.net.parameters())
        return adam_step(*args, **kwargs)

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    steps_before = private.account.steps
    trainer.train_step(mixture, phase)
    assert private.account.steps == steps_before + 1  # the step counts towards epsilon like any other
    assert sum(h[2] for h in private.account.history) == private.account.steps
    noise = torch.cat([g.flatten() for g in applied])
    expected_std = noise_multiplier * clip / trainer.local_batch  # noise on a zero sum, over the expected batch
    assert abs(float(noise.mean())) < 0.05 * expected_std
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)
    private.leave(phase)


def test_private_steps_use_their_own_learning_rate(digits: Path, tmp_path: Path) -> None:
    """privacy.lr applies to the private rounds only; the clean pretraining keeps optimizer.lr."""
    config = _config(tmp_path, digits, "lr", optimizer={"lr": 2e-3, "warmup_kimg": 0},
                     privacy={"epsilon": EPSILON, "accountant": "rdp", "physical_batch": 8, "lr": 1e-4})
    run = train(config, resume=False).run_dir
    lrs = {(row["phase"], row["lr"]) for row in pq.read_table(run / "metrics.parquet").to_pylist()}
    assert lrs == {("pretrain", 2e-3), ("round-1", 1e-4), ("round-2", 1e-4)}


def test_batchnorm_is_refused_with_a_clear_message(cli, digits: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import trainer as module

    real_build = module.build_net

    def with_batchnorm(config, shape):  # type: ignore[no-untyped-def]
        net = real_build(config, shape)
        net.inner.enc[0].norm0 = torch.nn.BatchNorm2d(net.inner.enc[0].norm0.num_channels)
        return net

    monkeypatch.setattr(module, "build_net", with_batchnorm)
    pipeline = _pipeline(tmp_path, digits, "bn")
    pipeline.pop("privacy")
    path = write_policy(tmp_path / "bn.yaml", pipeline)
    done = cli("train", "--pipeline", path, "--dp-epsilon", "10", "--allow-unrecorded")
    assert done.code == 2
    assert "inner.enc.0.norm0 (BatchNorm2d)" in done.err and "BatchNorm" in done.err and "GroupNorm" in done.err
    assert not (tmp_path / "bn" / "checkpoints").exists()


def test_unreachable_epsilon_is_refused_up_front_naming_the_knobs(cli, digits: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pipeline = _pipeline(tmp_path, digits, "tight")
    pipeline.pop("privacy")
    path = write_policy(tmp_path / "tight.yaml", pipeline)
    done = cli("train", "--pipeline", path, "--dp-epsilon", "0.01", "--dp-accountant", "rdp", "--allow-unrecorded")
    assert done.code == 2, done.err
    assert "privacy.epsilon 0.01 is out of reach" in done.err
    for knob in ("more protected records", "schedule.rounds", "larger privacy.epsilon", "smaller batch"):
        assert knob in done.err
    assert not (tmp_path / "tight").exists(), "nothing written"


def test_dp_flags_map_to_privacy_keys(cli, digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.engine import service

    seen = {}

    def capture(config, **kwargs):  # type: ignore[no-untyped-def]
        seen["privacy"] = config.privacy
        return service.TrainOutcome(tmp_path, config, None, 0, 0.0, False, 0.0)

    monkeypatch.setattr(service, "train_recorded", capture)
    pipeline = _pipeline(tmp_path, digits, "flags")
    pipeline.pop("privacy")
    path = write_policy(tmp_path / "flags.yaml", pipeline)
    done = cli("train", "--pipeline", path, "--dp-epsilon", "3", "--dp-delta", "1e-6", "--dp-max-grad-norm", "0.5",
               "--dp-accountant", "rdp", "--dp-stages", "pretrain,rounds", "--dp-physical-batch", "4", "--dp-lr", "2e-4")
    assert done.code == 0, done.err
    assert seen["privacy"].model_dump() == {"epsilon": 3.0, "delta": 1e-6, "max_grad_norm": 0.5, "accountant": "rdp",
                                            "stages": ["pretrain", "rounds"], "physical_batch": 4, "lr": 2e-4}
    assert cli("train", "--pipeline", path, "--dp-accountant", "gdp").code == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, pipeline: str, results: dict) -> None:  # type: ignore[type-arg]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sfbd_guard.engine import schedule
    from sfbd_guard.engine import trainer as module

    real_run, real_step = schedule.run_schedule, module.Trainer.train_step
    models = set()

    def step_and_note(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.private:
            models.add(type(self.private.model).__name__)
        real_step(self, mixture, phase)

    def run_and_report(trainer):  # type: ignore[no-untyped-def]
        final = real_run(trainer)
        flat = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
        results[rank] = {"weights": flat.tolist(), "models": sorted(models)}
        return final

    schedule.run_schedule = run_and_report  # type: ignore[assignment]
    module.Trainer.train_step = step_and_note
    outcome = train(load_pipeline(Path(pipeline)), resume=False)
    results[rank] = {**results[rank], "privacy": outcome.privacy}


def test_two_process_gloo_run_with_opacus_ddp(digits: Path, tmp_path: Path) -> None:
    path = write_policy(tmp_path / "ddp.yaml", _pipeline(tmp_path, digits, "ddp"))
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(_free_port(), str(path), results), nprocs=2)
    assert results[0]["models"] == ["DifferentiallyPrivateDistributedDataParallel"]
    assert results[0]["weights"] == results[1]["weights"], "noise added once, gradients reduced: ranks stay in sync"
    privacy = results[0]["privacy"]
    assert privacy == results[1]["privacy"] and privacy["steps"] == 6  # global batch 16 = 2 × 8, same schedule
    assert EPSILON * 0.98 <= privacy["epsilon"] <= EPSILON
    steps = [row["phase"] for row in pq.read_table(tmp_path / "ddp" / "metrics.parquet").to_pylist()]
    assert steps == ["pretrain"] * 2 + ["round-1"] * 3 + ["round-2"] * 3


# ----- per-sample clipping without per-sample gradients (sfbd_guard/engine/clipping.py) ----------------

def _brute_force(layer_or_net: torch.nn.Module, losses: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each sample's gradient over the trainable parameters, one backward pass per sample."""
    params = [p for p in layer_or_net.parameters() if p.requires_grad]
    return [list(torch.autograd.grad(losses[i], params, retain_graph=True)) for i in range(len(losses))]


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Conv2d(6, 5, 3, padding=1), (4, 6, 8, 8)),
    (torch.nn.Conv2d(8, 4, 3, padding=1), (4, 8, 8, 8)),
    (torch.nn.Conv2d(6, 5, 3, padding=1), (4, 6, 4, 4)),
    (torch.nn.Conv2d(7, 4, 1), (4, 7, 4, 4)),
    (torch.nn.Conv2d(6, 4, 3, padding=2, stride=2, dilation=2, groups=2), (4, 6, 7, 7)),
    (torch.nn.Conv2d(3, 4, (3, 1), padding=(1, 0), bias=False), (4, 3, 5, 6)),
    (torch.nn.Linear(5, 3), (4, 5)),
    (torch.nn.Linear(5, 3), (4, 2, 5)),
    (torch.nn.GroupNorm(2, 6), (4, 6, 3, 3)),
], ids=["conv3x3-8px", "conv3x3-8px-narrow", "conv3x3-4px", "conv1x1", "conv-stride-dilation-groups", "conv-3x1-nobias", "linear",
        "linear-3d", "groupnorm"])
def test_layer_norms_and_clipped_sums_match_per_sample_gradients(layer: torch.nn.Module, shape: tuple) -> None:
    from sfbd_guard.engine import clipping

    torch.manual_seed(0)
    layer = layer.double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(shape, dtype=torch.float64)
    out = layer(x)
    grad = torch.randn_like(out)  # the gradient of Σ_i loss_i with respect to the layer's output
    per_sample = _brute_force(layer, (out * grad).flatten(1).sum(1))
    expected = torch.stack([sum(g.square().sum() for g in grads) for grads in per_sample])
    methods = [None, "ghost", "direct", "grouped"] if isinstance(layer, torch.nn.Conv2d) else [None]
    for method in methods:
        got = (clipping._conv2d_norms(layer, x, grad, method) if method
               else clipping.per_sample_squared_norms(layer, x, grad))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=f"method {method}")
    factors = torch.rand(shape[0], dtype=torch.float64)
    clipped = clipping.clipped_sum(layer, x, grad, factors)
    for k, p in enumerate(layer.parameters()):
        torch.testing.assert_close(clipped[p].reshape(p.shape), sum(f * grads[k] for f, grads in zip(factors, per_sample, strict=True)),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol, memory_format, network", [
    (torch.float64, 1e-12, torch.contiguous_format, "ddpmpp"), (torch.float32, 1e-5, torch.contiguous_format, "ddpmpp"),
    (torch.float32, 1e-5, torch.channels_last, "ddpmpp"), (torch.float64, 1e-12, torch.contiguous_format, "diffusers-unet2d")],
    ids=["float64", "float32", "float32-channels-last", "diffusers-unet2d-float64"])
def test_clipped_gradients_match_brute_force_on_the_unet(dtype: torch.dtype, rtol: float,
                                                         memory_format: torch.memory_format, network: str) -> None:
    """Every block kind of our U-Net (attention, down/up sampling, skip convs, embedding MLP), in the
    memory layouts the trainer uses (channels_last on CUDA); and diffusers' UNet2DModel (network diffusers-unet2d)."""
    from sfbd_guard.diffusion.diffusers_unet import build_diffusers_denoiser
    from sfbd_guard.diffusion.networks import UNetConfig, build_denoiser
    from sfbd_guard.engine.clipping import ClippedGradients

    torch.manual_seed(1)
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    build = build_diffusers_denoiser if network == "diffusers-unet2d" else build_denoiser
    net = build(cfg, 8, 1).double().train()
    for p in net.parameters():  # EDM zero-initialises some layers: random weights exercise every term
        torch.nn.init.normal_(p, std=0.3)
    x, sigma = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.2

    def losses(model: torch.nn.Module) -> torch.Tensor:
        return (model(x.to(dtype), sigma.to(dtype)) - x.to(dtype)).square().flatten(1).mean(1)

    per_sample = _brute_force(net, losses(net))  # the float64 reference
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    clip = float(norms.sort().values[2:4].mean())  # half of the samples are clipped
    net = net.to(dtype=dtype, memory_format=memory_format)
    x = x.to(memory_format=memory_format)
    clipper = ClippedGradients(net, clip)
    with clipper.recording():
        batch_losses = losses(net)
    clipper.backward(batch_losses)
    torch.testing.assert_close(clipper.norms.double(), norms, rtol=rtol, atol=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).sum() == 3
    summed = [sum(f * grads[k] for f, grads in zip(factors, per_sample, strict=True)) for k in range(len(per_sample[0]))]
    largest = max(float(g.abs().max()) for g in summed)  # a parameter whose gradient is ~0 in exact arithmetic (the
    for (name, p), expected in zip(net.named_parameters(), summed, strict=True):  # attention's key bias) is held to
        scale = max(float(expected.abs().max()), 1e-6 * largest)  # the rounding of the gradient as a whole
        torch.testing.assert_close(p.grad.double(), expected, rtol=rtol, atol=rtol * scale, msg=name)
    clipped_norms = torch.stack([torch.sqrt(sum((f * g).square().sum() for g in grads))
                                 for f, grads in zip(factors, per_sample, strict=True)])
    assert float(clipped_norms.max()) <= clip * (1 + 1e-9)
    clipper.remove()
    with clipper.recording():
        net(x.to(dtype), sigma.to(dtype))
    assert not clipper._records, "no hooks after remove()"


def test_layers_without_a_clipping_path_are_refused_by_name() -> None:
    from sfbd_guard.engine.clipping import ClippedGradients
    from sfbd_guard.engine.privacy import check_clippable
    from sfbd_guard.errors import InputError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding="same"), torch.nn.LayerNorm(2), torch.nn.Conv2d(2, 2, 1))
    with pytest.raises(InputError, match=r"0 \(Conv2d with padding 'same'.*1 \(LayerNorm\)"):
        check_clippable(net)
    check_clippable(net[2])
    shared = torch.nn.Linear(3, 3)
    tied = torch.nn.Sequential(shared, shared)
    clipper = ClippedGradients(tied, 1.0)
    with pytest.raises(RuntimeError, match="used twice"), clipper.recording():
        tied(torch.randn(2, 3))
