"""DDPM++-style U-Net for EDM (Song et al. 2021 "DDPM++" as configured by Karras et al. 2022).

Layout (per resolution level, encoder then mirrored decoder): an input 3x3 conv, residual
blocks ``GroupNorm -> SiLU -> conv3x3 -> (+ per-channel noise embedding) -> GroupNorm -> SiLU
-> dropout -> conv3x3`` with a skip connection scaled by ``sqrt(1/2)``, self-attention at
chosen resolutions, and down/up-sampling residual blocks (2x2 average pool / nearest x2).
The noise level enters as the positional embedding of ``c_noise`` followed by a two-layer MLP.

Only ``nn.Conv2d``, ``nn.Linear`` and ``nn.GroupNorm`` carry parameters (no BatchNorm, no
``nn.MultiheadAttention``), so Opacus' hooks-mode per-sample gradients apply unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precond import EDMPrecond

__all__ = ["UNetConfig", "UNet", "build_denoiser", "count_parameters"]

_SKIP_SCALE = math.sqrt(0.5)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the DDPM++-style U-Net (EDM's ``SongUNet`` with ``ddpmpp`` options)."""

    model_channels: int = 128  # base channel count of the first level
    channel_mult: tuple[int, ...] = (2, 2, 2)  # per-level channel multiplier; level i has res >> i
    num_blocks: int = 4  # residual blocks per resolution (encoder); decoder has one more
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions with self-attention
    dropout: float = 0.10  # dropout probability inside residual blocks
    channel_mult_emb: int = 4  # embedding width = model_channels * channel_mult_emb
    channel_mult_noise: int = 1  # positional-embedding width = model_channels * this
    num_heads: int = 1  # attention heads
    augment_dim: int = 0  # augmentation-label width (0 = no augmentation conditioning)
    eps: float = 1e-6  # GroupNorm epsilon

    def __post_init__(self) -> None:
        problems = []
        if self.model_channels <= 0 or self.model_channels % 4:
            problems.append("model_channels must be a positive multiple of 4")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            problems.append("channel_mult must be a non-empty tuple of positive ints")
        if self.num_blocks < 1:
            problems.append("num_blocks must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.num_heads < 1 or self.model_channels % self.num_heads:
            problems.append("num_heads must divide model_channels")
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels // 4)`` groups (EDM convention)."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


def _init_(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """Xavier-uniform weights scaled by ``scale``, zero bias (EDM initialisation)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def conv(c_in: int, c_out: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    """Same-padding conv with EDM initialisation."""
    layer = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    _init_(layer, scale)
    return layer


def positional_embedding(c_noise: Tensor, channels: int, max_positions: int = 10000) -> Tensor:
    """Transformer sinusoidal embedding of ``c_noise`` (B,) -> (B, channels) (Vaswani et al. 2017)."""
    half = channels // 2
    freqs = torch.arange(half, device=c_noise.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = (1.0 / max_positions) ** freqs
    angles = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(c_noise.dtype)


def resample(x: Tensor, mode: str) -> Tensor:
    """2x2 average-pool (``down``), nearest x2 (``up``) or identity (``none``)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def _memory_format(x: Tensor) -> torch.memory_format:
    """``channels_last`` if ``x`` is stored that way (and not trivially NCHW), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SelfAttention(nn.Module):
    """Residual self-attention over pixels via ``F.scaled_dot_product_attention``."""

    def __init__(self, channels: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj = conv(channels, channels, 1, scale=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        # SDPA may return a (B, HW, heads, d) layout, which makes `out` channels-last. Keep the
        # input's memory format: Opacus' conv grad sampler (unfold2d via as_strided) silently
        # assumes NCHW-contiguous activations and returns wrong per-sample gradients otherwise.
        out = out.contiguous(memory_format=_memory_format(x))
        projected: Tensor = self.proj(out)
        return (projected + x) * _SKIP_SCALE


class ResBlock(nn.Module):
    """DDPM++ residual block with noise-embedding shift and optional resampling/attention."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_channels: int,
        cfg: UNetConfig,
        *,
        mode: str = "none",
        attention: bool = False,
    ) -> None:
        super().__init__()
        self.c_in, self.c_out, self.mode = c_in, c_out, mode
        self.norm0 = group_norm(c_in, cfg.eps)
        self.conv0 = conv(c_in, c_out, 3)
        self.affine = nn.Linear(emb_channels, c_out)
        _init_(self.affine)
        self.norm1 = group_norm(c_out, cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.conv1 = conv(c_out, c_out, 3, scale=1e-5)
        needs_skip = c_in != c_out or mode != "none"
        self.skip = conv(c_in, c_out, 1) if needs_skip else None
        self.attn = SelfAttention(c_out, cfg.num_heads, cfg.eps) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        h = self.conv0(resample(F.silu(self.norm0(x)), self.mode))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        skip = resample(orig, self.mode)
        skip = self.skip(skip) if self.skip is not None else skip
        x = (h + skip) * _SKIP_SCALE
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """DDPM++-style U-Net ``F(x_in, c_noise[, augment_labels]) -> (B, C, H, W)``."""

    def __init__(self, cfg: UNetConfig, img_resolution: int, img_channels: int) -> None:
        super().__init__()
        levels = len(cfg.channel_mult)
        if img_resolution % (2 ** (levels - 1)):
            raise ValueError(f"img_resolution {img_resolution} not divisible by 2^{levels - 1}")
        self.cfg = cfg
        noise_ch = cfg.model_channels * cfg.channel_mult_noise
        emb_ch = cfg.model_channels * cfg.channel_mult_emb
        self.noise_channels = noise_ch
        self.map_augment = nn.Linear(cfg.augment_dim, noise_ch, bias=False) if cfg.augment_dim else None
        self.map_layer0 = nn.Linear(noise_ch, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)
        for layer in (self.map_layer0, self.map_layer1, self.map_augment):
            if layer is not None:
                _init_(layer)
        self.in_conv = conv(img_channels, cfg.model_channels, 3)
        skips = self._build_encoder(cfg, img_resolution, emb_ch)
        self._build_decoder(cfg, img_resolution, emb_ch, skips)
        c_last = cfg.model_channels * cfg.channel_mult[0]
        self.out_norm = group_norm(c_last, cfg.eps)
        self.out_conv = conv(c_last, img_channels, 3, scale=0.2)

    def _build_encoder(self, cfg: UNetConfig, res0: int, emb_ch: int) -> list[int]:
        self.enc = nn.ModuleList()
        c, skips = cfg.model_channels, [cfg.model_channels]
        for level, mult in enumerate(cfg.channel_mult):
            res = res0 >> level
            if level > 0:
                self.enc.append(ResBlock(c, c, emb_ch, cfg, mode="down"))
                skips.append(c)
            for _ in range(cfg.num_blocks):
                c_out = cfg.model_channels * mult
                self.enc.append(ResBlock(c, c_out, emb_ch, cfg, attention=res in cfg.attn_resolutions))
                c = c_out
                skips.append(c)
        return skips

    def _build_decoder(self, cfg: UNetConfig, res0: int, emb_ch: int, skips: list[int]) -> None:
        self.dec = nn.ModuleList()
        takes_skip: list[bool] = []
        c = cfg.model_channels * cfg.channel_mult[-1]
        for level in reversed(range(len(cfg.channel_mult))):
            res = res0 >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec.append(ResBlock(c, c, emb_ch, cfg, attention=True))
                self.dec.append(ResBlock(c, c, emb_ch, cfg))
                takes_skip += [False, False]
            else:
                self.dec.append(ResBlock(c, c, emb_ch, cfg, mode="up"))
                takes_skip.append(False)
            for idx in range(cfg.num_blocks + 1):
                c_out = cfg.model_channels * cfg.channel_mult[level]
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec.append(ResBlock(c + skips.pop(), c_out, emb_ch, cfg, attention=attn))
                takes_skip.append(True)
                c = c_out
        self.takes_skip = tuple(takes_skip)

    def embed(self, c_noise: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """Noise embedding: positional embedding of c_noise (+ augment labels) -> 2-layer SiLU MLP."""
        emb = positional_embedding(c_noise, self.noise_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, c_noise: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """x: ``(B, C, H, W)`` (already scaled by c_in); c_noise: ``(B,)``."""
        emb = self.embed(c_noise, augment_labels)
        x = self.in_conv(x)
        skips = [x]
        for block in self.enc:
            x = block(x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.dec, self.takes_skip, strict=True):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        out: Tensor = self.out_conv(F.silu(self.out_norm(x)))
        return out


def build_denoiser(
    cfg: UNetConfig, img_resolution: int, img_channels: int, *, sigma_data: float = 0.5
) -> EDMPrecond:
    """Build the EDM denoiser ``D`` = ``EDMPrecond(UNet(cfg))`` for images of the given shape."""
    return EDMPrecond(UNet(cfg, img_resolution, img_channels), sigma_data=sigma_data)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
