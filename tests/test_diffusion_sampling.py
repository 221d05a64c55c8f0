"""Schedules, samplers and the SFBD backward solver against a Gaussian-data oracle."""

import math

import pytest
import torch

from sfbd_guard.diffusion.sampling import (
    backward_sigmas,
    count_nfe,
    denoise_backward,
    karras_sigmas,
    row_generators,
    sample_ancestral,
    sample_euler,
    sample_heun,
    truncate_sigmas,
)

S = 0.3  # data standard deviation of the Gaussian test distribution


def gaussian_oracle(mu: torch.Tensor, s: float):
    """Exact denoiser for x ~ N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mu + s**2 / (s**2 + sig**2) * (x - mu)

    return denoiser


def pf_ode_exact(y: torch.Tensor, mu: torch.Tensor, s: float, sigma: float) -> torch.Tensor:
    """PF-ODE from sigma to 0 for Gaussian data: y -> mu + s / sqrt(s^2 + sigma^2) (y - mu)."""
    return mu + s / math.sqrt(s**2 + sigma**2) * (y - mu)


def make_mu(channels: int = 3, res: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.rand(1, channels, res, res, generator=g, dtype=torch.float64) - 0.5)


def test_karras_sigmas_endpoints() -> None:
    sig = karras_sigmas(18)
    assert sig.shape == (19,)
    assert sig[0].item() == pytest.approx(80.0)
    assert sig[-2].item() == pytest.approx(0.002)
    assert sig[-1].item() == 0.0
    assert bool((sig[:-1] > sig[1:]).all())


def test_reference_sigmas_lie_on_edm_grids() -> None:
    # 0.59 and 1.3824 are points of the rho=7 grids with 18 and 40 steps.
    assert karras_sigmas(18).sub(0.58535).abs().min().item() < 1e-4
    assert karras_sigmas(40).sub(1.38237).abs().min().item() < 1e-4


@pytest.mark.parametrize("start", [0.2, 0.59, 1.09, 1.3824, 5.0])
def test_truncated_grid_properties(start: float) -> None:
    sig = truncate_sigmas(karras_sigmas(40), start)
    assert sig[0].item() == start
    assert sig[-1].item() == 0.0
    assert bool((sig[:-1] > sig[1:]).all())  # strictly decreasing
    assert (sig[0] - sig[1]).item() > 1e-3 * start  # no near-zero first step


@pytest.mark.parametrize(("start", "nfe_ref", "nfe_ours"), [(0.59, 29, 29), (1.3824, 37, 35)])
def test_nfe_matches_reference_and_drops_wasted_step(start: float, nfe_ref: int, nfe_ours: int) -> None:
    assert count_nfe(backward_sigmas(start, 40, rtol=0.0)) == nfe_ref
    assert count_nfe(backward_sigmas(start, 40)) == nfe_ours
    assert count_nfe(backward_sigmas(start, 40), "euler") == (nfe_ours + 1) // 2


def test_fitted_grid() -> None:
    sig = backward_sigmas(0.59, 8, grid="fitted")
    assert sig.shape == (9,)
    assert sig[0].item() == pytest.approx(0.59) and sig[-1].item() == 0.0
    assert sig[-2].item() == pytest.approx(0.002)


@pytest.mark.parametrize("sigma", [0.2, 0.59, 1.3824])
def test_backward_solver_matches_analytic_pf_ode(sigma: float) -> None:
    mu = make_mu()
    g = torch.Generator().manual_seed(0)
    x = mu + S * torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    y = (x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)).float()
    out = denoise_backward(gaussian_oracle(mu, S), y, sigma, steps=40)
    assert out.dtype == torch.float32
    exact = pf_ode_exact(y.double(), mu, S, sigma)
    scale = (exact - mu).abs().max().item()
    assert (out.double() - exact).abs().max().item() < 0.02 * scale  # 40-step EDM grid: ~1 % discretisation error


def test_backward_solver_is_second_order() -> None:
    mu, sigma = make_mu(), 0.59
    y = mu + 0.6 * torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = pf_ode_exact(y, mu, S, sigma)
    err = {n: (denoise_backward(gaussian_oracle(mu, S), y, sigma, steps=n) - exact).abs().max() for n in (40, 160)}
    assert err[160].item() < 1e-3 * (exact - mu).abs().max().item()
    assert 10.0 < (err[40] / err[160]).item() < 25.0  # 4x steps -> ~16x smaller error


def test_euler_backward_is_first_order_close() -> None:
    mu, sigma = make_mu(), 0.59
    y = mu + 0.6 * torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = pf_ode_exact(y, mu, S, sigma)
    err = {
        n: (denoise_backward(gaussian_oracle(mu, S), y, sigma, steps=n, solver="euler") - exact).abs().max()
        for n in (40, 160)
    }
    assert err[160] < err[40] / 1.8 and err[40] < 0.1


def test_sampler_from_sigma_max_gives_data_moments() -> None:
    mu = make_mu(channels=1)
    g = torch.Generator().manual_seed(3)
    x = 80.0 * torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64)
    out = sample_heun(gaussian_oracle(mu, S), x, karras_sigmas(40))
    torch.testing.assert_close(out.mean(0, keepdim=True), mu, atol=0.03, rtol=0)
    assert out.std(0).mean().item() == pytest.approx(S, rel=0.03)  # 40-step bias ~1 %


def test_float64_state_returns_input_dtype() -> None:
    mu = make_mu().float()
    seen: list[torch.dtype] = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return gaussian_oracle(mu, S)(x, sigma)

    y = torch.randn(2, 3, 4, 4)
    out = sample_euler(denoiser, y, truncate_sigmas(karras_sigmas(10), 1.0), state_dtype=torch.float64)
    assert out.dtype == torch.float32 and set(seen) == {torch.float64}


def test_sampling_determinism() -> None:
    mu = make_mu()
    oracle = gaussian_oracle(mu, S)
    sig = karras_sigmas(6)

    def run(seed: int, churn: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = 80.0 * torch.randn(4, 3, 4, 4, generator=g)
        return sample_heun(oracle, x, sig, churn=churn, generator=g)

    torch.testing.assert_close(run(0, 0.0), run(0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(run(0, 5.0), run(0, 5.0), rtol=0, atol=0)
    assert not torch.allclose(run(0, 0.0), run(1, 0.0))
    assert not torch.allclose(run(0, 5.0), run(0, 0.0))


def test_callback_sees_every_step() -> None:
    calls: list[int] = []
    sig = karras_sigmas(5)
    sample_heun(gaussian_oracle(make_mu(), S), torch.zeros(1, 3, 4, 4), sig, callback=lambda d: calls.append(d["i"]))
    assert calls == list(range(5))


def test_unknown_solver_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown solver"):
        denoise_backward(gaussian_oracle(make_mu(), S), torch.zeros(1, 3, 4, 4), 0.5, solver="rk4")  # type: ignore[arg-type]


# ----- posterior sampling (denoise.solver: sde) -------------------------------------------------------------

@pytest.mark.parametrize("steps", [3, 8])
def test_sde_draws_from_the_gaussian_posterior(steps: int) -> None:
    """Many draws for one y: their mean and spread are the exact posterior's, at any step count (the corrected
    step is exact for Gaussian data); without the correction the few-step sampler under-draws the spread."""
    mu, sigma, n = make_mu(), 0.6, 3000
    y = (mu + 0.5 * torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))).expand(n, -1, -1, -1)
    out = denoise_backward(gaussian_oracle(mu, S), y, sigma, steps=steps, grid="fitted", rho=2, sigma_min=0.02,
                           solver="sde", seeds=(5, torch.arange(n)))
    post_mean = mu + S**2 / (S**2 + sigma**2) * (y[0] - mu)
    post_var = S**2 * sigma**2 / (S**2 + sigma**2)
    assert (out.mean(0) - post_mean).abs().max().item() < 5 * math.sqrt(post_var / n)
    assert out.var(0).mean().item() == pytest.approx(post_var, rel=0.05)
    plain = sample_ancestral(gaussian_oracle(mu, S), y.double(), backward_sigmas(sigma, 3, grid="fitted", rho=2,
                             sigma_min=0.02), row_generators(5, range(n)), corrected=False)
    assert plain.var(0).mean().item() < 0.6 * post_var


def test_sde_noise_belongs_to_the_row_not_the_batch() -> None:
    """A row's draw depends on (seed, row) only: the same in any batch, different under another seed."""
    y = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    oracle = gaussian_oracle(make_mu(), S)

    def run(part: slice, seed: int) -> torch.Tensor:
        return denoise_backward(oracle, y[part], 0.5, steps=6, solver="sde", seeds=(seed, torch.arange(6)[part]))

    whole = run(slice(0, 6), 7)
    assert torch.equal(run(slice(3, 6), 7), whole[3:])
    assert not torch.allclose(run(slice(0, 6), 8), whole)
    with pytest.raises(ValueError, match="needs seeds"):
        denoise_backward(oracle, y, 0.5, solver="sde")
