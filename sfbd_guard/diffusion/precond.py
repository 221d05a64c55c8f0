"""EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7).

The denoiser is ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``
with ``sigma_data = 0.5`` and ``c_noise = ln(sigma) / 4``. Everything in SFBD
(training, the backward solver of P1 Alg. 1, generation) talks to a network through this
interface: ``denoiser(x, sigma) -> x0_hat``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = ["Denoiser", "EDMPrecond", "edm_scalings", "as_sigma_tensor"]


class Denoiser(Protocol):
    """Anything that maps ``(x: (B, C, H, W), sigma: scalar or (B,))`` to ``D(x; sigma)``."""

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor: ...


def as_sigma_tensor(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return sigma as a ``(B,)`` tensor on ``x``'s device and dtype (scalar sigmas are broadcast)."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if s.ndim == 0:
        return s.expand(x.shape[0])
    s = s.reshape(-1)
    if s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {s.shape[0]} entries but the batch has {x.shape[0]} samples")
    return s


def edm_scalings(
    sigma: Tensor | float, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning coefficients (Karras et al. 2022, Table 1, "Ours").

    Args:
        sigma: noise level, scalar or tensor of any shape (kept).
        sigma_data: standard deviation of the data.

    Returns:
        ``(c_skip, c_out, c_in, c_noise)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
        ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = ln(s) / 4``.
    """
    s = torch.as_tensor(sigma)
    s = s if s.is_floating_point() else s.to(torch.get_default_dtype())
    total = s.square() + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = s * sigma_data / total.sqrt()
    c_in = total.rsqrt()
    c_noise = s.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Wrap an inner network ``F(x_in, c_noise[, augment_labels])`` into the EDM denoiser D.

    The inner network runs in its own parameter dtype (normally float32); the skip path and
    the output are computed in the dtype of ``x`` so float64 sampler states stay float64.

    Args:
        inner: network taking ``(x: (B, C, H, W), c_noise: (B,))`` (and optionally augment labels).
        sigma_data: data standard deviation (EDM: 0.5).
        sigma_min: smallest supported noise level (metadata for samplers).
        sigma_max: largest supported noise level (metadata for samplers).
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        sigma_data: float = 0.5,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def _inner_dtype(self, x: Tensor) -> torch.dtype:
        param = next(self.inner.parameters(), None)
        return x.dtype if param is None else param.dtype

    def forward(
        self, x: Tensor, sigma: Tensor | float, augment_labels: Tensor | None = None
    ) -> Tensor:
        """Return ``D(x; sigma)``: x ``(B, C, H, W)``, sigma scalar or ``(B,)``; same dtype as x."""
        s = as_sigma_tensor(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(s.reshape(-1, 1, 1, 1), self.sigma_data)
        dtype = self._inner_dtype(x)
        args = (c_in * x).to(dtype), c_noise.reshape(-1).to(dtype)
        f_x: Tensor = self.inner(*args) if augment_labels is None else self.inner(*args, augment_labels.to(dtype))
        return c_skip * x + c_out * f_x.to(x.dtype)
