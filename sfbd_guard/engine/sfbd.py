"""What each phase trains on, and the SFBD work done when a phase starts or between steps.

- clean / clean+noisy / ambient: fixed sets from the prepared directory.
- sfbd rounds: on entering a round, the EMA weights become the training weights with a fresh
  optimizer (the reference code's transfer) and every protected copy is denoised by the current EMA
  model; the denoised set is saved under rounds/, so a run resumed mid-round reuses it.
- online: a bank with one slot per protected record, filled when the phase starts and refreshed
  `refresh_size` records at a time every `refresh_every` steps; its loss weight ramps 0 → 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .data import Mixture, Source, clean_images, from_uint8, noisy_images
from .denoise import denoise_rows, load_round, save_round
from .methods import Phase

if TYPE_CHECKING:
    from .trainer import Trainer


def linear_ramp(kimg: float, start: float, end: float) -> float:
    """Online SFBD's denoised-loss weight: 0 before `start`, 1 after `end`, linear between."""
    if end <= start:
        return 1.0 if kimg >= start else 0.0
    return min(1.0, max(0.0, (kimg - start) / (end - start)))


class PoolBuilder:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        data = trainer.data
        self.clean = clean_images(data)
        self.noisy = noisy_images(data)
        self.sigma = float(data.card["sigma"])
        self.record_ids = data.protected.record_ids
        self.bank: Source | None = None

    # ----- phase entry -----------------------------------------------------------------------------------

    def enter(self, phase: Phase, fresh: bool) -> Mixture:
        config = self.trainer.config
        if phase.pool == "clean":
            return Mixture([Source("clean", self.clean)])
        if phase.pool == "clean+noisy":
            return Mixture([Source("clean", self.clean), Source("noisy", self.noisy)])
        if phase.pool == "ambient":
            return Mixture([Source("clean", self.clean), Source("noisy", self.noisy, floor=self.sigma)])
        self.trainer.ema.rampup_ratio = None  # fine-tuning: the full half-life from the start
        if fresh:
            self._start_fine_tuning()
        if phase.pool == "sfbd":
            denoised = Source("denoised", from_uint8(self._round_set(phase.round)))
            return self._mix(denoised, config.sfbd.clean_weight)
        self.bank = Source("bank", from_uint8(self._bank(fresh)), weight=self._ramp_weight())
        return self._mix(self.bank, config.sfbd.clean_weight)

    def _mix(self, other: Source, clean_weight: float | None) -> Mixture:
        shares = None if clean_weight is None else [clean_weight, 1 - clean_weight]
        return Mixture([Source("clean", self.clean), other], shares)

    def _start_fine_tuning(self) -> None:
        """SFBD's denoiser update starts from the previous EMA weights with a fresh Adam."""
        trainer = self.trainer
        if trainer.config.sfbd.transfer_ema:
            trainer.net.load_state_dict(trainer.ema.module.state_dict())
            trainer.optimizer = trainer._new_optimizer()

    def _denoise(self, rows: torch.Tensor, label: str) -> torch.Tensor:
        trainer = self.trainer
        tick = trainer.progress(label, len(rows)) if trainer.progress and len(rows) > 256 else None
        return denoise_rows(trainer.ema.module, self.noisy, rows, self.sigma, trainer.config.denoise, trainer.rt, tick)

    def _round_set(self, round_: int) -> torch.Tensor:
        """Round k's denoised set: loaded if this round already made it (resume), else made now."""
        trainer = self.trainer
        path = trainer.run_dir / "rounds" / f"round-{round_:02d}.safetensors"
        saved = load_round(path, self.record_ids)
        if saved is not None:
            return saved
        denoised = self._denoise(torch.arange(len(self.noisy)), f"denoising (round {round_})")
        if trainer.rt.is_main:
            save_round(path, denoised, self.record_ids, round_)
        trainer.rt.barrier()
        return denoised

    # ----- online SFBD -----------------------------------------------------------------------------------

    def _bank(self, fresh: bool) -> torch.Tensor:
        state = self.trainer.state
        if not fresh and "bank" in state.tensors:
            return state.tensors["bank"]
        bank = self._denoise(torch.arange(len(self.noisy)), "denoising (bank)")
        state.tensors["bank"] = bank
        state.info["bank_cursor"] = 0
        state.info["online_start_step"] = state.step
        return bank

    def _ramp_weight(self) -> float:
        return linear_ramp(self.trainer.state.nimg / 1000, *self.trainer.config.schedule.ramp())

    def before_step(self, phase: Phase, mixture: Mixture) -> None:
        if phase.pool != "online" or self.bank is None:
            return
        self.bank.weight = self._ramp_weight()
        state, schedule = self.trainer.state, self.trainer.config.schedule
        since = state.step - state.info["online_start_step"]
        if since == 0 or since % schedule.refresh_every:
            return
        cursor = int(state.info["bank_cursor"])
        rows = (torch.arange(schedule.refresh_size) + cursor) % len(self.noisy)
        fresh = self._denoise(rows, "refresh")
        state.tensors["bank"][rows] = fresh
        self.bank.images[rows] = from_uint8(fresh)
        state.info["bank_cursor"] = (cursor + schedule.refresh_size) % len(self.noisy)
