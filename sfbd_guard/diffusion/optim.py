"""Optimiser helpers for EDM training (Karras et al. 2022, App. F).

Adam(beta=(0.9, 0.999), eps=1e-8); learning rate ramped linearly over ``warmup_kimg``
thousand images, then constant; non-finite gradients sanitised (NaN -> 0, +-inf -> +-1e5)
before the step; optional global-norm clipping.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "make_adam",
    "warmup_lr",
    "set_lr",
    "sanitize_grads_",
    "clip_grad_norm_",
    "optimizer_step",
]


def make_adam(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.Adam:
    """Adam with EDM's defaults. ``fused=None`` lets torch choose (foreach on CPU)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused)


def warmup_lr(base_lr: float, cur_nimg: int, warmup_kimg: float) -> float:
    """Linear warm-up: ``base_lr * min(cur_nimg / (warmup_kimg * 1000), 1)`` (EDM ``lr_rampup_kimg``)."""
    if warmup_kimg <= 0:
        return base_lr
    return base_lr * min(cur_nimg / (warmup_kimg * 1000.0), 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _grads(params: Iterable[nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


@torch.no_grad()
def sanitize_grads_(params: Iterable[nn.Parameter], *, max_abs: float = 1e5) -> None:
    """In place: NaN gradients -> 0, +-inf -> +-max_abs (EDM training loop)."""
    for g in _grads(params):
        torch.nan_to_num(g, nan=0.0, posinf=max_abs, neginf=-max_abs, out=g)


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    *,
    base_lr: float,
    cur_nimg: int,
    warmup_kimg: float,
    max_grad_norm: float | None = None,
) -> float:
    """Warm-up LR, sanitise (and optionally clip) gradients, step. Returns the LR used."""
    lr = warmup_lr(base_lr, cur_nimg, warmup_kimg)
    set_lr(optimizer, lr)
    sanitize_grads_(params)
    if max_grad_norm is not None:
        clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return lr
