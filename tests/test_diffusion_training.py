"""EMA arithmetic, optimiser helpers, and a few training steps reducing the EDM loss."""

import math

import pytest
import torch
from torch import nn

from sfbd_guard.diffusion.ema import EMA, ema_beta
from sfbd_guard.diffusion.loss import EDMLoss
from sfbd_guard.diffusion.networks import UNetConfig, build_denoiser
from sfbd_guard.diffusion.optim import (
    clip_grad_norm_,
    make_adam,
    optimizer_step,
    sanitize_grads_,
    warmup_lr,
)


def test_ema_beta_halves_weight_after_one_halflife() -> None:
    # 500 kimg half-life, batch 500: 1000 steps make one half-life.
    beta = ema_beta(500, 10**9, halflife_kimg=500, rampup_ratio=None)
    assert beta**1000 == pytest.approx(0.5)
    assert beta == pytest.approx(0.5 ** (500 / 500_000))


def test_ema_rampup_caps_halflife() -> None:
    # cur_nimg = 10_000, ratio 0.05: half-life 500 images -> beta = 0.5 ** (100 / 500)
    assert ema_beta(100, 10_000, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.5**0.2)
    assert ema_beta(100, 0, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.0)


def test_ema_update_and_state_roundtrip() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, halflife_kimg=0.001, rampup_ratio=None)  # 1-image half-life
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    beta = ema.update(net, batch_size=1, cur_nimg=1)
    assert beta == pytest.approx(0.5)
    torch.testing.assert_close(ema.module.weight, before + 0.5)
    assert not ema.module.weight.requires_grad
    other = EMA(nn.Linear(2, 2))
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.module.weight, ema.module.weight)
    assert other.halflife_kimg == 0.001 and other.rampup_ratio is None


def test_warmup_lr_is_linear_then_constant() -> None:
    assert warmup_lr(1e-3, 0, 10) == 0.0
    assert warmup_lr(1e-3, 5_000, 10) == pytest.approx(5e-4)
    assert warmup_lr(1e-3, 20_000, 10) == pytest.approx(1e-3)
    assert warmup_lr(1e-3, 0, 0) == 1e-3


def test_sanitize_and_clip_gradients() -> None:
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([math.nan, math.inf, -math.inf, 2.0])
    sanitize_grads_([p])
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 1e5, -1e5, 2.0]))
    q = nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, 4.0])
    norm = clip_grad_norm_([q], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert q.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def _eval_loss(net: nn.Module, data: torch.Tensor, loss_fn: EDMLoss) -> float:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(loss_fn(net, data, generator=g).mean().item() for _ in range(4)) / 4


def test_few_adam_steps_reduce_edm_loss() -> None:
    torch.manual_seed(0)  # network initialisation only
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    net = build_denoiser(cfg, 8, 1)
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 8)
    phase = torch.rand(16, 1, 1, 1, generator=g) * 6.0
    data = torch.sin(3 * ramp[None, None, :, None] + 2 * ramp[None, None, None, :] + phase)  # smooth, in [-1, 1]
    loss_fn = EDMLoss()
    ema = EMA(net, halflife_kimg=0.05, rampup_ratio=None)
    opt = make_adam(net.parameters(), lr=2e-3)
    params = list(net.parameters())
    start = _eval_loss(net, data, loss_fn)
    for step in range(40):
        opt.zero_grad(set_to_none=True)
        loss_fn(net, data, generator=g).mean().backward()
        optimizer_step(opt, params, base_lr=2e-3, cur_nimg=step * 16, warmup_kimg=0.1, max_grad_norm=10.0)
        ema.update(net, 16, (step + 1) * 16)
    end = _eval_loss(net, data, loss_fn)
    assert end < 0.8 * start, (start, end)
    assert _eval_loss(ema.module, data, loss_fn) < start
