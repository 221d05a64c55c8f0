"""EDM denoising score-matching loss (Karras et al. 2022, Eq. 2 and §5; SFBD P1 Eq. 4).

``ln sigma ~ N(P_mean, P_std^2)``, ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` and
``L = lambda(sigma) * mean_pixels (D(x + sigma n; sigma) - x)^2``, one value per sample.
The caller reduces (the reference code sums over pixels; here pixels are averaged, which
only rescales the loss by 1/(C H W)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .precond import Denoiser

__all__ = ["EDMLoss", "edm_loss_weight", "sample_log_normal_sigma"]


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. Table 1)."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


def sample_log_normal_sigma(
    n: int,
    *,
    p_mean: float,
    p_std: float,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` noise levels with ``ln sigma ~ N(p_mean, p_std^2)`` on ``like``'s device/dtype."""
    z = torch.randn(n, generator=generator, device=like.device, dtype=like.dtype)
    return (z * p_std + p_mean).exp()


@dataclass(frozen=True)
class EDMLoss:
    """Per-sample EDM loss (Karras et al. 2022, training section; SFBD P1 Eq. 4).

    Attributes:
        P_mean: mean of ln(sigma) during training.
        P_std: standard deviation of ln(sigma) during training.
        sigma_data: data standard deviation used in lambda(sigma).
    """

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Return the loss of each sample, shape ``(B,)``.

        Args:
            denoiser: callable ``D(x, sigma)``.
            x: clean training images ``(B, C, H, W)``.
            generator: source of randomness for sigma and noise when they are not given.
            sigma: optional per-sample noise levels ``(B,)`` (or a scalar) to use instead of sampling.
            noise: optional unit-variance noise like ``x`` to use instead of sampling.
        """
        if sigma is None:
            sigma = sample_log_normal_sigma(
                x.shape[0], p_mean=self.P_mean, p_std=self.P_std, like=x, generator=generator
            )
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        denoised = denoiser(x + s * noise, sigma)
        weight = edm_loss_weight(sigma, self.sigma_data)
        return weight * (denoised - x).square().flatten(1).mean(dim=1)
