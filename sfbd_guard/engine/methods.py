"""Training methods as data: one table says what each method's stages train on, and the schedule cuts them.

- clean-only: the clean partition.
- noisy-direct: clean ∪ the noisy copies, as if they were clean (the naive baseline).
- ambient: clean data at all noise levels, the noisy copies with the ambient/Tweedie loss at noise
  levels above their own (Daras et al. 2024).
- sfbd: pretrain on clean; then rounds of (denoise every noisy copy with the EMA model by the
  backward ODE from its sigma; fine-tune on clean ∪ denoised) (Lu, Wu, Yu 2025, Alg. 1).
- online-sfbd: pretrain on clean; then one run in which a bank of denoised copies (one slot per
  record) is refreshed chunk by chunk with the current EMA model, its loss weight ramping from 0
  to 1 (Lu, Lo, Yu 2025).
Every method gets the same compute budget (schedule.budget_kimg()).

Everything else reads this table: the pipeline config (method names, schedule checks, privacy.stages),
the SFBD data side (`sfbd.py`: which sources a phase's mixture holds, their noise floors and shares) and
the DP planner (`privacy.py`: which phases are private by default, their Poisson rates and step counts).
Adding a method that reuses these stages and sources is one name in `Method` and one row in `METHODS`.
This module imports nothing from the package, so every other module can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol, get_args

Method = Literal["clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd"]
Stage = Literal["train", "pretrain", "rounds", "online"]  # how the schedule cuts a stage into phases, below
SourceName = Literal["clean", "noisy", "denoised", "bank"]
# how a stage trains on the noisy copies (every stage trains with the ambient loss, whose noise floor 0 is EDM's loss):
# as-clean, as if they were clean images (floor 0); above-sigma, only at noise levels above their own sigma
NoisyCopies = Literal["as-clean", "above-sigma"]

# which training sources hold one row per protected record (the privacy unit): all but the clean partition
PROTECTED: dict[SourceName, bool] = {
    "clean": False,  # the clean partition (uint8 shards)
    "noisy": True,  # the protected records' noisy copies y = x + σε, as stored
    "denoised": True,  # an SFBD round's denoised set: every noisy copy denoised by the EMA model (rounds/)
    "bank": True,  # online SFBD's bank: one denoised slot per record, refreshed between steps
}


@dataclass(frozen=True)
class StageSpec:
    """One stage of a method: what it trains on, at which noise levels its noisy copies count, and whether DP-SGD
    trains it by default."""

    stage: Stage
    sources: tuple[SourceName, ...]  # clean first; a fine-tuning stage has exactly one other source
    noisy_copies: NoisyCopies  # as-clean: noise floor 0 for every image; above-sigma: the noisy copies keep their σ
    private: bool  # trained with DP-SGD when privacy is on and privacy.stages is not given
    fine_tune: bool = False  # SFBD fine-tuning: sfbd.transfer_ema, the full EMA half-life, sfbd.clean_weight shares

    @property
    def reads_protected(self) -> bool:
        return any(PROTECTED[source] for source in self.sources)


METHODS: dict[Method, tuple[StageSpec, ...]] = {
    "clean-only": (StageSpec("train", ("clean",), "as-clean", private=False),),
    "noisy-direct": (StageSpec("train", ("clean", "noisy"), "as-clean", private=True),),
    "ambient": (StageSpec("train", ("clean", "noisy"), "above-sigma", private=True),),
    "sfbd": (StageSpec("pretrain", ("clean",), "as-clean", private=False),
             StageSpec("rounds", ("clean", "denoised"), "as-clean", private=True, fine_tune=True)),
    "online-sfbd": (StageSpec("pretrain", ("clean",), "as-clean", private=False),
                    StageSpec("online", ("clean", "bank"), "as-clean", private=True, fine_tune=True)),
}
if set(METHODS) != set(get_args(Method)):
    raise AssertionError("methods.METHODS and methods.Method must name the same methods")


def stages_of(method: Method) -> tuple[Stage, ...]:
    return tuple(spec.stage for spec in METHODS[method])


def default_private_stages(method: Method) -> tuple[Stage, ...]:
    return tuple(spec.stage for spec in METHODS[method] if spec.private)


class Schedule(Protocol):
    """What the plan reads of `config.ScheduleSpec` (a protocol, so this module needs no import of it)."""

    @property
    def pretrain_kimg(self) -> float: ...
    @property
    def rounds(self) -> int: ...
    @property
    def round_kimg(self) -> float: ...
    def budget_kimg(self) -> float: ...


@dataclass(frozen=True)
class Phase:
    name: str  # shown in metrics: "train", "pretrain", "round-1", "online"
    round: int  # SFBD round; 0 outside rounds
    end_kimg: float  # the phase ends when this many thousand images have been seen in the run
    spec: StageSpec  # what the phase trains on


def _cut(spec: StageSpec, schedule: Schedule, pretrain_end: float | None) -> list[Phase]:
    """The phases of one stage: the whole budget, the pretraining, one per SFBD round, or the rest."""
    budget = schedule.budget_kimg()
    if spec.stage == "train":
        return [Phase("train", 0, budget, spec)]
    if spec.stage == "pretrain":
        return [Phase("pretrain", 0, min(schedule.pretrain_kimg if pretrain_end is None else pretrain_end, budget), spec)]
    if spec.stage == "rounds":
        if pretrain_end is None:
            return [Phase(f"round-{k}", k, schedule.pretrain_kimg + k * schedule.round_kimg, spec)
                    for k in range(1, schedule.rounds + 1)]
        if pretrain_end >= budget:  # pretraining took the whole budget: no round
            return []
        length = (budget - pretrain_end) / schedule.rounds
        return [Phase(f"round-{k}", k, budget if k == schedule.rounds else pretrain_end + k * length, spec)
                for k in range(1, schedule.rounds + 1)]
    return [Phase("online", 1, budget, spec)]


def plan(method: Method, schedule: Schedule, pretrain_end: float | None = None) -> list[Phase]:
    """The method's phases in order, each ending at a point of the run's image count. `pretrain_end`: where the
    pretraining ended (or may end at the latest) when the run decides it (`schedule.pretrain_until: converged`):
    the rounds share the rest of the budget."""
    return [phase for spec in METHODS[method] for phase in _cut(spec, schedule, pretrain_end)]


def converged(checks: list[list[float]], window: float, tol: float) -> bool:
    """`schedule.pretrain_until: converged`: `checks` are (kimg, validation loss) in order; True when the last loss
    is less than `tol` (relative) below the best loss of the checks at least `window` kimg before it."""
    kimg, loss = checks[-1]
    earlier = [value for at, value in checks if at <= kimg - window + 1e-9]
    return bool(earlier) and loss > (1 - tol) * min(earlier)


def phase_steps(phases: list[Phase], global_batch: int) -> list[int]:
    """Optimizer steps of each phase, as the trainer's loop takes them.

    The loop steps while images seen < end_kimg × 1000, adding the global batch per step, so the run
    has taken ceil(end × 1000 / batch) steps when a phase ends (exact: a float's Fraction), or as many as
    before if an earlier phase already went past its end.
    """
    counts, done = [], 0
    for phase in phases:
        until = max(done, -(-Fraction(phase.end_kimg * 1000) // global_batch))
        counts.append(int(until) - done)
        done = int(until)
    return counts
