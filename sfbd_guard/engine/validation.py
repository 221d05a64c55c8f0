"""SFBD's validation measure: how well a model denoises the protected distribution, computed by the trainer
from the protected copies it may see, without the originals.

A few protected copies are held back (`validation.size`, chosen by the run's seed: which copies are held back
protects nothing): they are never denoised into a round set or the online bank, so no model is trained on them.
Both numbers below use Stein's unbiased risk estimate (SURE): for y = x + σε with Gaussian ε and a function f
that does not depend on y's noise, E‖f(y) − x‖² = E[‖f(y) − y‖² − dσ² + 2σ² div f(y)]; the divergence is
estimated with Rademacher probes and a finite difference (Hutchinson). The held-back copies, the extra noise
and the probes are drawn once, so two models are compared on exactly the same inputs (paired).

- `loss`: the EDM-weighted denoising loss of the model's one-step denoiser D(y_t; t) at t ∈ LEVELS × σ
  (y_t = y + √(t² − σ²) ε₂ is a copy at noise t): the model's validation loss on the protected data, a proper
  score (the true posterior mean minimises it). SFBD keeps the model with the lowest loss (`trainer.py`).
- `round_psnr`: the SURE estimate of the PSNR (peak-to-peak 2 on the [-1, 1] scale) of the backward solver's
  output at σ: what the next round set is worth, the number the data owner computes against the originals
  (benchmarks/quality.py checks one against the other).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..diffusion.sampling import denoise_backward
from .config import DenoiseSpec, ValidationSpec
from .data import ImageSet

LEVELS = (1.0, 1.5, 2.5)  # noise levels of the validation loss, as multiples of the copies' sigma
SIGMA_DATA = 0.5  # EDM's sigma_data: the loss weight (t² + σd²) / (t σd)² of the training loss
PROBE_STEP = 1e-3  # finite-difference step of the divergence probe, on the [-1, 1] scale


def held_back_rows(count: int, spec: ValidationSpec, seed: int) -> torch.Tensor:
    """The protected rows held back for validation (sorted), or none when the measure is off or the set is small."""
    size = spec.size if spec.size is not None else min(spec.max_size, max(spec.min_size, round(spec.fraction * count)))
    if not spec.enabled or size <= 0 or count < 4 * size:
        return torch.empty(0, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed * 1000 + 77)
    return torch.randperm(count, generator=generator)[:size].sort().values


@dataclass(frozen=True)
class Measure:
    loss: float  # EDM-weighted SURE denoising loss at LEVELS × σ (lower is better)
    round_psnr: float  # SURE estimate of the backward solver's PSNR at σ, dB


def _sure(f: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, level: float, probes: torch.Tensor) -> torch.Tensor:
    """Per-image SURE estimate of the mean squared error per pixel of f on y = x + level · ε."""
    out = f(y)
    dims = tuple(range(1, y.ndim))
    divergence = torch.zeros(len(y), dtype=torch.float64, device=y.device)
    for probe in probes:
        moved = f(y + PROBE_STEP * probe)
        divergence += ((moved - out).double() * probe.double()).sum(dims) / PROBE_STEP
    divergence /= len(probes)
    pixels = y[0].numel()
    return ((out - y).double() ** 2).mean(dims) - level**2 + 2 * level**2 * divergence / pixels


class Validator:
    """The validation measure of one run, on its held-back protected copies (fixed noise and probes)."""

    def __init__(self, noisy: ImageSet, rows: torch.Tensor, sigma: float, denoise: DenoiseSpec, spec: ValidationSpec,
                 seed: int, device: torch.device) -> None:
        self.sigma, self.denoise, self.device = sigma, denoise, device
        generator = torch.Generator().manual_seed(seed * 1000 + 78)
        self.noise_seed = seed * 1000 + 79  # the sde solver's noise: fixed, so that measures of two models are paired
        self.y = noisy.gather(rows).float()
        shape = (spec.probes, *self.y.shape)
        self.extra = [math.sqrt(max(0.0, (k * sigma) ** 2 - sigma**2)) * torch.randn(self.y.shape, generator=generator)
                      for k in LEVELS]
        self.probes = [(torch.randint(0, 2, shape, generator=generator) * 2 - 1).float() for _ in (*LEVELS, "ode")]

    def __len__(self) -> int:
        return len(self.y)

    @torch.no_grad()
    def measure(self, net: torch.nn.Module, batch: int = 256) -> Measure:
        spec = self.denoise

        def backward(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # sde: the same noise for y and y + probe
            return denoise_backward(net, y, self.sigma, steps=spec.steps, solver=spec.solver, grid=spec.grid, rho=spec.rho,
                                    sigma_min=spec.sigma_min, seeds=(self.noise_seed, rows)).clamp(-1, 1)

        ode = self._batched(backward, self.y, self.sigma, self.probes[-1], batch)
        return Measure(loss=self.loss(net, batch), round_psnr=10 * math.log10(4.0 / max(ode, 1e-12)))

    @torch.no_grad()
    def loss(self, net: torch.nn.Module, batch: int = 256) -> float:
        """The measure's `loss` alone: a few one-step evaluations per copy (what pretraining's convergence reads)."""
        losses = []
        for k, extra, probes in zip(LEVELS, self.extra, self.probes, strict=False):
            t = k * self.sigma

            def one_step(y: torch.Tensor, _rows: torch.Tensor, t: float = t) -> torch.Tensor:
                return net(y, torch.full((len(y),), t, device=y.device))  # type: ignore[no-any-return]

            weight = (t**2 + SIGMA_DATA**2) / (t * SIGMA_DATA) ** 2
            losses.append(weight * self._batched(one_step, self.y + extra, t, probes, batch))
        return float(sum(losses) / len(losses))

    def _batched(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor, level: float,
                 probes: torch.Tensor, batch: int) -> float:
        total = 0.0
        for start in range(0, len(y), batch):
            part = slice(start, start + batch)
            rows = torch.arange(len(y))[part]
            estimate = _sure(functools.partial(self._call, f, rows), y[part], level, probes[:, part])
            total += float(estimate.sum())
        return total / len(y)

    def _call(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        return f(v.to(self.device), rows).cpu().float()
