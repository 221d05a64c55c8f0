"""Every method's training schedule, in one function that reads top to bottom (`run_schedule`).

The methods table (methods.py) defines the methods: which stages each has, what each stage trains on, which are
private by default; `methods.plan` cuts the stages into phases that end at points of the run's image count. This
module says what happens in each kind of stage. The trainer (trainer.py) owns the model, EMA, optimizer, generators
and state, and takes the steps; the SFBD data side (sfbd.py) makes the round sets and the bank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..rundir import RunPaths
from .checkpoint import latest_checkpoint

if TYPE_CHECKING:
    from .trainer import Trainer


def run_schedule(t: Trainer) -> Path:
    """Train the run's method from where its state stands; the final checkpoint.

    A new run starts at the first phase. A resumed run skips the phases it finished and re-enters the one it was in:
    `first` is then False, so the model is not measured again, a round maps the round set it made, and the bank
    comes from the checkpoint. Every phase ends with a checkpoint.
    """
    finished = latest_checkpoint(t.run_dir)
    if t.state.phase >= len(t.phases) and finished is not None:
        return finished  # a resumed run that had already finished
    for index, phase in t.remaining_phases():
        first = t.enter(index)
        stage = phase.spec.stage
        if stage == "train":
            # clean-only, noisy-direct, ambient: the whole budget on the table's sources (the noisy copies as if clean,
            # or above their own sigma under the ambient loss)
            t.fit(phase, t.sources.mixture(phase))
        elif stage == "pretrain":
            # sfbd, online-sfbd: the clean images, to schedule.pretrain_kimg; with pretrain_until: converged, until
            # the validation loss on held-back noisy copies stops improving, and the rounds share what is left
            t.fit(phase, t.sources.mixture(phase),
                  stop=t.pretraining_converged if t.decides_pretraining_end(phase) else None)
        elif stage == "rounds":
            # SFBD, round k (Lu, Wu, Yu 2025, Alg. 1)
            if first:
                t.validate(phase.name)  # the model about to denoise; worse than the best so far: rolled back
            t.start_fine_tuning(first)
            t.sources.round_set(phase.round, t.ema.module, t.state, first)  # every noisy copy denoised by the EMA
            t.fit(phase, t.sources.mixture(phase))  # fine-tune on clean ∪ the round set
            t.snapshot(f"grid-{phase.name}")
        elif stage == "online":
            # online SFBD (Lu, Lo, Yu 2025): one phase over the rest of the budget
            if first:
                t.validate(phase.name)
            t.start_fine_tuning(first)
            t.sources.open_bank(t.ema.module, t.state, first)  # every noisy copy denoised once into the bank
            # fine-tune on clean ∪ the bank; before each step the bank's weight ramps 0 → 1, and every
            # schedule.refresh_every steps schedule.refresh_size of its copies are denoised again by the current EMA
            t.fit(phase, t.sources.mixture(phase), before_step=t.refresh_bank)
            t.snapshot(f"grid-{phase.name}")
        else:
            raise AssertionError(f"no schedule for stage {stage!r}")
        t.checkpoint()
    t.validate("end")
    t.state.phase = len(t.phases)
    t.snapshot()
    return t.checkpoint() or RunPaths(t.run_dir).checkpoints
