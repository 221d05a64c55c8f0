"""Training methods as plans of phases: what each phase trains on and until how many images.

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
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .config import PipelineConfig


@dataclass(frozen=True)
class Phase:
    name: str  # shown in metrics: "train", "pretrain", "round-1", "online"
    round: int  # SFBD round; 0 outside rounds
    end_kimg: float  # the phase ends when this many thousand images have been seen in the run
    pool: str  # clean | clean+noisy | ambient | sfbd | online


def plan(config: PipelineConfig) -> list[Phase]:
    schedule = config.schedule
    budget = schedule.budget_kimg()
    if config.method in ("clean-only", "noisy-direct", "ambient"):
        pool = {"clean-only": "clean", "noisy-direct": "clean+noisy", "ambient": "ambient"}[config.method]
        return [Phase("train", 0, budget, pool)]
    pretrain = Phase("pretrain", 0, min(schedule.pretrain_kimg, budget), "clean")
    if config.method == "sfbd":
        rounds = [Phase(f"round-{k}", k, schedule.pretrain_kimg + k * schedule.round_kimg, "sfbd")
                  for k in range(1, schedule.rounds + 1)]
        return [pretrain, *rounds]
    if config.method == "online-sfbd":
        return [pretrain, Phase("online", 1, budget, "online")]
    raise InputError(f"unknown method {config.method!r}")
