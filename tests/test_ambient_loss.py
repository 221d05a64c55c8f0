"""The loss every training stage uses (diffusion/ambient.py): at noise floor 0 it is EDM's loss (EDMLoss, kept as
that oracle), its noise levels follow EDM's log-normal truncated above the floor, and on noisy data it is minimised
by the clean-data denoiser (Tweedie), which the plain EDM loss on the same noisy data is not."""

from __future__ import annotations

import math

import torch
from scipy import stats

from sfbd_guard.diffusion.ambient import AmbientLoss, truncated_log_normal
from sfbd_guard.diffusion.loss import EDMLoss


def test_at_floor_zero_it_is_edms_loss_with_the_same_draws() -> None:
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64)

    def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t) * (1 + sigma.view(-1, 1, 1, 1))

    ambient = AmbientLoss()(denoiser, x, torch.zeros(16), generator=torch.Generator().manual_seed(3))
    edm = EDMLoss()(denoiser, x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ambient, edm, rtol=1e-12, atol=0)


def test_noise_levels_follow_the_log_normal_truncated_above_the_floor() -> None:
    floor, p_mean, p_std = 0.4, -1.2, 1.2
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = truncated_log_normal(z, torch.full_like(z, floor), p_mean, p_std)
    assert float(sigma.min()) > floor
    low = (math.log(floor) - p_mean) / p_std  # oracle: scipy's truncated normal of ln sigma
    oracle = stats.truncnorm(low, math.inf, loc=p_mean, scale=p_std)
    assert stats.kstest(sigma.log().numpy(), oracle.cdf).pvalue > 1e-3
    assert torch.equal(truncated_log_normal(z[:10], torch.zeros(10, dtype=torch.float64), p_mean, p_std),
                       (z[:10] * p_std + p_mean).exp())  # floor 0: EDM's log-normal, draw for draw


def test_on_noisy_data_the_clean_denoiser_minimises_it() -> None:
    """Gaussian data x ~ N(0, s²) seen only as y = x + floor·ε: the posterior mean of x given x_t at total noise σ is
    s²/(s² + σ²)·x_t. The ambient loss on y is lowest there; EDM's loss on y (y taken as clean) prefers the denoiser
    of the noisy data, s_y²/(s_y² + σ²)·x_t with s_y² = s² + floor², which keeps the floor's noise."""
    s, floor, n = 0.5, 0.3, 400_000
    gen = torch.Generator().manual_seed(1)
    y = (torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64) * s
         + floor * torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64))

    def scaled(variance: float, factor: float = 1.0):  # type: ignore[no-untyped-def]
        def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return factor * variance / (variance + sigma.view(-1, 1, 1, 1) ** 2) * x_t
        return denoiser

    def ambient(denoiser) -> float:  # type: ignore[no-untyped-def]
        return float(AmbientLoss()(denoiser, y, torch.full((n,), floor), generator=torch.Generator().manual_seed(2)).mean())

    def edm(denoiser) -> float:  # type: ignore[no-untyped-def]
        return float(EDMLoss()(denoiser, y, generator=torch.Generator().manual_seed(2)).mean())

    clean, noisy = scaled(s**2), scaled(s**2 + floor**2)
    assert ambient(clean) < ambient(noisy)
    assert ambient(clean) < min(ambient(scaled(s**2, 0.9)), ambient(scaled(s**2, 1.1)))
    assert edm(noisy) < edm(clean)
