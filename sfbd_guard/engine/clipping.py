"""Per-sample clipped gradients of our U-Net, without materialising per-sample gradients.

DP-SGD needs, for each sample i of a batch, the norm ‖g_i‖ of its gradient over all parameters and
then the sum Σ_i c_i g_i with c_i = min(1, C / (‖g_i‖ + 1e-6)). Opacus' hooks build every g_i
(batch × parameters floats: 66 M for the digits model at batch 64) and then norm, clip and sum
them; on a CPU that is memory-bound and was most of the DP step. Here, per layer l with input
a_l and output gradient b_l (both per sample; the layer's parameter gradient of sample i is a
bilinear function of a_{l,i} and b_{l,i}):

1. one backward pass of Σ_i loss_i computes only the b_l (autograd is asked for the gradients of
   the layers' outputs, so it skips every weight gradient);
2. each layer's per-sample squared gradient norms ‖g_{l,i}‖² come from (a_l, b_l) directly: for
   nn.Linear ‖b_i‖² ‖a_i‖²; for nn.GroupNorm from the (n, C) per-sample gradients; for nn.Conv2d
   with input patches U_i (D × T: D = in/groups × kernel, T output positions) and B_i (out × T),
   g_i = B_i U_iᵀ, either materialised for one layer at a time (a batched matmul, or one grouped
   weight-gradient convolution with the samples as groups) and reduced, or by the ghost norm
   ‖g_i‖² = ⟨B_iᵀ B_i, U_iᵀ U_i⟩ (Li et al. 2022), chosen per layer shape by a fixed rule
   (deterministic, so a resumed run computes exactly what an uninterrupted one does);
3. the clipped sum of each layer is its ordinary batch gradient with b_l scaled by c:
   Σ_i c_i g_{l,i} = grad_weight(a_l, c ⊙ b_l), one weight-gradient convolution or matmul per layer
   ("book-keeping", Bu et al. 2023), so the whole DP step costs about one forward, one backward
   and the norms.

This needs sample i's loss to depend on sample i only (no BatchNorm; GroupNorm, attention over
pixels and dropout are per sample). The result is written to ``p.grad`` as the sum of clipped per-sample
gradients; noise, scaling by the expected batch and (under DDP) the reduction are Opacus' `DPOptimizerFastGradientClipping`'s.
Only nn.Conv2d (zero padding), nn.Linear and nn.GroupNorm, each used once per forward, are
supported: `unsupported_layers` names any other layer that owns trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClippedGradients", "clipped_sum", "per_sample_squared_norms", "unsupported_layers"]

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layers(net: nn.Module) -> list[str]:
    """Parameter-owning modules that `ClippedGradients` cannot handle, as "name (Type: why)"."""
    problems = []
    for name, module in net.named_modules():
        if not _trainable(module):
            continue
        if type(module) not in SUPPORTED:
            problems.append(f"{name} ({type(module).__name__})")
        elif isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            problems.append(f"{name} (Conv2d with padding {module.padding!r}, mode {module.padding_mode})")
    return problems


# ----- per layer: squared per-sample norms from (input, output gradient), and the clipped sum -----------

def _padding(layer: nn.Conv2d) -> tuple[int, int]:
    """The layer's zero padding (unsupported_layers refuses the string forms, "same" and "valid")."""
    return cast(tuple[int, int], layer.padding)


