"""The trainer: the model, EMA, optimizer, generators and state of one process of a run, and the parts the schedule
(schedule.py) is written in: entering a phase, fitting it step by step (one `train_step` for every method, with and
without DP-SGD), validating, snapshots, checkpoints and resume."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from ..diffusion.ambient import AmbientLoss
from ..diffusion.diffusers_unet import build_diffusers_denoiser
from ..diffusion.ema import EMA
from ..diffusion.networks import UNetConfig, build_denoiser
from ..diffusion.optim import make_adam, optimizer_step, warmup_lr
from ..prepared.reader import PreparedData
from ..progress import ProgressFactory
from ..rundir import RunPaths
from .checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PipelineConfig
from .data import Mixture
from .generate import generate
from .images import save_grid
from .methods import Phase, converged, plan, stages_of
from .metrics import MetricsLog
from .privacy import PrivacyPlan, PrivateGenerators, PrivatePhase, PrivateTraining, plan_privacy
from .runtime import Runtime
from .sfbd import SFBDSources
from .state import ValidationRecord
from .trackers import NoTracker, Tracker, tracked_scalars

SNAPSHOT_STEPS = 18  # sampler steps of snapshot grids
SNAPSHOT_SEED = 0  # the same images are drawn at every snapshot, so grids show progress
BEST = "best_ema."  # training-state tensors holding the EMA weights the validation measured best


def unet_config(config: PipelineConfig) -> UNetConfig:
    model = config.model
    return UNetConfig(model_channels=model.model_channels, channel_mult=tuple(model.channel_mult),
                      num_blocks=model.num_blocks, attn_resolutions=tuple(model.attn_resolutions),
                      dropout=model.dropout, num_heads=model.num_heads)


def build_net(config: PipelineConfig, image_shape: tuple[int, int, int]) -> torch.nn.Module:
    channels, resolution, _ = image_shape
    if config.network == "diffusers-unet2d":
        return build_diffusers_denoiser(unet_config(config), resolution, channels)
    return build_denoiser(unet_config(config), resolution, channels)


def private_seed() -> int:
    """A seed from the OS's secure random source, for the randomness DP-SGD's guarantee rests on."""
    return secrets.randbits(63)


class StepRecipe(Protocol):
    """The parts of one training step (Trainer.train_step). `PlainStep` is ordinary training; DP-SGD replaces every
    part, in the spirit of opacus' make_private (privacy.PrivatePhase): Poisson batches, per-sample clipping in
    physical batches, noise in the optimizer's step, and the accountant."""

    model: torch.nn.Module  # what the loss calls: the network, or its (DP-)DDP wrapper

    def batch(self, mixture: Mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's images, noise floors and loss weights of the step."""

    def start(self, nimg: int) -> float:
        """The step's learning rate (set on the optimizer); `nimg` images were seen before it."""

    def chunks(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The batch's rows in the pieces that go through the network at once."""

    def recording(self) -> AbstractContextManager[object]:
        """Around each piece's forward pass."""

    def backward(self, weighted: torch.Tensor) -> None:
        """Gradients of one piece's weighted per-image losses."""

    def accumulate(self) -> None:
        """Between pieces."""

    def update(self, nimg: int) -> None:
        """Move the weights once the last piece's gradients are in."""


class PlainStep:
    """Ordinary training: a batch of the mixture, one piece, the mean loss, EDM's sanitised Adam step."""

    def __init__(self, trainer: Trainer) -> None:
        self.model, self.net, self.optimizer = trainer.model, trainer.net, trainer.optimizer
        self.local_batch, self.generator, self.config = trainer.local_batch, trainer.batch_gen, trainer.config.optimizer

    def batch(self, mixture: Mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mixture.batch(self.local_batch, self.generator)

    def start(self, nimg: int) -> float:
        return warmup_lr(self.config.lr, nimg, self.config.warmup_kimg)

    def chunks(self, rows: int) -> tuple[torch.Tensor, ...]:
        return (torch.arange(rows),)

    def recording(self) -> AbstractContextManager[object]:
        return nullcontext()

    def backward(self, weighted: torch.Tensor) -> None:
        weighted.mean().backward()

    def accumulate(self) -> None:
        raise AssertionError("ordinary training takes its batch in one piece")

    def update(self, nimg: int) -> None:
        optimizer_step(self.optimizer, list(self.net.parameters()), base_lr=self.config.lr, cur_nimg=nimg,
                       warmup_kimg=self.config.warmup_kimg, max_grad_norm=self.config.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)


class Trainer:
    """Owns the model, EMA, optimizer and random generators of one process of a run.

    It lends them to the SFBD data side (`sfbd.SFBDSources`: the EMA model as denoiser) and to the private
    phases (`privacy.PrivateTraining`: network, optimizer, generators); neither holds the trainer.
    """

    def __init__(self, config: PipelineConfig, data: PreparedData, run_dir: Path, runtime: Runtime,
                 progress: ProgressFactory | None = None, privacy_plan: PrivacyPlan | None = None) -> None:
        """`privacy_plan`: the run's DP plan if the caller has made it already (else made here)."""
        self.config, self.data, self.run_dir, self.runtime = config, data, run_dir, runtime
        self.progress = progress if runtime.is_main else None
        torch.manual_seed(config.seed * 1000 + runtime.rank)  # dropout; its state is checkpointed too
        self.net = build_net(config, data.image_shape).to(runtime.device).train()
        if runtime.device.type == "cuda":  # faster convolutions; the DP clipper is layout-agnostic (tested)
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, halflife_kimg=config.ema.halflife_kimg, rampup_ratio=config.ema.rampup_ratio)
        self.model = DistributedDataParallel(self.net) if runtime.distributed else self.net
        self.optimizer = self._new_optimizer()
        self.loss = AmbientLoss()
        self.batch_gen = torch.Generator().manual_seed(config.seed * 1000 + runtime.rank)
        self.noise_gen = torch.Generator(runtime.device).manual_seed(config.seed * 1000 + 500 + runtime.rank)
        # DP-SGD's guarantee needs its Poisson batches and its Gaussian noise to be unknown to whoever sees the
        # weights: private phases draw them from generators seeded by the OS's secure random source, not from the
        # public config.seed (the states are in the checkpoints, so a resumed run stays exact)
        self.private_batch_gen = torch.Generator().manual_seed(private_seed()) if config.privacy else None
        self.private_noise_gen = torch.Generator(runtime.device).manual_seed(private_seed()) if config.privacy else None
        self.state = TrainingState()
        self.metrics = MetricsLog(RunPaths(run_dir).metrics)
        self.config_json = config.model_dump_json()
        self.phases = self._plan()
        self.sources = SFBDSources(config, data, run_dir, runtime, self.progress)
        self.privacy: PrivateTraining | None = None
        if config.privacy:  # validates the model; the plan fixes the noise multiplier for the budget
            self.privacy = PrivateTraining(privacy_plan or plan_privacy(config, data, runtime.world_size), self.net)
        self.private: PrivatePhase | None = None  # set while a private phase runs
        self.tracker: Tracker = NoTracker()  # the run's TensorBoard or MLflow (trackers.py), set by service.train

    @property
    def _adaptive(self) -> bool:
        """`schedule.pretrain_until: converged` for a method with SFBD rounds (the others ignore it)."""
        return self.config.schedule.pretrain_until == "converged" and "rounds" in stages_of(self.config.method)

    def _plan(self) -> list[Phase]:
        """The run's phases; with `pretrain_until: converged`, pretraining ends where the run decided (until it has,
        at the end of the budget at the latest, and no round is planned)."""
        if not self._adaptive:
            return plan(self.config.method, self.config.schedule)
        budget = self.config.schedule.budget_kimg()
        end = self.state.info.pretrain.end_kimg
        return plan(self.config.method, self.config.schedule, budget if end is None else end)

    def pretraining_converged(self) -> bool:
        """`pretrain_until: converged`: at each check point, measure the EMA model's validation loss; True (and the
        rounds planned over the rest of the budget) once it has stopped improving (`converged`)."""
        validator, schedule = self.sources.validator, self.config.schedule
        every, window = schedule.converge_window()
        kimg = self.state.nimg / 1000
        record = self.state.info.pretrain
        due = every if record.next_check_kimg is None else record.next_check_kimg
        if validator is None:  # too few protected copies to hold any back: the rounds start at pretrain_kimg
            done = kimg >= schedule.pretrain_kimg
            if done:
                self.metrics.annotate(self.state.step, decision="no held-back copies to measure convergence on: "
                                                                "the rounds start at schedule.pretrain_kimg")
        elif kimg < due:
            return False
        else:
            record.next_check_kimg = (math.floor(kimg / every) + 1) * every
            loss = validator.loss(self.ema.module, batch=self.config.denoise.batch)
            record.checks.append([kimg, loss])
            done = kimg >= schedule.pretrain_kimg and converged(record.checks, window, schedule.converge_tol)
            decision = "converged: the rounds start" if done else "pretraining: still improving"
            self.metrics.annotate(self.state.step, validation=loss, decision=decision)
        if done:
            record.end_kimg = kimg
            self.phases = self._plan()
        return done

    def _new_optimizer(self) -> torch.optim.Optimizer:
        opt = self.config.optimizer
        return make_adam(self.net.parameters(), lr=opt.lr, betas=(opt.betas[0], opt.betas[1]), eps=opt.eps)

    @property
    def local_batch(self) -> int:
        return max(1, self.config.batch // self.runtime.world_size)

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.runtime.world_size

    def resume(self) -> bool:
        """Continue from the latest checkpoint if there is one."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        self.state = load_checkpoint(path, net=self.net, ema=self.ema.module, optimizer=self.optimizer)
        rank = self.runtime.rank
        self.batch_gen.set_state(self.state.tensors[f"batch_gen.{rank}"])
        self.noise_gen.set_state(self.state.tensors[f"noise_gen.{rank}"].to(self.noise_gen.get_state().device))
        torch.set_rng_state(self.state.tensors[f"torch_rng.{rank}"])
        for name, gen in self._private_gens().items():
            gen.set_state(self.state.tensors[f"{name}.{rank}"].to(gen.get_state().device))
        if self.privacy is not None and self.state.info.privacy is not None:
            self.privacy.account = self.state.info.privacy  # the accountant's history so far
        self.metrics = MetricsLog.resume(RunPaths(self.run_dir).metrics, self.state.step)
        self.phases = self._plan()  # where a converged pretraining ended, if it has
        return True

    def _private_gens(self) -> dict[str, torch.Generator]:
        gens = {"private_batch_gen": self.private_batch_gen, "private_noise_gen": self.private_noise_gen}
        return {name: gen for name, gen in gens.items() if gen is not None}

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's generator states (gathered to rank 0, which writes the checkpoint)."""
        mine = {"batch_gen": self.batch_gen.get_state(), "noise_gen": self.noise_gen.get_state().cpu(),
                "torch_rng": torch.get_rng_state(), **{n: g.get_state().cpu() for n, g in self._private_gens().items()}}
        states = [mine]
        if self.runtime.distributed:
            import torch.distributed as dist

            states = [{} for _ in range(self.runtime.world_size)]
            dist.all_gather_object(states, mine)  # small CPU tensors: objects keep gloo and nccl simple
        return {f"{name}.{rank}": value for rank, state in enumerate(states) for name, value in state.items()}

    def train_step(self, mixture: Mixture, phase: Phase) -> None:
        """One optimizer step, the same code with and without DP-SGD: the step's parts (`recipe`) say how its batch is
        drawn, how gradients are made and how the weights move; a private phase swaps them (privacy.PrivatePhase)."""
        started = time.perf_counter()
        recipe: StepRecipe = self.private or PlainStep(self)
        images, floors, weights = recipe.batch(mixture)
        lr = recipe.start(self.state.nimg)
        losses = []
        chunks = recipe.chunks(len(images))
        for k, rows in enumerate(chunks):
            x, w = images[rows].to(self.runtime.device), weights[rows].to(self.runtime.device)
            with self.runtime.autocast(), recipe.recording():
                loss = self.loss(recipe.model, x, floors[rows], generator=self.noise_gen)
            recipe.backward(loss.float() * w)
            losses.append(loss.detach().float())
            if k < len(chunks) - 1:
                recipe.accumulate()
        recipe.update(self.state.nimg)
        self.state.nimg += self.global_batch
        self.state.step += 1
        self.ema.update(self.net, self.global_batch, self.state.nimg)
        seconds = time.perf_counter() - started
        self.metrics.append(step=self.state.step, kimg=self.state.nimg / 1000, round=phase.round, phase=phase.name,
                            loss=float(torch.cat(losses).mean()),  # NaN for an empty Poisson batch
                            lr=lr, seconds_per_kimg=seconds / self.global_batch * 1000)

    def checkpoint(self) -> Path | None:
        rng = self._rng_tensors()
        if not self.runtime.is_main:
            self.metrics.take_unsent()  # only rank 0 has a tracker
            self.runtime.barrier()
            return None
        self.state.tensors.update(rng)
        self.metrics.write()
        path = save_checkpoint(self.run_dir, net=self.net, ema=self.ema.module, optimizer=self.optimizer,
                               state=self.state, config_json=self.config_json, keep=self.config.keep_checkpoints,
                               attachments=self.sources.attachments())
        self.track()
        self.runtime.barrier()
        return path

    def track(self) -> None:
        """Hand the tracker what metrics.parquet gained since the last checkpoint: once the checkpoint is saved, so
        a resumed run (which continues from it) never sends a step twice."""
        for entry in self.metrics.take_unsent():
            values = tracked_scalars(entry)
            if values:
                self.tracker.log_scalars(int(entry["step"]), values)
        self.tracker.flush()

    def snapshot(self, name: str | None = None) -> Path | None:
        if not self.runtime.is_main:
            return None
        count = self.config.grid_size
        path = RunPaths(self.run_dir).snapshot(name or f"grid-step-{self.state.step:09d}")
        # a grid takes SNAPSHOT_STEPS sampler steps of the whole grid (minutes on a CPU): shown as they go, counted
        # in image-steps (each step of the sampler advances every image of the grid)
        tick = (self.progress(f"snapshot {path.stem} ({SNAPSHOT_STEPS} sampler steps)", SNAPSHOT_STEPS * count)
                if self.progress else None)
        images = torch.cat([batch for _, batch in generate(
            self.ema.module, seed=SNAPSHOT_SEED, count=count, shape=self.data.image_shape, steps=SNAPSHOT_STEPS,
            batch=count, device=self.runtime.device, callback=(lambda _: tick(count)) if tick else None)])
        save_grid(images, path)
        self.tracker.log_image(f"snapshots/{name or 'grid'}", self.state.step, path)  # model samples, the file itself
        return path

    # ----- the parts the schedule (schedule.py) is written in ------------------------------------------

    def remaining_phases(self) -> Iterator[tuple[int, Phase]]:
        """The phases from the one the state is in (0 for a new run, the interrupted one after a resume) to the end of
        the plan, which may grow as they go: `pretrain_until: converged` plans the rounds when pretraining ends."""
        index = self.state.phase
        while index < len(self.phases):
            yield index, self.phases[index]
            index += 1

    def enter(self, index: int) -> bool:
        """Phase `index` becomes the state's phase; True if it starts now, False if a resume re-enters it."""
        self.state.phase, self.state.round = index, self.phases[index].round
        return self.state.info.entered_phase != index

    def start_fine_tuning(self, first_entry: bool) -> None:
        """An SFBD fine-tuning phase: the EMA at its full half-life from the start; with sfbd.transfer_ema (the
        reference code's update), the weights start from the EMA's and Adam starts afresh."""
        self.ema.rampup_ratio = None
        if first_entry and self.config.sfbd.transfer_ema:
            self.net.load_state_dict(self.ema.module.state_dict())
            self.optimizer = self._new_optimizer()

    def decides_pretraining_end(self, phase: Phase) -> bool:
        """True for a pretraining whose end `pretrain_until: converged` has still to decide."""
        return self._adaptive and phase.spec.stage == "pretrain" and self.state.info.pretrain.end_kimg is None

    def refresh_bank(self) -> None:
        """Online SFBD, before each step: the bank's weight follows its ramp; every refresh_every steps a chunk of the
        bank is denoised again by the current EMA model."""
        self.sources.refresh_bank(self.ema.module, self.state)

    def make_private(self, phase: Phase, mixture: Mixture) -> PrivatePhase | None:
        """DP-SGD's wrapping of the network, optimizer and data (privacy.PrivateTraining.make_private) if `phase` is
        private; its accountant's state is checkpointed from then on."""
        if self.privacy is None or not self.privacy.is_private(phase):
            return None
        assert self.private_batch_gen is not None and self.private_noise_gen is not None
        self.state.info.privacy = self.privacy.account
        generators = PrivateGenerators(self.private_batch_gen, self.private_noise_gen)
        return self.privacy.make_private(phase, mixture, net=self.net, optimizer=self.optimizer,
                                         generators=generators, runtime=self.runtime, global_batch=self.global_batch,
                                         base_lr=self.config.optimizer.lr, warmup_kimg=self.config.optimizer.warmup_kimg)

    def fit(self, phase: Phase, mixture: Mixture, *, stop: Callable[[], bool] | None = None,
            before_step: Callable[[], None] | None = None) -> None:
        """Train on `mixture` until the run has seen `phase.end_kimg` thousand images (or `stop()` says so), one
        `train_step` at a time (DP-SGD's wrapping around the phase if it is private), with snapshots and checkpoints
        as the config asks."""
        self.private = self.make_private(phase, mixture)
        self.state.info.entered_phase = self.state.phase
        total = max(0, int(phase.end_kimg * 1000) - self.state.nimg)
        tick = self.progress(f"{phase.name}", total) if self.progress and total else None
        while self.state.nimg < phase.end_kimg * 1000:
            if stop is not None and stop():
                break
            if before_step is not None:
                before_step()
            self.train_step(mixture, phase)
            if tick:
                tick(self.global_batch)
            if self.state.step % self.config.snapshot_every == 0:
                self.snapshot()
            if self.state.step % self.config.checkpoint_every == 0:
                self.checkpoint()
        if self.private:
            self.private.leave(phase)
            self.private = None
            if self.privacy is not None:  # the budget spent so far, for the tracker
                account = self.privacy.account
                self.metrics.track(self.state.step, epsilon=account.epsilon, private_steps=account.steps)

    def validate(self, label: str) -> None:
        """SFBD's validation measure of the EMA model (validation.py) before `label` (a round, or the end): kept in
        the metrics and the training state; with validation.keep_best, a model that measures worse than the best
        so far is replaced by that one (weights and EMA), so a round that made the model worse is rolled back and
        the run ends on its best model. Every rank computes the same measure on the same inputs."""
        validator = self.sources.validator
        if validator is None:
            return
        if self.state.info.validation is None:
            self.state.info.validation = ValidationRecord()
        record = self.state.info.validation
        tick = self.progress(f"validation before {label} ({len(validator)} held-back copies)", 1) if self.progress else None
        measure = validator.measure(self.ema.module, batch=self.config.denoise.batch)
        best = record.best
        by = self.config.validation.select_by
        score = measure.loss if by == "loss" else -measure.round_psnr  # lower is better
        rolled_back = False
        if best is None or score < (best["loss"] if by == "loss" else -best["round_psnr"]):
            record.best = {"before": label, "kimg": self.state.nimg / 1000, "loss": measure.loss,
                           "round_psnr": measure.round_psnr}
            for key in [k for k in self.state.tensors if k.startswith(BEST)]:
                del self.state.tensors[key]
            if self.config.validation.keep_best:  # the checkpoints carry the best weights only when they may be needed
                self.state.tensors.update({BEST + k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()})
            decision = "best so far"
        elif self.config.validation.keep_best:
            weights = {k.removeprefix(BEST): v for k, v in self.state.tensors.items() if k.startswith(BEST)}
            self.ema.module.load_state_dict(weights)
            self.net.load_state_dict(weights)
            self.optimizer = self._new_optimizer()
            rolled_back = True
            decision = f"worse: rolled back to the model before {best['before']}"
        else:
            decision = f"worse than the model before {best['before']} (kept: validation.keep_best is off)"
        # the estimated worth of the round set the model now in place will make (sfbd.denoised_floor: auto)
        record.denoiser_psnr = best["round_psnr"] if rolled_back and best is not None else measure.round_psnr
        record.history.append({"before": label, "kimg": self.state.nimg / 1000, "loss": measure.loss,
                               "round_psnr": measure.round_psnr, "decision": decision})
        self.metrics.annotate(self.state.step, validation=measure.loss, round_psnr=measure.round_psnr, decision=decision)
        if tick:
            tick(1)
