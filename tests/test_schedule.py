"""The schedule function (engine/schedule.py) against every method of the methods table: what it calls, in order,
for a new run and for a run resumed inside a phase. A recording stand-in takes the trainer's place."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest

from sfbd_guard.engine.methods import METHODS, Method, plan
from sfbd_guard.engine.schedule import run_schedule
from sfbd_guard.engine.state import RunInfo

SCHEDULE = SimpleNamespace(pretrain_kimg=1.0, rounds=2, round_kimg=1.0, budget_kimg=lambda: 3.0)


class Recorder:
    """The trainer's parts the schedule is written in; each call is noted."""

    def __init__(self, method: Method, tmp: Path, phase: int = 0, entered: int | None = None) -> None:
        self.calls: list[str] = []
        self.run_dir = tmp
        self.phases = plan(method, SCHEDULE)
        self.state = SimpleNamespace(phase=phase, info=RunInfo(entered_phase=entered))
        self.ema = SimpleNamespace(module="ema")
        recorder = self

        class Sources:
            def mixture(self, phase: Any) -> str:
                return f"mixture {phase.name}"

            def round_set(self, round_: int, denoiser: str, state: Any, first: bool) -> None:
                recorder.calls.append(f"round_set {round_} by {denoiser} first={first}")

            def open_bank(self, denoiser: str, state: Any, first: bool) -> None:
                recorder.calls.append(f"open_bank by {denoiser} first={first}")

        self.sources = Sources()

    def remaining_phases(self) -> Any:
        index = self.state.phase
        while index < len(self.phases):
            yield index, self.phases[index]
            index += 1

    def enter(self, index: int) -> bool:
        self.state.phase = index
        self.calls.append(f"enter {self.phases[index].name}")
        return self.state.info.entered_phase != index

    def validate(self, label: str) -> None:
        self.calls.append(f"validate {label}")

    def start_fine_tuning(self, first: bool) -> None:
        self.calls.append(f"start_fine_tuning first={first}")

    def decides_pretraining_end(self, phase: Any) -> bool:
        return False

    def pretraining_converged(self) -> bool:
        raise AssertionError("not asked when the end is fixed")

    def refresh_bank(self) -> None:
        raise AssertionError("called by fit, before each step")

    def fit(self, phase: Any, mixture: str, *, stop: Any = None, before_step: Any = None) -> None:
        extra = " +refresh" if before_step == self.refresh_bank else ""
        self.calls.append(f"fit {mixture}{extra}")
        self.state.info.entered_phase = self.state.phase

    def snapshot(self, name: str | None = None) -> None:
        self.calls.append(f"snapshot {name or 'final'}")

    def checkpoint(self) -> Path:
        self.calls.append("checkpoint")
        return self.run_dir / "ckpt"


EXPECTED: dict[str, list[str]] = {
    "clean-only": ["enter train", "fit mixture train", "checkpoint"],
    "noisy-direct": ["enter train", "fit mixture train", "checkpoint"],
    "ambient": ["enter train", "fit mixture train", "checkpoint"],
    "sfbd": ["enter pretrain", "fit mixture pretrain", "checkpoint"] + [
        line for k in (1, 2) for line in (
            f"enter round-{k}", f"validate round-{k}", "start_fine_tuning first=True",
            f"round_set {k} by ema first=True", f"fit mixture round-{k}", f"snapshot grid-round-{k}", "checkpoint")],
    "online-sfbd": ["enter pretrain", "fit mixture pretrain", "checkpoint", "enter online", "validate online",
                    "start_fine_tuning first=True", "open_bank by ema first=True", "fit mixture online +refresh",
                    "snapshot grid-online", "checkpoint"],
}
END = ["validate end", "snapshot final", "checkpoint"]


@pytest.mark.parametrize("method", get_args(Method))
def test_the_schedule_of_every_method_in_order(method: Method, tmp_path: Path) -> None:
    assert set(EXPECTED) == set(METHODS)
    trainer = Recorder(method, tmp_path)
    assert run_schedule(trainer) == tmp_path / "ckpt"  # type: ignore[arg-type]
    assert trainer.calls == EXPECTED[method] + END
    assert trainer.state.phase == len(trainer.phases)


def test_a_resumed_round_is_re_entered_without_measuring_or_denoising_afresh(tmp_path: Path) -> None:
    trainer = Recorder("sfbd", tmp_path, phase=2, entered=2)  # killed inside round 2
    run_schedule(trainer)  # type: ignore[arg-type]
    assert trainer.calls == ["enter round-2", "start_fine_tuning first=False", "round_set 2 by ema first=False",
                             "fit mixture round-2", "snapshot grid-round-2", "checkpoint", *END]


def test_a_round_set_made_but_not_entered_before_a_crash_starts_the_round_afresh(tmp_path: Path) -> None:
    trainer = Recorder("sfbd", tmp_path, phase=1, entered=0)  # killed while round 1's set was being made
    run_schedule(trainer)  # type: ignore[arg-type]
    assert trainer.calls[:3] == ["enter round-1", "validate round-1", "start_fine_tuning first=True"]
