"""Noise schedules and probability-flow ODE samplers (Karras et al. 2022, Algorithms 1-2).

Samplers are pure functions of ``(denoiser, x, sigmas)`` in the k-diffusion shape: ``x`` is
already at noise level ``sigmas[0]`` and the grid ends with 0. SFBD's backward step (P1
Alg. 1, line 3; realised in the reference code as a deterministic Heun PF-ODE from the
corruption level) is the *same* sampler on a grid that starts at ``sigma_zeta``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .precond import Denoiser, as_sigma_tensor

__all__ = [
    "karras_sigmas",
    "truncate_sigmas",
    "backward_sigmas",
    "count_nfe",
    "sample_euler",
    "sample_heun",
    "sample_ancestral",
    "row_generators",
    "denoise_backward",
]

Solver = Literal["heun", "euler"]
BackwardSolver = Literal["heun", "euler", "mean", "sde"]
Callback = Callable[[dict[str, Any]], None]


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5) plus a final 0: ``n + 1`` decreasing values.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, device=device, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def truncate_sigmas(sigmas: Tensor, start: float, *, rtol: float = 1e-3) -> Tensor:
    """Start a decreasing grid at ``start``: the backward solver of SFBD starts at a copy's own sigma.

    Drops every point ``>= start * (1 - rtol)``, so no step is (nearly) zero-length, and
    prepends ``start``. ``rtol=0`` reproduces the reference code, which at sigma 1.3824 keeps
    a 3e-5 step to the grid point 1.38237 and spends two evaluations on it.

    Returns:
        ``(m,)`` tensor: ``start`` first, strictly decreasing, ending at ``sigmas[-1]`` (0).
    """
    if start <= 0:
        raise ValueError(f"start must be > 0, got {start}")
    if sigmas.ndim != 1 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be a strictly decreasing 1-D tensor")
    kept = sigmas[sigmas < start * (1 - rtol)]
    return torch.cat([sigmas.new_full((1,), start), kept])


def backward_sigmas(
    sigma: float,
    steps: int,
    *,
    grid: Literal["edm", "fitted"] = "edm",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    rtol: float = 1e-3,
) -> Tensor:
    """Grid for the backward solver from ``sigma`` to 0.

    ``grid="edm"``: the ``steps``-point EDM grid from ``sigma_max``, truncated at ``sigma``
    (the reference uses ``steps=40``, ``rtol=0``). ``grid="fitted"``: ``steps`` points placed by
    Eq. 5 directly on ``[sigma_min, sigma]`` (``sigma_max`` unused), then 0.
    """
    if grid == "edm":
        full = karras_sigmas(steps, sigma_min, sigma_max, rho)
        return truncate_sigmas(full, sigma, rtol=rtol)
    if grid == "fitted":
        return karras_sigmas(steps, sigma_min, sigma, rho)
    raise ValueError(f"unknown grid {grid!r}; expected 'edm' or 'fitted'")


def count_nfe(sigmas: Tensor, solver: Solver = "heun") -> int:
    """Network evaluations per image of ``solver`` on ``sigmas`` (Heun: Euler step into 0)."""
    steps = sigmas.numel() - 1
    if solver == "euler":
        return steps
    if solver == "heun":
        return 2 * steps - int(float(sigmas[-1]) == 0.0)
    raise ValueError(f"unknown solver {solver!r}; expected 'heun' or 'euler'")


def _churn(
    x: Tensor,
    sigma: float,
    gamma: float,
    s_noise: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, float]:
    """Stochastic 'churn' of EDM Algorithm 2 (lines 4-6): raise sigma to sigma*(1+gamma)."""
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + eps * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def _ode_slope(denoiser: Denoiser, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """PF-ODE slope ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. Eq. 3 with sigma(t)=t)."""
    denoised = denoiser(x, as_sigma_tensor(sigma, x)).to(x.dtype)
    return (x - denoised) / sigma, denoised


def _sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    heun: bool,
    churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
    callback: Callback | None,
    state_dtype: torch.dtype | None,
) -> Tensor:
    """Shared Euler/Heun loop of EDM Algorithm 2 (Heun correction skipped on the step into 0)."""
    out_dtype = x.dtype
    x = x.to(state_dtype or x.dtype)
    grid = [float(s) for s in sigmas]
    n = len(grid) - 1
    for i in range(n):
        cur, nxt = grid[i], grid[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= cur <= s_tmax else 0.0
        x, cur = _churn(x, cur, gamma, s_noise, generator)
        d, denoised = _ode_slope(denoiser, x, cur)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": grid[i], "sigma_hat": cur, "denoised": denoised})
        x_next = x + (nxt - cur) * d
        if heun and nxt > 0:
            d_next, _ = _ode_slope(denoiser, x_next, nxt)
            x_next = x + (nxt - cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x.to(out_dtype)


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | None = None,
) -> Tensor:
    """Heun PF-ODE sampler, EDM Algorithm 2 (deterministic when ``churn == 0``).

    Args:
        denoiser: ``D(x, sigma)``.
        x: start state at noise level ``sigmas[0]``, ``(B, C, H, W)``.
        sigmas: decreasing grid ending with 0 (``karras_sigmas`` / ``truncate_sigmas``).
        churn: EDM's ``S_churn``; with ``s_tmin, s_tmax, s_noise`` controls the added noise.
        generator: randomness for the churn noise.
        callback: called once per step with ``x, i, sigma, sigma_hat, denoised``.
        state_dtype: dtype of the integration state (e.g. ``torch.float64``); default ``x.dtype``.

    Returns:
        The final state, same dtype as ``x``.
    """
    return _sample(
        denoiser, x, sigmas, heun=True, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax,
        s_noise=s_noise, generator=generator, callback=callback, state_dtype=state_dtype,
    )


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | None = None,
) -> Tensor:
    """Euler PF-ODE sampler (EDM Algorithm 2 without the 2nd-order correction); see ``sample_heun``."""
    return _sample(
        denoiser, x, sigmas, heun=False, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax,
        s_noise=s_noise, generator=generator, callback=callback, state_dtype=state_dtype,
    )


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def row_generators(seed: int, rows: Sequence[int] | Tensor) -> list[torch.Generator]:
    """One CPU generator per row, a function of ``(seed, row)`` only: a row's noise does not depend on the
    batch it is in or on the number of processes."""
    return [torch.Generator().manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ int(r)) >> 1) for r in rows]


def sample_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, generators: Sequence[torch.Generator],
                     *, state_dtype: torch.dtype | None = None, corrected: bool = True) -> Tensor:
    """Posterior sampling by the reverse (variance-exploding) SDE, one Gaussian step per grid interval.

    A step from ``s`` to ``t < s`` draws ``x_t`` with the exact conditional mean ``D + (t/s)^2 (x_s - D)``,
    ``D = D(x_s; s)``, and variance ``t^2 (1 - r) + (1 - r)^2 v``, ``r = (t/s)^2``, where ``v`` is the posterior
    variance of the clean image given ``x_s``, ``s^2 tr(dD/dx) / d`` (Tweedie's second-order identity, the trace
    by one Rademacher probe and a finite difference: a second network evaluation). The step is exact for
    Gaussian data at any step size; ``corrected=False`` drops ``v`` (the DDPM ancestral step, which needs many
    steps: it under-draws the spread). The step into 0 returns ``D``. Started at ``y`` with an exact denoiser
    it draws from ``p(x | y)``: the SFBD paper's backward SDE (P1 Eq. 3), where the PF-ODE maps ``y`` to one
    point. ``generators``: one per image, so an image's noise depends on its own generator only.
    """
    if len(generators) != len(x):
        raise ValueError(f"need one generator per image: {len(generators)} for {len(x)} images")
    out_dtype = x.dtype
    x = x.to(state_dtype or x.dtype)
    dims = tuple(range(1, x.ndim))
    pixels = x[0].numel()

    def draw(rademacher: bool) -> Tensor:
        if rademacher:
            parts = [torch.randint(0, 2, x.shape[1:], generator=g).float() * 2 - 1 for g in generators]
        else:
            parts = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(parts).to(x.device, x.dtype)

    for cur, nxt in itertools.pairwise(float(s) for s in sigmas):
        denoised = denoiser(x, as_sigma_tensor(cur, x)).to(x.dtype)
        if nxt <= 0:
            x = denoised
            break
        ratio = (nxt / cur) ** 2
        variance = torch.full((len(x),), nxt**2 * (1 - ratio), dtype=x.dtype, device=x.device)
        if corrected:
            probe, step = draw(True), 0.05 * cur
            moved = denoiser(x + step * probe, as_sigma_tensor(cur, x)).to(x.dtype)
            slope = ((moved - denoised) * probe).sum(dims) / (step * pixels)
            variance = variance + (1 - ratio) ** 2 * cur**2 * slope.clamp(0.0, 1.0)
        spread = variance.sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        x = denoised + ratio * (x - denoised) + spread * draw(False)
    return x.to(out_dtype)


def denoise_backward(
    denoiser: Denoiser,
    y: Tensor,
    sigma: float,
    *,
    steps: int = 40,
    solver: BackwardSolver = "heun",
    seeds: tuple[int, Sequence[int] | Tensor] | None = None,
    grid: Literal["edm", "fitted"] = "edm",
    rho: float = 7.0,
    sigma_min: float = 0.002,
    rtol: float = 1e-3,
    state_dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """SFBD backward step (P1 Alg. 1, line 3): integrate the PF-ODE from ``y`` at ``sigma`` to 0.

    Deterministic (the released SFBD code uses ``S_churn = 0``). The default grid is the
    ``steps``-point EDM grid truncated at ``sigma`` (see ``backward_sigmas``).

    Args:
        denoiser: ``D(x, sigma)`` (normally the EMA network).
        y: noisy images ``y = x + sigma * eps``, ``(B, C, H, W)``.
        sigma: corruption level sigma_zeta (relative to the [-1, 1] pixel range).
        solver: ``heun`` or ``euler`` integrate the PF-ODE; ``mean`` returns the model's posterior mean
            ``D(y; sigma)`` instead (one evaluation; a blurrier set, measured in benchmarks/quality.py);
            ``sde`` draws a posterior sample (``sample_ancestral``, one evaluation per grid step).
        seeds: ``sde`` only: ``(seed, row of each image)``, whose generators (``row_generators``) draw its noise.

    Returns:
        Denoised images, same shape and dtype as ``y``.
    """
    if solver == "mean":  # the posterior mean E[x | y] (Tweedie): one evaluation, no integration
        return denoiser(y, as_sigma_tensor(sigma, y)).to(y.dtype)
    sigmas = backward_sigmas(sigma, steps, grid=grid, sigma_min=sigma_min, rho=rho, rtol=rtol)
    if solver == "sde":
        if seeds is None:
            raise ValueError("the sde solver needs seeds: (seed, row of each image)")
        generators = row_generators(seeds[0], seeds[1])
        return sample_ancestral(denoiser, y, sigmas.to(y.device), generators, state_dtype=state_dtype)
    sampler = sample_heun if solver == "heun" else sample_euler
    if solver not in ("heun", "euler"):
        raise ValueError(f"unknown solver {solver!r}; expected 'heun', 'euler', 'mean' or 'sde'")
    return sampler(denoiser, y, sigmas.to(y.device), state_dtype=state_dtype)
