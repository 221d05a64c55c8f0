"""Training methods as plans of phases: what each phase trains on and until how many images.

`clean-only` trains on the clean partition; `noisy-direct` trains on clean ∪ the noisy copies as if
they were clean (the naive baseline). Every method gets the same budget (schedule.budget_kimg()).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..prepared import PreparedData
from .config import ENGINE_METHODS, PipelineConfig
from .data import ImagePool, clean_images, noisy_images


@dataclass(frozen=True)
class Phase:
    name: str  # shown in metrics ("train", "pretrain", "round-1", ...)
    round: int  # SFBD round; 0 outside rounds
    end_kimg: float  # the phase ends when this many thousand images have been seen in the run
    pool: str  # what it trains on: "clean" | "clean+noisy"


def plan(config: PipelineConfig) -> list[Phase]:
    budget = config.schedule.budget_kimg()
    if config.method == "clean-only":
        return [Phase("train", 0, budget, "clean")]
    if config.method == "noisy-direct":
        return [Phase("train", 0, budget, "clean+noisy")]
    raise InputError(f"method {config.method!r} is not available in this version of the engine",
                     hint=f"choose one of: {', '.join(ENGINE_METHODS)}")


def build_pool(phase: Phase, data: PreparedData) -> ImagePool:
    if phase.pool == "clean":
        pool = ImagePool.of(clean_images(data))
    else:
        pool = ImagePool.of(clean_images(data), noisy_images(data))
    if len(pool) == 0:
        raise InputError(f"{data.root}: phase {phase.name!r} has no images to train on ({phase.pool} is empty)")
    return pool