def _patches(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches (n, groups, in/groups × kh × kw, T) of a Conv2d."""
    n = x.shape[0]
    if _pointwise(layer):
        patches = x.reshape(n, x.shape[1], -1)
    else:
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=_padding(layer), stride=layer.stride)
    return patches.reshape(n, layer.groups, -1, patches.shape[-1])


def _pointwise(layer: nn.Conv2d) -> bool:
    return layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)


def _input_gram(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """U_iᵀ U_i (n, g, T, T) for a stride-1, dilation-1 conv, without unfolding the input.

    The patch of output position t is the padded input at t + δ over the kernel offsets δ, so
    (UᵀU)_{tt'} = Σ_δ P_{t+δ, t'+δ} with P = X̃ᵀ X̃ the Gram matrix of the padded input's pixels.
    """
    n, c, h, w = x.shape
    kh, kw = layer.kernel_size
    (ph, pw), groups = _padding(layer), layer.groups
    padded = F.pad(x, (pw, pw, ph, ph)).reshape(n, groups, c // groups, -1)
    hp, wp = h + 2 * ph, w + 2 * pw
    pixels = (padded.transpose(-1, -2) @ padded).reshape(n, groups, hp, wp, hp, wp)
    ho, wo = hp - kh + 1, wp - kw + 1
    gram = sum(pixels[:, :, a:a + ho, b:b + wo, a:a + ho, b:b + wo] for a in range(kh) for b in range(kw))
    return gram.reshape(n, groups, ho * wo, ho * wo)  # type: ignore[union-attr]  # sum() of tensors types as Tensor | int


def _conv2d_norms(layer: nn.Conv2d, x: Tensor, grad: Tensor, method: str | None = None) -> Tensor:
    """Squared per-sample norms; `method` "ghost" or "direct" overrides the cheaper one (tests)."""
    n, groups = x.shape[0], layer.groups
    grad_out = grad.reshape(n, groups, layer.out_channels // groups, -1)  # (n, g, o, T)
    squared = grad.new_zeros(n)
    if layer.weight.requires_grad:
        o, t = grad_out.shape[2], grad_out.shape[3]
        c, (kh, kw) = x.shape[1] // groups, layer.kernel_size
        d, padded = c * kh * kw, (x.shape[2] + 2 * _padding(layer)[0]) * (x.shape[3] + 2 * _padding(layer)[1])
        # operations per sample and group: materialise g_i (with an unfold unless 1x1), or the ghost norm
        direct = o * d * t + (0 if _pointwise(layer) else 4 * d * t)
        ghost = t * t * o + (t * t * c if _pointwise(layer) else padded * padded * c + kh * kw * t * t)
        simple = layer.stride == (1, 1) and layer.dilation == (1, 1)
        # measured on a 1-thread AVX-512 CPU (oneDNN): at 8x8 and above, narrow layers are fastest as one
        # grouped weight-gradient convolution; otherwise the fewer operations of ghost and direct
        grouped = not _pointwise(layer) and t >= 64 and o <= 32 and c >= 8
        method = method or ("grouped" if grouped else "ghost" if simple and ghost < direct else "direct")
        if method == "ghost":  # ghost norm: ⟨B_iᵀ B_i, U_iᵀ U_i⟩
            gram_out = grad_out.transpose(-1, -2) @ grad_out  # (n, g, T, T)
            if simple and not _pointwise(layer):
                gram_in = _input_gram(layer, x)
            else:
                patches = _patches(layer, x)
                gram_in = patches.transpose(-1, -2) @ patches
            squared += (gram_out * gram_in).flatten(1).sum(1).clamp_min(0)
        elif method == "grouped":  # per-sample weight gradients as one grouped conv's (samples × groups)
            weight = layer.weight.to(grad.dtype).repeat(n, 1, 1, 1)
            per_sample = torch.ops.aten.convolution_backward(
                grad.reshape(1, -1, *grad.shape[2:]), x.reshape(1, -1, *x.shape[2:]), weight, None, list(layer.stride),
                list(layer.padding), list(layer.dilation), False, [0, 0], n * groups, [False, True, False])[1]
            squared += torch.linalg.vector_norm(per_sample.reshape(n, -1), dim=1).square()
        else:  # this layer's per-sample weight gradients (n, g, o, D), reduced at once
            patches = _patches(layer, x)
            squared += torch.linalg.vector_norm((grad_out @ patches.transpose(-1, -2)).flatten(1), dim=1).square()
    if layer.bias is not None and layer.bias.requires_grad:
        squared += grad_out.sum(-1).flatten(1).square().sum(1)
    return squared


def _conv2d_clipped(layer: nn.Conv2d, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    has_bias = layer.bias is not None and layer.bias.requires_grad
    _, weight, bias = torch.ops.aten.convolution_backward(
        grad, x, layer.weight.to(grad.dtype), [layer.out_channels] if has_bias else None, list(layer.stride),
        list(layer.padding), list(layer.dilation), False, [0, 0], layer.groups,
        [False, layer.weight.requires_grad, has_bias])
    out = {layer.weight: weight} if layer.weight.requires_grad else {}
    if has_bias and layer.bias is not None:  # has_bias implies it; this tells mypy
        out[layer.bias] = bias
    return out


def _linear_norms(layer: nn.Linear, x: Tensor, grad: Tensor) -> Tensor:
    n = x.shape[0]
    squared = grad.new_zeros(n)
    if x.dim() == 2:
        grad_sq = grad.square().sum(1)
        if layer.weight.requires_grad:
            squared += grad_sq * x.square().sum(1)
    else:  # (n, ..., features): per-sample gradients of this layer
        grad_sq = grad.reshape(n, -1, grad.shape[-1]).sum(1).square().sum(1)
        if layer.weight.requires_grad:
            per_sample = torch.einsum("n...o,n...i->noi", grad, x)
            squared += per_sample.flatten(1).square().sum(1)
    if layer.bias is not None and layer.bias.requires_grad:
        squared += grad_sq
    return squared


def _linear_clipped(layer: nn.Linear, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    grad2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    out = {layer.weight: grad2.t() @ x2} if layer.weight.requires_grad else {}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad2.sum(0)
    return out


def _group_norm_per_sample(layer: nn.GroupNorm, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    n, c = x.shape[0], layer.num_channels
    out: dict[Tensor, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalized = F.group_norm(x, layer.num_groups, eps=layer.eps)
        out[layer.weight] = (normalized * grad).reshape(n, c, -1).sum(-1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad.reshape(n, c, -1).sum(-1)
    return out


def _group_norm_norms(layer: nn.GroupNorm, x: Tensor, grad: Tensor) -> Tensor:
    squared = grad.new_zeros(x.shape[0])
    for g in _group_norm_per_sample(layer, x, grad).values():
        squared += g.square().sum(1)
    return squared


def _group_norm_clipped(layer: nn.GroupNorm, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    return {p: g.sum(0) for p, g in _group_norm_per_sample(layer, x, grad).items()}


_NORMS: dict[type[nn.Module], Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.Conv2d: _conv2d_norms, nn.Linear: _linear_norms, nn.GroupNorm: _group_norm_norms}
_CLIPPED: dict[type[nn.Module], Callable[[Any, Tensor, Tensor], dict[Tensor, Tensor]]] = {
    nn.Conv2d: _conv2d_clipped, nn.Linear: _linear_clipped, nn.GroupNorm: _group_norm_clipped}


def per_sample_squared_norms(layer: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    """(n,) squared norms of each sample's gradient over `layer`'s trainable parameters.

    x: the layer's input, grad: the gradient of Σ_i loss_i with respect to its output.
    """
    return _NORMS[type(layer)](layer, x, grad)


def clipped_sum(layer: nn.Module, x: Tensor, grad: Tensor, factors: Tensor) -> dict[Tensor, Tensor]:
    """Σ_i factors_i × (sample i's gradient) for each trainable parameter of `layer`."""
    scale = factors.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1)))
    return _CLIPPED[type(layer)](layer, x, grad * scale)


