"""Sampling from a trained denoiser with per-image seeds: the same seed gives the same image,
whatever the batch size or the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..diffusion.sampling import Callback, karras_sigmas, sample_euler, sample_heun
from ..hashing import image_seed

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """x_T = sigma_max × N(0, I), one CPU generator per image (device-independent), moved to `device`."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return (torch.stack(noise) * SIGMA_MAX).to(device)


@torch.no_grad()
def generate(denoiser: torch.nn.Module, *, seed: int, count: int, shape: tuple[int, int, int], steps: int,
             batch: int, device: torch.device, solver: str = "heun",
             callback: Callback | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first index, images in [-1, 1]) batch by batch: EDM deterministic sampling, `steps` steps
    (`callback` is the sampler's, called once per step of every batch)."""
    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX, device=device, dtype=torch.float32)
    sampler = sample_heun if solver == "heun" else sample_euler
    for start in range(0, count, batch):
        seeds = [image_seed(seed, i) for i in range(start, min(count, start + batch))]
        x = initial_noise(seeds, shape, device)
        yield start, sampler(denoiser, x, sigmas, callback=callback).clamp(-1, 1)


def generate_uint8(denoiser: torch.nn.Module, *, seed: int, count: int, shape: tuple[int, int, int], steps: int,
                   batch: int) -> torch.Tensor:
    """uint8 (count, C, H, W) on the CPU: the pixels `guard sample` writes for the same seed and steps (a loaded
    run's or an export's `.sample`)."""
    from .data import to_uint8

    device = next(denoiser.parameters()).device
    parts = [to_uint8(images).cpu() for _, images in generate(denoiser, seed=seed, count=count, shape=shape,
                                                               steps=steps, batch=batch, device=device)]
    return torch.cat(parts) if parts else torch.empty((0, *shape), dtype=torch.uint8)
