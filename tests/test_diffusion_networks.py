"""U-Net shapes, parameter count of the reference config, and Opacus compatibility."""

import copy

import pytest
import torch
from torch import nn

from sfbd_guard.diffusion.networks import UNet, UNetConfig, build_denoiser, count_parameters
from sfbd_guard.diffusion.precond import EDMPrecond

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.1)
REFERENCE_I = UNetConfig(model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(8,), dropout=0.0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [8, 16, 32])
def test_output_shape(channels: int, res: int) -> None:
    net = build_denoiser(TINY, res, channels)
    x = torch.randn(2, channels, res, res)
    out = net(x, torch.tensor([0.1, 3.0]))
    assert isinstance(net, EDMPrecond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_resolution_64_three_levels() -> None:
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 1, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.0)
    net = build_denoiser(cfg, 64, 3)
    assert net(torch.randn(1, 3, 64, 64), 1.0).shape == (1, 3, 64, 64)


def test_reference_config_has_about_1_03m_parameters() -> None:
    net = build_denoiser(REFERENCE_I, 16, 3)
    assert count_parameters(net) == pytest.approx(1.03e6, rel=0.01)


def test_attention_sits_at_requested_resolution() -> None:
    seen: list[int] = []
    net = UNet(REFERENCE_I, 16, 3)
    for module in net.modules():
        if type(module).__name__ == "SelfAttention":
            module.register_forward_hook(lambda m, inp, out: seen.append(out.shape[-1]))
    net(torch.randn(1, 3, 16, 16), torch.zeros(1))
    assert seen and set(seen) == {8}


def test_no_batchnorm_and_only_standard_param_layers() -> None:
    net = build_denoiser(TINY, 16, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in net.modules())
    for module in net.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm)), type(module)


def test_opacus_validator_accepts_network() -> None:
    validators = pytest.importorskip("opacus.validators")
    net = build_denoiser(TINY, 8, 3)
    assert validators.ModuleValidator.validate(net, strict=False) == []


def test_augment_labels_are_used() -> None:
    cfg = UNetConfig(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), augment_dim=9, dropout=0.0)
    net = build_denoiser(cfg, 8, 1)
    for p in net.parameters():  # make the output depend on the embedding
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 1, 8, 8)
    a = net(x, 1.0, torch.zeros(2, 9))
    b = net(x, 1.0, torch.ones(2, 9))
    assert not torch.allclose(a, b)


def test_invalid_config_lists_problems() -> None:
    with pytest.raises(ValueError, match=r"num_blocks.*dropout"):
        UNetConfig(num_blocks=0, dropout=1.5)


def test_opacus_per_sample_gradients_match_single_sample_backward() -> None:
    opacus = pytest.importorskip("opacus")
    from sfbd_guard.diffusion.loss import EDMLoss

    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    torch.manual_seed(0)
    net = build_denoiser(cfg, 8, 3)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 0.7, 3.0])
    plain = copy.deepcopy(net)
    gs = opacus.GradSampleModule(net, loss_reduction="sum")
    EDMLoss()(gs, x, sigma=sigma, noise=noise).sum().backward()
    per_sample = [p.grad_sample[1] for p in net.parameters()]
    EDMLoss()(plain, x[1:2], sigma=sigma[1:2], noise=noise[1:2]).sum().backward()
    for ps, p in zip(per_sample, plain.parameters(), strict=True):
        torch.testing.assert_close(ps, p.grad, rtol=1e-3, atol=1e-6)
