"""EDM preconditioning and loss on hand-computed values (Karras et al. 2022, Table 1)."""

import math

import pytest
import torch
from torch import nn

from sfbd_guard.diffusion.loss import EDMLoss, edm_loss_weight
from sfbd_guard.diffusion.precond import EDMPrecond, edm_scalings


class ConstInner(nn.Module):
    """F(x_in, c_noise) = value everywhere; records its inputs."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.zeros(()))  # gives the module a float32 dtype
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        self.seen.append((x, c_noise))
        return torch.full_like(x, self.value) + self.weight


def test_scalings_at_sigma_half() -> None:
    # sigma = sigma_data = 0.5: s^2 + sd^2 = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(0.5, dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4)


def test_scalings_at_sigma_two() -> None:
    # sigma = 2: s^2 + sd^2 = 4.25
    c_skip, c_out, c_in, c_noise = edm_scalings(2.0)
    assert c_skip.item() == pytest.approx(0.25 / 4.25)
    assert c_out.item() == pytest.approx(1.0 / math.sqrt(4.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(4.25))
    assert c_noise.item() == pytest.approx(math.log(2.0) / 4)


def test_precond_combines_skip_and_output() -> None:
    inner = ConstInner(3.0)
    net = EDMPrecond(inner)
    x = torch.ones(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 2.0])
    out = net(x, sigma)
    expected_0 = 0.5 * 1 + (0.25 / math.sqrt(0.5)) * 3.0
    expected_1 = (0.25 / 4.25) * 1 + (1.0 / math.sqrt(4.25)) * 3.0
    torch.testing.assert_close(out[0], torch.full((1, 2, 2), expected_0))
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), expected_1))
    x_in, c_noise = inner.seen[-1]
    torch.testing.assert_close(x_in[1], torch.full((1, 2, 2), 1 / math.sqrt(4.25)))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)


def test_precond_scalar_sigma_and_float64_state() -> None:
    inner = ConstInner(0.0)
    net = EDMPrecond(inner)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = net(x, 0.5)
    assert out.dtype == torch.float64
    assert inner.seen[-1][0].dtype == torch.float32  # the inner net runs in its own dtype
    torch.testing.assert_close(out, 0.5 * x)


def test_precond_rejects_wrong_sigma_length() -> None:
    net = EDMPrecond(ConstInner(0.0))
    with pytest.raises(ValueError, match="sigma has 2 entries"):
        net(torch.zeros(3, 1, 2, 2), torch.ones(2))


def test_loss_weight_values() -> None:
    sigma = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(edm_loss_weight(sigma), torch.tensor([0.5 / 0.0625, 4.25 / 1.0]))


def test_loss_with_given_sigma_and_noise() -> None:
    # D = c_skip * y with F = 0, y = x + sigma n; loss = lambda * mean((c_skip y - x)^2).
    net = EDMPrecond(ConstInner(0.0))
    x = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])
    noise = torch.tensor([[[[0.0, 2.0]]], [[[1.0, 1.0]]]])
    sigma = torch.tensor([0.5, 2.0])
    loss = EDMLoss()(net, x, sigma=sigma, noise=noise)
    assert loss.shape == (2,)
    y0, y1 = x[0] + 0.5 * noise[0], x[1] + 2.0 * noise[1]
    e0 = 8.0 * ((0.5 * y0 - x[0]) ** 2).mean()
    e1 = 4.25 * (((0.25 / 4.25) * y1 - x[1]) ** 2).mean()
    torch.testing.assert_close(loss, torch.stack([e0, e1]))


def test_loss_is_reproducible_with_generator() -> None:
    net = EDMPrecond(ConstInner(0.1))
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loss_fn = EDMLoss()
    a = loss_fn(net, x, generator=torch.Generator().manual_seed(1))
    b = loss_fn(net, x, generator=torch.Generator().manual_seed(1))
    c = loss_fn(net, x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
