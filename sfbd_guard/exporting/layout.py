"""The export folder's names: the one place they are spelled, and the allow-list of what an export may hold.

    README.md                                    the model card (Hugging Face metadata, usage, evidence)
    LICENSE                                      the model's licence, as the owner set it, and the training data's
    export.json                                  what was exported, from which run and weights, each file's sha256
    unet/config.json, unet/diffusion_pytorch_model.safetensors   diffusers' UNet2DModel (network diffusers-unet2d)
    scheduler/scheduler_config.json              diffusers' EDMEulerScheduler for those weights
    network/config.json, network/model.safetensors               our U-Net (network ddpmpp): `load_exported`

Nothing else is ever written, pushed or read back: no image of any kind, no round set, no manifest.
"""

from __future__ import annotations

from typing import Literal

CARD = "README.md"
LICENCE = "LICENSE"
RECORD = "export.json"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
NETWORK_CONFIG = "network/config.json"
NETWORK_WEIGHTS = "network/model.safetensors"

Format = Literal["diffusers", "sfbd_guard"]

COMMON = (CARD, LICENCE, RECORD)
FILES: dict[Format, tuple[str, ...]] = {
    "diffusers": (*COMMON, UNET_CONFIG, UNET_WEIGHTS, SCHEDULER_CONFIG),
    "sfbd_guard": (*COMMON, NETWORK_CONFIG, NETWORK_WEIGHTS),
}
ALLOWED = frozenset(name for names in FILES.values() for name in names)
