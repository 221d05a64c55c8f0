"""The words an export carries: the usage snippet of its model card and its LICENSE file."""

from __future__ import annotations

from .layout import Format

EULER_STEPS = 40  # diffusers' EDMEulerScheduler is first order: about twice guard sample's 18 Heun steps (35 evaluations)


def usage_snippet(fmt: Format, shape: tuple[int, int, int], where: str = "path/to/export") -> str:
    """Python that draws 16 images from the exported model, as uint8 (16, C, H, W)."""
    c, h, w = shape
    if fmt == "diffusers":
        return f"""```python
import torch
from diffusers import EDMEulerScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{where}", subfolder="unet").eval()
scheduler = EDMEulerScheduler.from_pretrained("{where}", subfolder="scheduler")
scheduler.set_timesteps({EULER_STEPS})
x = torch.randn((16, {c}, {h}, {w}), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (16, {c}, {h}, {w}), pixels 0-255
```

The weights were trained inside EDM's preconditioning (Karras et al. 2022), which `EDMEulerScheduler` applies
around the U-Net (`prediction_type="epsilon"`, `sigma_data=0.5`); the U-Net's timestep is EDM's `c_noise`.
`guard sample` draws from the same weights with Heun's second-order steps (18 steps)."""
    return f"""```python
from sfbd_guard import load_exported  # pip install sfbd_guard

model = load_exported("{where}")  # checks every file against export.json first
images = model.sample(16, seed=0, steps=18)  # uint8 (16, {c}, {h}, {w}): EDM's Heun sampler, as guard sample
```

From the Hub, download the folder first: `huggingface_hub.snapshot_download(repo_id)`."""


def licence_text(licence: str, trained: list[str], dataset: str) -> str:
    """LICENSE: the model's licence identifier, and the licences of the data it was trained on."""
    data = ", ".join(trained) if trained else "none recorded per record (the dataset's own licence applies)"
    reference = ("" if licence == "other" else
                 f"\nThe licence's text: https://spdx.org/licenses/{licence.split(' ')[0]}.html\n")
    return f"""SPDX-License-Identifier: {licence}

This model was trained with sfbd_guard on the prepared dataset "{dataset}".
The licence above was set by the data owner when the model was exported (by default, the one licence of all the
records the model was trained on; "other" when they differ or are unknown).
The licences of the training records: {data}.
{reference}"""
