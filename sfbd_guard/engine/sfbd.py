"""SFBD's data side: the mixture each phase trains on, the denoised round sets, and online SFBD's bank.

The sources of a phase come from the methods table (`methods.METHODS`):
- clean / noisy: fixed sets from the prepared directory; under the ambient loss the noisy copies keep
  their noise floor σ.
- denoised (SFBD rounds): on entering a round every protected copy is denoised by the current EMA
  model; the denoised set is saved under rounds/, so a run resumed mid-round reuses it.
- bank (online SFBD): one slot per protected record, filled when the phase starts and refreshed
  `refresh_size` records at a time every `refresh_every` steps; its loss weight ramps 0 → 1.
Denoised images are kept as uint8 (sfbd.quantize, the reference code's PNG round trip) or float16.
The trainer lends the EMA model (the denoiser) and the training state; this module never sees the trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..prepared import PreparedData
from ..progress import ProgressFactory
from .checkpoint import TrainingState
from .config import PipelineConfig
from .data import Mixture, Source, clean_images, from_stored, noisy_images
from .denoise import denoise_rows, load_round, save_round
from .methods import Phase, SourceName
from .runtime import Runtime


def linear_ramp(kimg: float, start: float, end: float) -> float:
    """Online SFBD's denoised-loss weight: 0 before `start`, 1 after `end`, linear between."""
    if end <= start:
        return 1.0 if kimg >= start else 0.0
    return min(1.0, max(0.0, (kimg - start) / (end - start)))


class SFBDSources:
    """The training sources of a run's phases, denoising the protected copies where a phase needs it."""

    def __init__(self, config: PipelineConfig, data: PreparedData, run_dir: Path, rt: Runtime,
                 progress: ProgressFactory | None = None) -> None:
        self.config, self.run_dir, self.rt, self.progress = config, run_dir, rt, progress
        self.clean = clean_images(data)
        self.noisy = noisy_images(data)
        self.sigma = float(data.card.sigma)
        self.record_ids = data.protected.record_ids
        self.dtype = torch.uint8 if config.sfbd.quantize else torch.float16  # how denoised images are kept
        self.bank: Source | None = None

    def mixture(self, phase: Phase, denoiser: torch.nn.Module, state: TrainingState, fresh: bool) -> Mixture:
        """What `phase` trains on; `fresh`: the phase starts now (not a resume inside it)."""
        spec = phase.spec
        sources = [self._source(name, phase, denoiser, state, fresh) for name in spec.sources]
        clean_weight = self.config.sfbd.clean_weight
        if spec.fine_tune and clean_weight is not None:  # clean vs the denoised images, in fixed shares
            return Mixture(sources, [clean_weight, 1 - clean_weight])
        return Mixture(sources)

    def _source(self, name: SourceName, phase: Phase, denoiser: torch.nn.Module, state: TrainingState,
                fresh: bool) -> Source:
        if name == "clean":
            return Source("clean", self.clean)
        if name == "noisy":
            return Source("noisy", self.noisy, floor=self.sigma if phase.spec.loss == "ambient" else 0.0)
        if name == "denoised":
            return Source("denoised", from_stored(self._round_set(phase.round, denoiser)))
        self.bank = Source("bank", from_stored(self._bank(denoiser, state, fresh)), weight=self._ramp_weight(state))
        return self.bank

    def _denoise(self, denoiser: torch.nn.Module, rows: torch.Tensor, label: str) -> torch.Tensor:
        tick = self.progress(label, len(rows)) if self.progress and len(rows) > 256 else None
        return denoise_rows(denoiser, self.noisy, rows, self.sigma, self.config.denoise, self.rt, tick,
                            quantize=self.config.sfbd.quantize)

    # ----- SFBD rounds -----------------------------------------------------------------------------------

    def _round_set(self, round_: int, denoiser: torch.nn.Module) -> torch.Tensor:
        """Round k's denoised set: loaded if this round already made it (resume), else made now."""
        path = self.run_dir / "rounds" / f"round-{round_:02d}.safetensors"
        saved = load_round(path, self.record_ids, self.dtype)
        if saved is not None:
            return saved
        denoised = self._denoise(denoiser, torch.arange(len(self.noisy)), f"denoising (round {round_})")
        if self.rt.is_main:
            save_round(path, denoised, self.record_ids, round_)
        self.rt.barrier()
        return denoised

    # ----- online SFBD -----------------------------------------------------------------------------------

    def _bank(self, denoiser: torch.nn.Module, state: TrainingState, fresh: bool) -> torch.Tensor:
        if not fresh and "bank" in state.tensors:
            return state.tensors["bank"]
        bank = self._denoise(denoiser, torch.arange(len(self.noisy)), "denoising (bank)")
        state.tensors["bank"] = bank
        state.info["bank_cursor"] = 0
        state.info["online_start_step"] = state.step
        return bank

    def _ramp_weight(self, state: TrainingState) -> float:
        return linear_ramp(state.nimg / 1000, *self.config.schedule.ramp())

    def before_step(self, phase: Phase, denoiser: torch.nn.Module, state: TrainingState) -> None:
        """Online SFBD: the bank's weight follows the ramp, and every `refresh_every` steps a chunk is re-denoised."""
        if "bank" not in phase.spec.sources or self.bank is None:
            return
        self.bank.weight = self._ramp_weight(state)
        schedule = self.config.schedule
        since = state.step - state.info["online_start_step"]
        if since == 0 or since % schedule.refresh_every:
            return
        cursor = int(state.info["bank_cursor"])
        rows = (torch.arange(schedule.refresh_size) + cursor) % len(self.noisy)
        fresh = self._denoise(denoiser, rows, "refresh")
        state.tensors["bank"][rows] = fresh
        self.bank.images[rows] = from_stored(fresh)
        state.info["bank_cursor"] = (cursor + schedule.refresh_size) % len(self.noisy)
