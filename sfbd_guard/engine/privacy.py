"""Differential privacy (DP-SGD with Opacus) for the training phases that learn from protected data.

The privacy unit is one protected record. A private phase:

- draws Poisson batches: every record of every source of the phase's mixture joins a step
  independently, with rate q_s = expected batch × share_s / N_s (for the natural proportion all
  rates equal batch / N). Draws come from the trainer's private batch generator (seeded from the OS's
  secure random source, not the public config.seed: known batches would void the subsampling
  amplification the accountant counts on; its state is checkpointed); under
  torchrun, rank r draws only over rows r, r + W, ..., so the union is one Poisson batch;
- clips each sample's gradient to `max_grad_norm` and sums them without materialising per-sample
  gradients (`clipping.ClippedGradients`: one backward pass for the layers' output gradients,
  exact per-sample norms per layer, then each layer's gradient with the outputs' gradients scaled by
  the clipping factors; the network holds only nn.Conv2d, nn.Linear and nn.GroupNorm), in physical
  batches of `physical_batch` so memory stays bounded; Opacus' DPOptimizerFastGradientClipping (or
  its distributed version, which adds the noise on rank 0 only) adds Gaussian noise of std
  noise_multiplier × max_grad_norm to the sum and divides by the expected batch;
- steps the accountant with (noise_multiplier, q). Its history [(noise_multiplier, q, steps)] lives
  in the training state (`state.PrivacyAccount`), so a resumed run continues it, and composes over every
  private phase (all SFBD rounds) of the run.

Which phases are private by default, what each trains on and hence its Poisson rates, and how many
steps it takes all come from the methods table (`methods.METHODS`) and the schedule. The noise
multiplier is fixed before training (`plan_privacy`), for the requested (epsilon, delta) over all
private steps of the run. SFBD's denoising reads the protected copies only through the (already
private) model, so it is post-processing and needs no accounting of its own. The diffusion loss's
noise comes from the run's seeded generator (public randomness independent of the data does not weaken
the guarantee); the DP noise, like the Poisson batches, from a generator seeded from the OS's secure
random source, so knowing the run's config does not let anyone subtract it. Its state is in the
checkpoints: release the weights, not the checkpoints' state.safetensors. torch's generators are not
cryptographically secure (Opacus' secure_mode needs torchcsprng, which is no longer maintained).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ..diffusion.optim import set_lr, warmup_lr
from ..errors import InputError
from ..prepared.reader import PreparedData
from .clipping import ClippedGradients, unsupported_layers
from .config import PipelineConfig
from .data import Mixture
from .methods import PROTECTED, Phase, Stage, StageSpec, default_private_stages, phase_steps, plan, stages_of
from .runtime import Runtime
from .state import PrivacyAccount

PROTECTED_SOURCES = frozenset(name for name, protected in PROTECTED.items() if protected)
MAX_NOISE_MULTIPLIER = 50.0  # above this, training would be noise only: treat the budget as unreachable
KNOBS = ("more protected records, fewer private steps (schedule.rounds, schedule.round_kimg or schedule.total_kimg), "
         "a larger privacy.epsilon, or a smaller batch")


def private_stages(config: PipelineConfig) -> tuple[Stage, ...]:
    """privacy.stages, or the method's stages that are private by default (the methods table)."""
    assert config.privacy is not None
    given = config.privacy.stages
    stages = tuple(given) if given is not None else default_private_stages(config.method)
    available = set(stages_of(config.method))
    unknown = [s for s in stages if s not in available]
    if unknown:
        raise InputError(f"privacy.stages: method {config.method} has no stage {', '.join(unknown)}",
                         hint=f"its stages are {', '.join(sorted(available))}")
    if not stages:
        raise InputError(f"privacy: method {config.method} reads no protected data, so no stage is private",
                         hint="drop the privacy section, or list the stages to train with DP-SGD in privacy.stages")
    return stages


def source_rates(spec: StageSpec, sizes: dict[str, int], clean_weight: float | None,
                 batch: int) -> dict[str, float]:
    """Poisson rate of each source of a stage: batch × share / size (the shares of `sfbd.SFBDSources`' mixture)."""
    names = spec.sources
    present = [n for n in names if sizes[n] > 0]
    if clean_weight is not None and spec.fine_tune and len(present) == 2:
        shares = {"clean": clean_weight, names[1]: 1 - clean_weight}
    else:
        total = sum(sizes[n] for n in present)
        shares = {n: sizes[n] / total for n in present}
    return {n: batch * shares[n] / sizes[n] for n in present}


