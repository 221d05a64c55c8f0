"""SFBD's data side: the mixture each phase trains on, the denoised round sets, and online SFBD's bank.

The sources of a phase come from the methods table (`methods.METHODS`):
- clean / noisy: fixed sets from the prepared directory, memory-mapped (`data.MappedImages`); under the
  ambient loss the noisy copies keep their noise floor σ.
- denoised (SFBD rounds): on entering a round every protected copy is denoised by the current EMA
  model and streamed to .npy shards under rounds/round-XX/ (`denoise.write_round`), which every rank
  memory-maps. The shards' sha256 are recorded in the training state (`RunInfo.round_set`, state.py), so the
  checkpoints carry them: a run resumed inside a round maps the same set, and a round set changed,
  swapped or truncated since is refused (re-denoising it with later weights would not give the run that
  was interrupted). A round set left by a crash before its round's first checkpoint is reused if its own
  round.json vouches for it, else made again.
- bank (online SFBD): one slot per protected record in bank/bank.npy, memory-mapped and updated in place:
  filled when the phase starts and refreshed `refresh_size` records at a time every `refresh_every` steps;
  its loss weight ramps 0 → 1. Every checkpoint holds a copy of the bank as of its step (`attachments`),
  which a resume restores; a checkpoint inside the phase without that copy is refused.
Denoised images are kept as uint8 (sfbd.quantize, the reference code's PNG round trip) or float16.
Under torchrun rank 0 writes the files, the ranks wait at a barrier, and every rank maps the same files
(the run directory must be one every rank sees, as for checkpoints).
The trainer lends the EMA model (the denoiser) and the training state; this module never sees the trainer.
"""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..prepared.mapped import MappedRows
from ..prepared.reader import PreparedData
from ..progress import ProgressFactory
from ..rundir import BANK, RunPaths
from .checkpoint import TrainingState
from .config import PipelineConfig
from .data import ImageSet, MappedImages, Mixture, RowSubset, Source, clean_images, noisy_images
from .denoise import (
    RoundSetError,
    ShardWriter,
    Sink,
    denoise_rows,
    numpy_dtype,
    open_round,
    round_dir,
    write_round,
)
from .methods import METHODS, Phase
from .runtime import Runtime
from .state import BankRecord, RoundRecord
from .validation import Validator, held_back_rows


def linear_ramp(kimg: float, start: float, end: float) -> float:
    """Online SFBD's denoised-loss weight: 0 before `start`, 1 after `end`, linear between."""
    if end <= start:
        return 1.0 if kimg >= start else 0.0
    return min(1.0, max(0.0, (kimg - start) / (end - start)))