# ----- the whole network ---------------------------------------------------------------------------------

class ClippedGradients:
    """Hooks on a network's layers; `backward(losses)` sets p.grad = Σ_i clip_i × ∇ losses_i.

    Use as::

        with clipper.recording():
            losses = per_sample_loss(model, x)     # (n,), sample i's loss depends only on sample i
        clipper.backward(losses)                   # p.grad: the sum of the clipped per-sample gradients

    `norms` keeps the last batch's per-sample gradient norms (before clipping).
    """

    def __init__(self, net: nn.Module, max_grad_norm: float) -> None:
        problems = unsupported_layers(net)
        if problems:
            raise ValueError(f"no per-sample clipping for {', '.join(problems)}")
        self.max_grad_norm = max_grad_norm
        self.layers = [m for m in net.modules() if _trainable(m)]
        self.params = [p for m in self.layers for p in _trainable(m)]
        self.norms = torch.zeros(0)
        self._recording = False
        self._records: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if not self._recording:
            return
        if module in self._records:
            raise RuntimeError(f"{type(module).__name__} used twice in one forward: shared parameters are not supported")
        self._records[module] = (inputs[0].detach(), output)

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._records.clear()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def backward(self, losses: Tensor) -> None:
        """Sum of clipped per-sample gradients of `losses` (n,) into p.grad (replacing it)."""
        records, self._records = self._records, {}
        n = losses.shape[0]
        if n == 0 or not records:
            self.norms = torch.zeros(n, device=losses.device)
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return
        layers = list(records)
        outputs = [records[m][1] for m in layers]
        grads: tuple[Tensor | None, ...] = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        dtype = torch.promote_types(losses.dtype, torch.float32)  # norms in at least float32
        squared = torch.zeros(n, dtype=dtype, device=losses.device)
        used, small = [], {}  # small: GroupNorm's per-sample gradients (n, C), kept for the clipped sum
        for layer, grad in zip(layers, grads, strict=True):
            if grad is None:
                continue
            grad = grad.to(torch.promote_types(grad.dtype, torch.float32))  # norms of bf16 activations in fp32
            x = records[layer][0].to(grad.dtype)
            if isinstance(layer, nn.GroupNorm):
                small.update(_group_norm_per_sample(layer, x, grad))
            else:
                used.append((layer, x, grad))
                squared += per_sample_squared_norms(layer, x, grad).to(dtype)
        for g in small.values():
            squared += g.square().sum(1).to(dtype)
        self.norms = squared.sqrt()
        factors = (self.max_grad_norm / (self.norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = None
        for layer, x, grad in used:
            for param, g in clipped_sum(layer, x, grad, factors).items():
                param.grad = g.to(param.dtype).reshape(param.shape)
        for param, g in small.items():
            param.grad = (factors.to(g.dtype) @ g).to(param.dtype)
        for p in self.params:
            if p.grad is None:  # a layer the loss did not reach
                p.grad = torch.zeros_like(p)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()