def accounting_rate(rates: Mapping[str, float]) -> float:
    """The rate that matters for a protected record: that of the protected sources (any if none)."""
    protected = [rate for name, rate in rates.items() if name in PROTECTED_SOURCES]
    return max(protected or rates.values())


@dataclass(frozen=True)
class PrivacyPlan:
    epsilon: float  # target
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float  # accounting rate (the largest one if private phases differ)
    steps: int  # private optimizer steps of the whole run
    phases: dict[str, tuple[int, float]]  # private phase name -> (steps, sample rate)
    records: int  # protected records (the privacy unit)
    stages: tuple[Stage, ...]  # the private stages
    physical_batch: int  # samples per forward/backward within a Poisson batch
    lr: float | None  # learning rate of the private steps (None: optimizer.lr)


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon spent by a history [(noise_multiplier, sample_rate, steps)] with Opacus' accountant."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, steps in history if steps):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Optimal order is the largest alpha..." from the RDP search
        return float(acc.get_epsilon(delta=delta))


def plan_privacy(config: PipelineConfig, data: PreparedData, world_size: int = 1) -> PrivacyPlan:
    """The noise multiplier for the requested (epsilon, delta) over every private step of the run.

    Raises InputError (exit 2) naming the knob to turn when the budget is out of reach.
    """
    from opacus.accountants.utils import get_noise_multiplier

    spec = config.privacy
    assert spec is not None
    stages = private_stages(config)
    n_clean, n_protected = len(data.clean.record_ids), len(data.protected.record_ids)
    sizes: dict[str, int] = {name: n_protected if protected else n_clean for name, protected in PROTECTED.items()}
    global_batch = max(1, config.batch // world_size) * world_size
    phases = plan(config.method, config.schedule)
    private: dict[str, tuple[int, float]] = {}
    for phase, steps in zip(phases, phase_steps(phases, global_batch), strict=True):
        if phase.spec.stage not in stages or steps == 0:
            continue
        rates = source_rates(phase.spec, sizes, config.sfbd.clean_weight, global_batch)
        if not rates:
            raise InputError(f"privacy: phase {phase.name} has no records to sample")
        for name, rate in rates.items():
            if rate > 1:
                raise InputError(f"privacy: phase {phase.name} expects more {name} images per batch of {global_batch} "
                                 f"than the {sizes[name]} {name} records (Poisson rate {rate:.3g} > 1)",
                                 hint="use a smaller batch (or sfbd.clean_weight closer to the natural proportion)")
        private[phase.name] = (steps, accounting_rate(rates))
    total = sum(steps for steps, _ in private.values())
    unit = n_protected or n_clean
    delta = spec.delta if spec.delta is not None else 1 / (10 * max(unit, 1))
    if total == 0:
        raise InputError(f"privacy: the private stages ({', '.join(stages)}) take no optimizer steps",
                         hint="check the schedule: a batch larger than a stage's images ends it before a step")
    q = max(rate for _, rate in private.values())  # one rate for the search: conservative if phases differ
    at_cap = epsilon_of([(MAX_NOISE_MULTIPLIER, q, total)], delta, spec.accountant)
    if at_cap > spec.epsilon:
        raise InputError(
            f"privacy.epsilon {spec.epsilon:g} is out of reach: {total} private steps at sample rate {q:.4g} "
            f"(expected batch {global_batch}; {n_protected} protected records), delta {delta:.3g}, need a noise multiplier above "
            f"{MAX_NOISE_MULTIPLIER:g} (which still spends epsilon {at_cap:.3g})",
            hint=f"use {KNOBS}; {_suggest(spec.epsilon, delta, spec.accountant, q, total, global_batch)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Optimal order is the largest alpha..." from the RDP search
        sigma = get_noise_multiplier(target_epsilon=spec.epsilon, target_delta=delta, sample_rate=q, steps=total,
                                     accountant=spec.accountant, epsilon_tolerance=0.01 * spec.epsilon)
    return PrivacyPlan(spec.epsilon, delta, spec.accountant, spec.max_grad_norm, float(sigma), q, total, private,
                       n_protected, stages, spec.physical_batch, spec.lr)


def _suggest(epsilon: float, delta: float, accountant: str, q: float, steps: int, batch: int) -> str:
    """A concrete change that fits the budget at the noise cap: the most steps, or the largest batch."""
    def fits(q_: float, steps_: int) -> bool:
        return epsilon_of([(MAX_NOISE_MULTIPLIER, q_, steps_)], delta, accountant) <= epsilon

    low, high = 0, steps  # most steps that fit at this rate
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(q, mid) else (low, mid)
    if low >= 1:
        return f"at this batch at most {low} private steps fit (the schedule has {steps})"
    smaller = next((b for b in (batch // 2**k for k in range(1, 20)) if b >= 1 and fits(q * b / batch, steps)), None)
    if smaller:
        return f"with this schedule a batch of at most {smaller} fits"
    return "even one private step does not fit: raise privacy.epsilon or privacy.delta"


def validate_model(net: torch.nn.Module) -> None:
    """Opacus' validators on the network: an unsupported layer is an InputError naming it."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.validators import ModuleValidator

    if not ModuleValidator.validate(net, strict=False) and not GradSampleHooks.validate(net, strict=False):
        return
    problems = []  # Opacus' errors do not say where: run its per-layer validators by name
    for name, module in net.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = [str(err) for err in validator(module)] if validator else []
        if not errors and list(module.buffers(recurse=False)):
            errors = ["a trainable layer with buffers (state shared across the batch)"]
        if errors:
            problems.append(f"{name} ({type(module).__name__}): {errors[0].split('. ')[0].rstrip('.')}")
    problems = problems or [str(err) for err in ModuleValidator.validate(net, strict=False)]
    raise InputError("privacy: DP-SGD cannot train this model: " + "; ".join(problems),
                     hint="replace those layers (e.g. BatchNorm → GroupNorm), or drop the privacy section")


def check_clippable(net: torch.nn.Module) -> None:
    """Every trainable layer has an exact per-sample clipping path (`clipping`), or InputError naming it."""
    problems = unsupported_layers(net)
    if problems:
        raise InputError("privacy: no per-sample gradient clipping for " + "; ".join(problems),
                         hint="DP-SGD here supports nn.Conv2d (zero padding), nn.Linear and nn.GroupNorm layers")


def new_account(privacy_plan: PrivacyPlan) -> PrivacyAccount:
    """The accountant's state of a new run (checkpointed as `RunInfo.privacy`)."""
    return PrivacyAccount(target_epsilon=privacy_plan.epsilon, delta=privacy_plan.delta,
                          accountant=privacy_plan.accountant, max_grad_norm=privacy_plan.max_grad_norm,
                          noise_multiplier=privacy_plan.noise_multiplier, sample_rate=privacy_plan.sample_rate,
                          planned_steps=privacy_plan.steps, protected_records=privacy_plan.records,
                          stages=list(privacy_plan.stages))


@dataclass(frozen=True)
class PrivateGenerators:
    """What a private step draws its randomness from (the trainer's generators, checkpointed by it)."""

    batches: torch.Generator  # Poisson batches: seeded from the OS's secure random source
    noise: torch.Generator  # DP noise: likewise (the loss's own noise levels and noise are the trainer's, public seed)


class PrivateTraining:
    """DP-SGD of one run: the plan (checked against the network) and the accountant's state.

    `account` is the accountant's state; the trainer keeps it in the training state (`RunInfo.privacy`) and hands
    a resumed run's back. `make_private` wraps the network, optimizer and data of a private phase.
    """

    def __init__(self, privacy_plan: PrivacyPlan, net: torch.nn.Module) -> None:
        validate_model(net)
        check_clippable(net)
        self.plan = privacy_plan
        self.account = new_account(privacy_plan)

    def is_private(self, phase: Phase) -> bool:
        return phase.name in self.plan.phases

    def make_private(self, phase: Phase, mixture: Mixture, *, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     generators: PrivateGenerators, runtime: Runtime, global_batch: int, base_lr: float,
                     warmup_kimg: float) -> PrivatePhase | None:
        """In the spirit of opacus' make_private: the phase's model, optimizer and data wrapped for DP-SGD (per-sample
        clipping, a noisy optimizer, Poisson batches, the accountant) if `phase` is private; None otherwise."""
        if not self.is_private(phase):
            return None
        return PrivatePhase(phase, mixture, self.plan, self.account, net=net, optimizer=optimizer,
                            generators=generators, runtime=runtime, global_batch=global_batch, lr=self.plan.lr or base_lr,
                            warmup_kimg=warmup_kimg)


class PrivatePhase:
    """One private phase: Poisson batches, clipped per-sample gradients, DP noise, accounting; `leave` detaches."""

    def __init__(self, phase: Phase, mixture: Mixture, privacy_plan: PrivacyPlan, account: PrivacyAccount, *,
                 net: torch.nn.Module, optimizer: torch.optim.Optimizer, generators: PrivateGenerators,
                 runtime: Runtime, global_batch: int, lr: float, warmup_kimg: float) -> None:
        from opacus.optimizers import DistributedDPOptimizerFastGradientClipping, DPOptimizerFastGradientClipping

        self.account = account
        sizes = torch.tensor([float(len(s.images)) for s in mixture.sources], dtype=torch.float64)
        rates = (global_batch * mixture.probs / sizes).tolist()
        self.sample_rate = accounting_rate({s.name: r for s, r in zip(mixture.sources, rates, strict=True)})
        planned = privacy_plan.phases[phase.name][1]
        if not math.isclose(self.sample_rate, planned, rel_tol=1e-9):
            raise RuntimeError(f"{phase.name}: Poisson rate {self.sample_rate} differs from the planned {planned}")
        clipper = ClippedGradients(net, privacy_plan.max_grad_norm)
        optimizer_class: Any
        if runtime.distributed:
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

            model: torch.nn.Module = DPDDP(net)  # broadcasts rank 0's weights; gradients are reduced by the optimizer
            optimizer_class = DistributedDPOptimizerFastGradientClipping
        else:
            model, optimizer_class = net, DPOptimizerFastGradientClipping
        local_batch = global_batch // runtime.world_size
        # p.grad holds the sum of clipped per-sample gradients (ClippedGradients); the optimizer sums the
        # physical batches, adds the noise and divides by the expected batch
        dp_optimizer = optimizer_class(
            optimizer, noise_multiplier=account.noise_multiplier, max_grad_norm=privacy_plan.max_grad_norm,
            expected_batch_size=local_batch, loss_reduction="mean", generator=generators.noise)
        self.net, self.model, self.optimizer, self.clipper = net, model, dp_optimizer, clipper
        self.generators, self.runtime, self.rates = generators, runtime, rates
        self.physical_batch, self.lr, self.warmup_kimg = privacy_plan.physical_batch, lr, warmup_kimg

    def leave(self, phase: Phase) -> None:
        """Detach Opacus and record the epsilon spent so far (after each round, and at the end)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.clipper.remove()
        for p in self.net.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        account = self.account
        account.epsilon = epsilon_of(account.history, account.delta, account.accountant)
        if not any(entry["phase"] == phase.name for entry in account.phases):
            account.phases.append({"phase": phase.name, "steps": account.steps, "epsilon": account.epsilon})

    # ----- one DP-SGD step --------------------------------------------------------------------------------

    def poisson_batch(self, mixture: Mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of a Poisson batch: each of its rows joins with its source's rate."""
        runtime, gen = self.runtime, self.generators.batches
        images, floors, weights = [], [], []
        for source, rate in zip(mixture.sources, self.rates, strict=True):
            rows = torch.arange(runtime.rank, len(source.images), runtime.world_size)
            rows = rows[torch.rand(len(rows), generator=gen, dtype=torch.float64) < rate]
            images.append(source.images.gather(rows))
            floors.append(torch.full((len(rows),), source.floor))
            weights.append(torch.full((len(rows),), source.weight))
        return torch.cat(images), torch.cat(floors), torch.cat(weights)

    # ----- the parts of one DP-SGD step (trainer.StepRecipe; Trainer.train_step runs them) ----------------------

    def batch(self, mixture: Mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.poisson_batch(mixture)

    def start(self, nimg: int) -> float:
        lr = warmup_lr(self.lr, nimg, self.warmup_kimg)
        set_lr(self.optimizer, lr)
        return lr

    def chunks(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Physical batches; an empty Poisson batch is one empty piece: its clipped sum is zero, the step adds noise only."""
        return tuple(torch.arange(rows).split(self.physical_batch))

    def recording(self) -> AbstractContextManager[object]:
        return self.clipper.recording()

    def backward(self, weighted: torch.Tensor) -> None:
        self.clipper.backward(weighted)  # p.grad = Σ_i clip(∇ w_i loss_i)

    def accumulate(self) -> None:
        self.optimizer.signal_skip_step(True)  # clip and accumulate only
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, nimg: int) -> None:
        """The noisy Adam step over the sum of the clipped per-sample gradients, then the accountant's count."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._account()

    def _account(self) -> None:
        account = self.account
        sigma, q = account.noise_multiplier, self.sample_rate
        last = account.history[-1] if account.history else None
        if last is not None and last[0] == sigma and last[1] == q:
            last[2] += 1
        else:
            account.history.append([sigma, q, 1])
        account.steps += 1


def summary(account: PrivacyAccount) -> dict[str, Any]:
    """The ledger's privacy fields of a run (from its accountant's state); epsilon from the history."""
    info = {**account.to_json(), "epsilon": epsilon_of(account.history, account.delta, account.accountant)}
    keys = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm",
            "target_epsilon", "stages", "protected_records", "phases", "history")
    return {key: info[key] for key in keys if key in info}
