"""Bring your own trainer: the prepared directory and SFBD's steps as pieces for a training loop of one's own.

- `PreparedDataset` (prepared/torch_dataset.py): a verified prepared directory as a torch Dataset, memory-mapped;
  `to_hf_dataset` (prepared/hf_dataset.py): the same rows as a Hugging Face `datasets.Dataset`.
- `edm_loss`, `ambient_loss`: the loss `guard train` trains with (diffusion/ambient.py): EDM's on clean images; on
  noisy copies y = x + σ_y ε, noise added on top of y at levels above σ_y and Tweedie's target, which the clean-data
  denoiser minimises (the `ambient` method's noisy copies, `sfbd.denoised_floor` for a round set).
- `denoise_round`: an SFBD round's backward step (engine/denoise.py): every noisy copy integrated from its σ down to
  0 by the model, with the engine's solver and defaults (`DenoiseSpec`), returned as a `RoundSet` to fine-tune on.

docs/byo-trainer.md has a complete loop (accelerate and a diffusers UNet2DModel) built from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .diffusion.ambient import AmbientLoss
from .diffusion.precond import Denoiser
from .engine.config import DenoiseSpec
from .engine.data import ImageSet, MappedImages, TensorImages, from_stored
from .engine.denoise import denoise_rows
from .engine.runtime import Runtime
from .prepared.hf_dataset import to_hf_dataset
from .prepared.torch_dataset import PreparedDataset

__all__ = ["PreparedDataset", "RoundSet", "ambient_loss", "denoise_round", "edm_loss", "to_hf_dataset"]

DENOISED = "denoised"  # the partition name a round set's items carry


def ambient_loss(denoiser: Denoiser, noisy: Tensor, sigma_y: Tensor | float, *, generator: torch.Generator | None = None,
                 p_mean: float = AmbientLoss.P_mean, p_std: float = AmbientLoss.P_std,
                 sigma_data: float = AmbientLoss.sigma_data) -> Tensor:
    """Per-image loss (B,) of images `noisy` (B, C, H, W) whose own noise level is `sigma_y` (a float or (B,); 0 for a
    clean image, so one call takes a batch of both): σ drawn from EDM's log-normal truncated above σ_y, noise of
    sqrt(σ² - σ_y²) added on top, and the model's prediction of y by Tweedie, as `guard train` computes it."""
    floor = torch.as_tensor(sigma_y, dtype=noisy.dtype, device=noisy.device).expand(noisy.shape[0])
    return AmbientLoss(p_mean, p_std, sigma_data)(denoiser, noisy, floor, generator=generator)


def edm_loss(denoiser: Denoiser, clean: Tensor, *, generator: torch.Generator | None = None,
             p_mean: float = AmbientLoss.P_mean, p_std: float = AmbientLoss.P_std,
             sigma_data: float = AmbientLoss.sigma_data) -> Tensor:
    """Per-image EDM loss (B,) of clean images (B, C, H, W): `ambient_loss` at σ_y = 0."""
    return ambient_loss(denoiser, clean, 0.0, generator=generator, p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)


class RoundSet(Dataset[dict[str, Any]]):
    """An SFBD round's denoised images, one per noisy copy in order, kept as the engine keeps them (uint8, or float16
    when not quantized). Items are the prepared datasets' items (`image` float32 on [-1, 1], `sigma` = `floor`,
    `partition` "denoised", `record`), so `ConcatDataset([clean, round_set])` is the round's training set.
    It is derived from protected records: keep it with the run, never hand it on (docs/security.md)."""

    def __init__(self, stored: Tensor, records: list[str], floor: float = 0.0) -> None:
        if len(records) != len(stored):
            raise ValueError(f"{len(records)} records for {len(stored)} images")
        self.stored, self.records, self.floor = stored, records, float(floor)

    @property
    def images(self) -> Tensor:
        """Every image as float32 (N, C, H, W) on [-1, 1]."""
        return from_stored(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": from_stored(self.stored[index]), "sigma": torch.tensor(self.floor, dtype=torch.float32),
                "partition": DENOISED, "record": self.records[index]}


def denoise_round(denoiser: nn.Module, noisy: PreparedDataset | Tensor, sigma: float | None = None, *,
                  spec: DenoiseSpec | None = None, quantize: bool = True, floor: float = 0.0, seed: int = 0,
                  device: torch.device | str | None = None, process_index: int = 0, num_processes: int = 1) -> RoundSet:
    """SFBD's backward step over the noisy copies: each denoised by `denoiser` (D(x; σ), normally the EMA model, in
    eval mode) from σ down to 0 with `spec`'s solver (default: the engine's, heun on 18 EDM steps cut at σ).

    `noisy`: a `PreparedDataset` holding the protected partition (σ is its card's; read a batch at a time), or a
    tensor (N, C, H, W) of noisy copies with their `sigma`. The result is clipped to [-1, 1] and, with `quantize`,
    rounded to uint8 (the engine's default, the reference code's PNG round trip). `floor`: the noise level its items
    carry into `ambient_loss` (`sfbd.denoised_floor`; 0 trains on them as clean). `seed` drives the `sde` solver only.
    Under several processes (torchrun, accelerate: `process_index`, `num_processes`, torch.distributed initialised)
    each denoises its share and every one receives the whole set, in order."""
    images: ImageSet
    if isinstance(noisy, PreparedDataset):
        pixels, records = noisy.noisy_copies()
        if sigma is not None and sigma != noisy.sigma:
            raise ValueError(f"sigma {sigma} is not the prepared directory's {noisy.sigma}")
        images, sigma = MappedImages(pixels), noisy.sigma
    else:
        if sigma is None:
            raise ValueError("a tensor of noisy copies needs their sigma")
        images, records = TensorImages(noisy), [""] * len(noisy)
    if device is None:
        device = next(denoiser.parameters(), torch.empty(0)).device
    runtime = Runtime(torch.device(device), rank=process_index, world_size=num_processes)
    stored = denoise_rows(denoiser, images, torch.arange(len(images)), sigma, spec or DenoiseSpec(), runtime,
                          quantize=quantize, noise_seed=seed)
    assert stored is not None  # no sink: the rows are returned
    return RoundSet(stored, records, floor)
