"""Denoising loss for a mix of clean and noisy training images (Daras et al. 2024, "Consistent
Diffusion Meets Tweedie"; the exact part of their ambient loss).

Each training image y carries its own noise floor sigma_zeta (0 for clean data). A noise level
sigma_t > sigma_zeta is drawn from EDM's log-normal, truncated to (sigma_zeta, inf), and
x_t = y + sqrt(sigma_t^2 - sigma_zeta^2) n, so x_t has total noise sigma_t around the clean image.
Tweedie's formula gives E[y | x_t] = r x_t + (1 - r) E[x_0 | x_t] with r = sigma_zeta^2 / sigma_t^2,
so the loss
    lambda(sigma_t) * mean (r x_t + (1 - r) D(x_t; sigma_t) - y)^2
is minimised by the clean-data denoiser. With sigma_zeta = 0 it is exactly the EDM loss (same
random draws as `EDMLoss` for the same generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .loss import edm_loss_weight
from .precond import Denoiser


def truncated_log_normal(z: Tensor, floor: Tensor, p_mean: float, p_std: float) -> Tensor:
    """Map standard normals `z` to sigmas with ln sigma ~ N(p_mean, p_std^2) truncated to sigma > floor.

    Uses the monotone map z -> Phi^-1(a + (1 - a) Phi(z)), a = Phi((ln floor - p_mean) / p_std); rows
    with floor 0 keep their z unchanged.
    """
    normal = torch.distributions.Normal(torch.zeros((), dtype=z.dtype, device=z.device), 1.0)
    a = normal.cdf((floor.clamp_min(1e-30).log() - p_mean) / p_std)
    u = (a + (1 - a) * normal.cdf(z)).clamp(max=1 - 1e-7)
    truncated = normal.icdf(u)
    return (torch.where(floor > 0, truncated, z) * p_std + p_mean).exp()


@dataclass(frozen=True)
class AmbientLoss:
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __call__(self, denoiser: Denoiser, y: Tensor, floor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss (B,) for images y (B, C, H, W) with noise floors `floor` (B,), 0 = clean."""
        z = torch.randn(y.shape[0], generator=generator, device=y.device, dtype=y.dtype)
        floor = floor.to(device=y.device, dtype=y.dtype)
        sigma = truncated_log_normal(z, floor, self.P_mean, self.P_std)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        extra = (sigma.square() - floor.square()).clamp_min(0).sqrt()
        x_t = y + extra.view(-1, 1, 1, 1) * noise
        ratio = (floor.square() / sigma.square()).view(-1, 1, 1, 1)
        prediction = ratio * x_t + (1 - ratio) * denoiser(x_t, sigma)
        return edm_loss_weight(sigma, self.sigma_data) * (prediction - y).square().flatten(1).mean(dim=1)

