"""`load_exported(DIR)`: the denoiser of an export folder (either format), checked file by file, ready to sample."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contracts.export_record import ExportRecord
from ..errors import InputError
from .check import checked_export
from .layout import NETWORK_CONFIG, NETWORK_WEIGHTS, UNET_CONFIG, UNET_WEIGHTS

if TYPE_CHECKING:
    import torch

MAX_CONFIG_BYTES = 1 << 20


def _config(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{path}: larger than a network config can be")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object")
    return value


@dataclass
class ExportedModel:
    """An exported model: the EDM denoiser D(x; sigma) (eval mode) and what export.json says of it."""

    net: torch.nn.Module
    record: ExportRecord

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.record.image_shape
        return c, h, w

    def sample(self, n: int, *, seed: int = 0, steps: int = 18, batch: int = 64) -> torch.Tensor:
        """uint8 (n, C, H, W) images, drawn as `guard sample` draws them (EDM's Heun sampler)."""
        from ..engine.generate import generate_uint8

        return generate_uint8(self.net, seed=seed, count=n, shape=self.shape, steps=steps, batch=batch)


def load_exported(folder: Path, *, device: str = "cpu") -> ExportedModel:
    """The denoiser of an export folder: our U-Net (network/) or diffusers' UNet2DModel (unet/) inside EDM's
    preconditioning. Every file is checked against export.json first; weights are read as safetensors only."""
    from safetensors.torch import load_file

    from ..diffusion.diffusers_unet import DiffusersUNet, unet_of
    from ..diffusion.networks import UNetConfig, build_denoiser
    from ..diffusion.precond import EDMPrecond

    record = checked_export(folder)
    c, h, w = record.image_shape
    try:
        if record.format == "diffusers":
            config = {k: v for k, v in _config(folder / UNET_CONFIG).items() if not k.startswith("_")}
            net = EDMPrecond(DiffusersUNet(config), sigma_data=record.sampler.sigma_data)
            unet_of(net).load_state_dict(load_file(folder / UNET_WEIGHTS))
        else:
            config = _config(folder / NETWORK_CONFIG)
            unet = dict(config["unet"])
            unet.update(channel_mult=tuple(unet["channel_mult"]), attn_resolutions=tuple(unet["attn_resolutions"]))
            net = build_denoiser(UNetConfig(**unet), h, c, sigma_data=record.sampler.sigma_data)
            net.load_state_dict(load_file(folder / NETWORK_WEIGHTS))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 (a config of other keys, other shapes, a damaged file)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{folder}: cannot load the exported network ({first})") from None
    if h != w:
        raise InputError(f"{folder}/export.json: image_shape {record.image_shape} is not square")
    return ExportedModel(net.to(device).eval(), record)
