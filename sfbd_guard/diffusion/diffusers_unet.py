"""A diffusers `UNet2DModel` as the inner network F of the EDM denoiser (`network: diffusers-unet2d`).

EDM's preconditioning (precond.py) calls ``F(c_in x, c_noise)``; a `UNet2DModel` called with ``timestep = c_noise``
is such an F. diffusers' `EDMEulerScheduler` (``prediction_type="epsilon"``, ``sigma_data=0.5``) computes the same
``c_in``, ``c_noise = ln(sigma) / 4`` and ``D = c_skip x + c_out F`` around the model, so the weights trained here
sample in diffusers with that scheduler unchanged (docs/export.md).

The U-Net's shape comes from the pipeline's `model:` keys, as our own network's does: level i has
``model_channels × channel_mult[i]`` channels and ``num_blocks`` residual blocks, attention at `attn_resolutions`
(and in the middle block, as diffusers always has it); GroupNorm with ``min(32, model_channels // 4)`` groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .networks import UNetConfig
from .precond import EDMPrecond

__all__ = ["DiffusersUNet", "unet2d_config", "build_diffusers_denoiser", "unet_of"]


def unet2d_config(cfg: UNetConfig, resolution: int, channels: int) -> dict[str, Any]:
    """The `UNet2DModel` keyword arguments of a U-Net of `cfg`'s shape for ``channels × resolution²`` images."""
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    groups = min(32, cfg.model_channels // 4)
    if any(width % groups for width in widths):
        raise ValueError(f"invalid diffusers-unet2d: GroupNorm's {groups} groups do not divide the level widths "
                         f"{widths}; choose model_channels of at most 128, or a multiple of 32")
    attention = [resolution >> level in cfg.attn_resolutions for level in range(len(widths))]
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_blocks,
        "down_block_types": ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention],
        "up_block_types": ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)],
        "dropout": cfg.dropout,
        "norm_num_groups": groups,
        "attention_head_dim": None if cfg.num_heads == 1 else cfg.model_channels // cfg.num_heads,
        "time_embedding_type": "positional",  # sinusoidal embedding of c_noise, as EDM's own U-Net has it
    }


class DiffusersUNet(nn.Module):
    """``F(x_in, c_noise) = unet(x_in, timestep=c_noise).sample``: a `UNet2DModel` behind EDM's preconditioning."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import UNet2DModel  # heavy, and only for this network

        self.unet: Any = UNet2DModel(**config)  # type: ignore[no-untyped-call]  # (diffusers is not typed throughout)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        out: Tensor = self.unet(x, c_noise, return_dict=False)[0]
        return out


def build_diffusers_denoiser(cfg: UNetConfig, resolution: int, channels: int, *,
                             sigma_data: float = 0.5) -> EDMPrecond:
    """``EDMPrecond(DiffusersUNet(...))`` for images of the given shape."""
    return EDMPrecond(DiffusersUNet(unet2d_config(cfg, resolution, channels)), sigma_data=sigma_data)


def unet_of(denoiser: torch.nn.Module) -> Any:
    """The `UNet2DModel` inside a denoiser built by `build_diffusers_denoiser` (for export)."""
    inner = getattr(denoiser, "inner", None)
    if not isinstance(inner, DiffusersUNet):
        raise TypeError("not a diffusers-unet2d denoiser")
    return inner.unet
