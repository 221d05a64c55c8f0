"""Exponential moving average of network weights by half-life in images (Karras et al. 2022, App. F).

``beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))`` with, during ramp-up,
``halflife_nimg = min(halflife_kimg * 1000, cur_nimg * rampup_ratio)``. Sampling and SFBD's
backward step use the EMA network.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_beta"]


def ema_beta(
    batch_size: int, cur_nimg: int, *, halflife_kimg: float, rampup_ratio: float | None
) -> float:
    """Per-step EMA decay for a given batch size and number of images seen so far."""
    halflife_nimg = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return float(0.5 ** (batch_size / max(halflife_nimg, 1e-8)))


class EMA:
    """Holds an averaged copy of a network (``self.module``, in eval mode, no gradients).

    Args:
        net: network to track; it is deep-copied.
        halflife_kimg: EMA half-life in thousands of images (EDM default 500).
        rampup_ratio: cap the half-life at ``cur_nimg * rampup_ratio`` (EDM 0.05 from scratch,
            ``None`` when fine-tuning, as SFBD's denoiser-update rounds do).
    """

    def __init__(
        self, net: nn.Module, *, halflife_kimg: float = 500.0, rampup_ratio: float | None = 0.05
    ) -> None:
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = rampup_ratio

    def beta(self, batch_size: int, cur_nimg: int) -> float:
        """Decay that :meth:`update` would use."""
        return ema_beta(
            batch_size, cur_nimg, halflife_kimg=self.halflife_kimg, rampup_ratio=self.rampup_ratio
        )

    @torch.no_grad()
    def update(self, net: nn.Module, batch_size: int, cur_nimg: int) -> float:
        """``ema <- beta * ema + (1 - beta) * net`` for parameters; buffers are copied. Returns beta."""
        beta = self.beta(batch_size, cur_nimg)
        ema_params: list[Tensor] = list(self.module.parameters())
        net_params = [p.detach() for p in net.parameters()]
        if len(ema_params) != len(net_params):
            raise ValueError("net and EMA module have different parameter lists")
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
        for b_ema, b_net in zip(self.module.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b_net)
        return beta

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights plus the EMA settings."""
        return {
            "module": self.module.state_dict(),
            "halflife_kimg": self.halflife_kimg,
            "rampup_ratio": self.rampup_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["module"])
        self.halflife_kimg = float(state["halflife_kimg"])
        self.rampup_ratio = state["rampup_ratio"]
