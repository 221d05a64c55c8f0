"""Pure diffusion core: EDM preconditioning, loss, U-Net, EMA, optimiser helpers, samplers.

No I/O, no printing, no device constants; randomness only from explicit generators.
"""

from .ema import EMA, ema_beta
from .loss import EDMLoss, edm_loss_weight
from .networks import UNet, UNetConfig, build_denoiser, count_parameters
from .optim import clip_grad_norm_, make_adam, optimizer_step, sanitize_grads_, set_lr, warmup_lr
from .precond import Denoiser, EDMPrecond, edm_scalings
from .sampling import (
    backward_sigmas,
    count_nfe,
    denoise_backward,
    karras_sigmas,
    sample_euler,
    sample_heun,
    truncate_sigmas,
)

__all__ = [
    "EMA", "ema_beta", "EDMLoss", "edm_loss_weight", "UNet", "UNetConfig", "build_denoiser",
    "count_parameters", "clip_grad_norm_", "make_adam", "optimizer_step", "sanitize_grads_",
    "set_lr", "warmup_lr", "Denoiser", "EDMPrecond", "edm_scalings", "backward_sigmas",
    "count_nfe", "denoise_backward", "karras_sigmas", "sample_euler", "sample_heun",
    "truncate_sigmas",
]