class SFBDSources:
    """The training sources of a run's phases, denoising the protected copies where a phase needs it."""

    def __init__(self, config: PipelineConfig, data: PreparedData, run_dir: Path, runtime: Runtime,
                 progress: ProgressFactory | None = None) -> None:
        self.config, self.run_dir, self.runtime, self.progress = config, run_dir, runtime, progress
        self.clean = clean_images(data)
        self.noisy = noisy_images(data)
        self.sigma = float(data.card.sigma)
        self.record_ids = data.protected.record_ids
        self.shape = data.image_shape
        self.dtype = torch.uint8 if config.sfbd.quantize else torch.float16  # how denoised images are kept
        self.validator: Validator | None = None  # the validation measure on held-back copies (validation.py)
        self.trained_rows: torch.Tensor | None = None  # the protected rows SFBD trains on (None: all)
        denoises = any(spec.fine_tune for spec in METHODS[config.method])  # sfbd, online-sfbd (methods.py)
        held = (held_back_rows(len(self.noisy), config.validation, config.seed)
                if denoises and config.privacy is None else torch.empty(0))
        if len(held):  # never trained on: off under DP-SGD, whose accounting covers no choice made on them
            keep = torch.ones(len(self.noisy), dtype=torch.bool)
            keep[held] = False
            self.trained_rows = keep.nonzero().flatten()
            self.validator = Validator(self.noisy, held, self.sigma, config.denoise, config.validation, config.seed,
                                       runtime.device)
        self.denoised: Source | None = None  # the current round's set (round_set)
        self.bank: Source | None = None
        self.bank_array: np.ndarray | None = None  # the mapped bank file (writable on rank 0)

    def round_set(self, round_: int, denoiser: torch.nn.Module, state: TrainingState, first_entry: bool) -> Source:
        """SFBD's round `round_`: every noisy copy denoised by `denoiser` (the EMA model) into the round set, trained
        on at its noise floor (`first_entry`: the round starts now; else a resume inside it maps the set it made)."""
        rows = self._round_set(round_, denoiser, state, first_entry)
        self.denoised = Source("denoised", self._trained(MappedImages(rows)), floor=self._denoised_floor(state, first_entry))
        return self.denoised

    def open_bank(self, denoiser: torch.nn.Module, state: TrainingState, first_entry: bool) -> Source:
        """Online SFBD's bank: every noisy copy denoised once when the phase starts (or the checkpoint's copy on a
        resume), then refreshed a chunk at a time (`refresh_bank`); its loss weight follows the ramp."""
        self.bank = Source("bank", self._trained(MappedImages(self._bank(denoiser, state, first_entry))),
                           weight=self._ramp_weight(state))
        return self.bank

    def mixture(self, phase: Phase) -> Mixture:
        """What `phase` trains on: its sources (the round set or the bank made before, by `round_set`/`open_bank`)."""
        spec = phase.spec
        made = {"denoised": self.denoised, "bank": self.bank}
        sources = []
        for name in spec.sources:
            if name == "clean":
                sources.append(Source("clean", self.clean))
            elif name == "noisy":
                sources.append(Source("noisy", self.noisy, floor=self.sigma if spec.noisy_copies == "above-sigma" else 0.0))
            else:
                source = made[name]
                if source is None:
                    raise RuntimeError(f"{phase.name} trains on {name}, which was not made when the phase was entered")
                sources.append(source)
        clean_weight = self.config.sfbd.clean_weight
        if spec.fine_tune and clean_weight is not None:  # clean vs the denoised images, in fixed shares
            return Mixture(sources, [clean_weight, 1 - clean_weight])
        return Mixture(sources)

    def _denoised_floor(self, state: TrainingState, first_entry: bool) -> float:
        """The round set's noise floor in the loss (sfbd.denoised_floor), fixed when the round starts."""
        setting = self.config.sfbd.denoised_floor
        if not setting:
            return 0.0
        if not first_entry and state.info.denoised_floor is not None:  # a resume inside the round: its floor
            return state.info.denoised_floor
        if setting == "auto":
            psnr = state.info.validation.denoiser_psnr if state.info.validation is not None else None
            floor = math.sqrt(4.0 / 10 ** (float(psnr) / 10)) if psnr is not None else 0.0
        else:
            floor = float(setting)
        state.info.denoised_floor = floor
        return floor

    def _trained(self, images: ImageSet) -> ImageSet:
        """A denoised set without the validation's held-back rows (they are made, never trained on)."""
        return images if self.trained_rows is None else RowSubset(images, self.trained_rows)

    def _denoise(self, denoiser: torch.nn.Module, rows: torch.Tensor, label: str, draw: int,
                 into: Sink | None = None) -> torch.Tensor | None:
        """`draw` numbers the pass over the copies, so that a posterior sampler draws new noise in each pass."""
        tick = self.progress(label, len(rows)) if self.progress and len(rows) > 256 else None
        return denoise_rows(denoiser, self.noisy, rows, self.sigma, self.config.denoise, self.runtime, tick,
                            quantize=self.config.sfbd.quantize, into=into,
                            noise_seed=self.config.seed * 1_000_003 + draw)

    def _denoise_all(self, denoiser: torch.nn.Module, label: str, draw: int, sink: Sink) -> None:
        """Every protected copy denoised in record order into `sink` (rank 0); the other ranks only take part."""
        self._denoise(denoiser, torch.arange(len(self.noisy)), label, draw,
                      sink if self.runtime.is_main else lambda _s, _b: None)

    # ----- SFBD rounds -----------------------------------------------------------------------------------

    def _round_set(self, round_: int, denoiser: torch.nn.Module, state: TrainingState, first_entry: bool) -> MappedRows:
        """Round k's denoised set, memory-mapped: the one this round made (resume), else made now."""
        path = round_dir(self.run_dir, round_)
        recorded = state.info.round_set
        if not first_entry and recorded is not None and recorded.round == round_:
            return self._recorded_round(path, recorded.shards)
        try:  # a set left by a crash before this round's first checkpoint: reused if it is whole
            rows, shards = open_round(path, self.record_ids, self.dtype, self.shape)
        except RoundSetError:
            self._make_round(path, round_, denoiser)
            rows, shards = self._open_round(path)
        state.info.round_set = RoundRecord(round_, shards)
        return rows

    def _make_round(self, path: Path, round_: int, denoiser: torch.nn.Module) -> None:
        def fill(sink: Sink) -> None:
            self._denoise_all(denoiser, f"denoising (round {round_})", round_, sink)

        if self.runtime.is_main:
            write_round(path, len(self.noisy), self.shape, self.dtype, self.record_ids, round_, fill)
        else:
            fill(lambda _s, _b: None)
        self.runtime.barrier()

    def _open_round(self, path: Path) -> tuple[MappedRows, dict[str, str]]:
        try:
            return open_round(path, self.record_ids, self.dtype, self.shape)
        except RoundSetError as err:  # just written: another process changed it
            raise InputError(f"{err}", hint="the run directory changed while training; start a new run") from None

    def _recorded_round(self, path: Path, shards: Any) -> MappedRows:
        """The round set a checkpoint recorded, refused if it is not exactly those shards."""
        hint = (f"a run resumes inside a round only on the round set it made ({path}); restore that folder from a "
                "backup, or resume from a checkpoint before the round started, or start a new run")
        try:
            rows, found = open_round(path, self.record_ids, self.dtype, self.shape)
        except RoundSetError as err:
            raise InputError(f"{err}", hint=hint) from None
        if found != shards:
            raise InputError(f"{path}: its shards are not those recorded in the checkpoint (the round set was "
                             "replaced after the checkpoint was written)", hint=hint)
        return rows

    # ----- online SFBD -----------------------------------------------------------------------------------

    @property
    def bank_path(self) -> Path:
        return RunPaths(self.run_dir).bank

    def attachments(self) -> dict[str, Path]:
        """The files a checkpoint must capture as of its step: the bank, while online SFBD uses it."""
        return {BANK: self.bank_path} if self.bank is not None else {}

    def _bank(self, denoiser: torch.nn.Module, state: TrainingState, first_entry: bool) -> MappedRows:
        if not first_entry and BANK in state.attachments:  # the bank as of the checkpoint resumed from
            copy = state.attachments[BANK]
            self._write_bank(lambda target: shutil.copyfile(copy, target))
        elif not first_entry:
            raise InputError(f"{self.run_dir}: the checkpoint resumed from is inside online SFBD's phase but holds no "
                             f"copy of the bank ({BANK})", hint="resume from a checkpoint guard train wrote, or start a new run")
        else:
            def fill(target: Path) -> None:
                writer = ShardWriter(target.parent, len(self.noisy), self.shape, numpy_dtype(self.dtype),
                                     len(self.noisy), lambda _k: target.name)
                self._denoise_all(denoiser, "denoising (bank)", 0, writer.put)
                writer.close()

            if not self.runtime.is_main:  # takes part in the denoising's collectives, writes nothing
                self._denoise_all(denoiser, "denoising (bank)", 0, lambda _s, _b: None)
            self._write_bank(fill)
            state.info.bank = BankRecord(cursor=0, start_step=state.step)
        return self._map_bank()

    def _write_bank(self, write: Callable[[Path], object]) -> None:
        """Rank 0 writes bank/bank.npy by `write(temporary path)` and renames it into place; every rank waits."""
        if self.runtime.is_main:
            self.bank_path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.bank_path.parent / f".bank.partial-{uuid.uuid4().hex[:8]}.npy"
            write(staging)
            staging.replace(self.bank_path)
        self.runtime.barrier()

    def _map_bank(self) -> MappedRows:
        array = np.load(self.bank_path, mmap_mode="r+" if self.runtime.is_main else "r", allow_pickle=False)
        if array.dtype != numpy_dtype(self.dtype) or array.shape != (len(self.noisy), *self.shape):
            raise InputError(f"{self.bank_path}: holds {array.dtype} {array.shape}, expected "
                             f"{numpy_dtype(self.dtype)} {(len(self.noisy), *self.shape)}",
                             hint="resume from a checkpoint of this run (its bank.npy restores the bank)")
        self.bank_array = array
        return MappedRows.contiguous([array], self.shape, numpy_dtype(self.dtype))

    def _ramp_weight(self, state: TrainingState) -> float:
        return linear_ramp(state.nimg / 1000, *self.config.schedule.ramp())

    def refresh_bank(self, denoiser: torch.nn.Module, state: TrainingState) -> None:
        """Online SFBD, before each step: the bank's weight follows the ramp, and every `refresh_every` steps a chunk
        is denoised again by `denoiser` (the current EMA model)."""
        if self.bank is None or self.bank_array is None:
            raise RuntimeError("the bank is refreshed only after open_bank")
        self.bank.weight = self._ramp_weight(state)
        schedule = self.config.schedule
        assert state.info.bank is not None, "the bank's record is made when the online phase starts"
        since = state.step - state.info.bank.start_step
        if since == 0 or since % schedule.refresh_every:
            return
        cursor = state.info.bank.cursor
        rows = (torch.arange(schedule.refresh_size) + cursor) % len(self.noisy)
        refreshed = self._denoise(denoiser, rows, "refresh", 1000 + state.step)
        assert refreshed is not None
        if self.runtime.is_main:  # written in place; the other ranks map the same file
            self.bank_array[rows.numpy()] = refreshed.numpy()
        self.runtime.barrier()
        state.info.bank.cursor = (cursor + schedule.refresh_size) % len(self.noisy)
