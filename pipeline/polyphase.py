"""A stride-2 convolution whose input gradient is one stride-1 convolution and a pixel shuffle.

Langevin needs d score / d x through the network's first layer, a 5x5 stride-2 convolution of a
one-channel image. oneDNN computes that input gradient (a transposed convolution to one
channel) about 2.5x slower than a plain convolution of the same size. Split into its four
output phases (the pixel-unshuffle of the input), the same linear map is a 3x3 stride-1
convolution from 16 channels to 4 followed by ``pixel_shuffle``: the same products, summed in
another order. The weights of that convolution are rebuilt once per ``refresh`` (once per
optimizer step), not once per Langevin step.

Derivation, per spatial axis: the convolution reads ``x[2 i + a - p]`` for tap ``a``. Writing
``a - p = 2 d + r`` with ``r`` in {0, 1} makes it a correlation of phase ``r`` of ``x``
(``x[2 u + r]``) with taps ``d``, padded by ``lo = -min d`` before and ``hi = max d`` after. The
input gradient of a padded correlation is the correlation of the output gradient, padded by
(``hi``, ``lo``), with the flipped, transposed taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def phase_taps(kernel: int, padding: int) -> tuple[int, int]:
    """(lo, hi): the padding before and after of the per-phase correlation, per axis."""
    lo = -((0 - padding) // 2)
    hi = (kernel - 1 - padding) // 2
    return lo, hi


def phase_weight(weight: torch.Tensor, padding: int) -> torch.Tensor:
    """(O, I, k, k) stride-2 weights -> (O, 4 I, lo + hi + 1, same) weights over ``pixel_unshuffle(x, 2)``."""
    out_ch, in_ch, k, k2 = weight.shape
    if k != k2:
        raise ValueError(f"phase_weight: square kernels only, got {k}x{k2}")
    lo, hi = phase_taps(k, padding)
    taps = lo + hi + 1
    phased = weight.new_zeros(out_ch, in_ch, 2, 2, taps, taps)  # [o, i, row phase, col phase, d_row, d_col]
    for a in range(k):
        da, ra = divmod(a - padding, 2)
        for b in range(k):
            db, rb = divmod(b - padding, 2)
            phased[:, :, ra, rb, da + lo, db + lo] = weight[:, :, a, b]
    return phased.reshape(out_ch, in_ch * 4, taps, taps)


class _PolyphaseInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer = layer
        return F.conv2d(x, weight, bias, stride=2, padding=layer.padding)

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.layer.input_grad(grad_out), None, None, None


def _shuffle(phases: torch.Tensor) -> torch.Tensor:
    """``F.pixel_shuffle(phases, 2)``, as one permuted copy (pixel_shuffle is slow on channels-last input)."""
    n, c4, h, w = phases.shape
    c = c4 // 4
    # (n, c, r, s, h, w) -> (n, c, h, r, w, s): phase (r, s) of pixel (h, w) lands at (2h + r, 2w + s)
    return phases.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)


class PolyphaseConv2d(nn.Module):
    """A frozen copy of a stride-2 ``nn.Conv2d``: the same forward, the input gradient by phases.

    Only for weights that need no gradient (the sampler's copy of the network); call
    ``refresh()`` after the weights change. Inputs whose height or width is odd, or whose
    output is not half their size, take the ordinary convolution and its ordinary gradient.
    """

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        return (
            conv.stride == (2, 2) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1] and conv.kernel_size[0] == conv.kernel_size[1]
        )

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not self.supports(conv):
            raise ValueError(f"PolyphaseConv2d: needs a square stride-2 convolution with equal zero padding, got {conv}")
        self.conv = conv
        self.padding = conv.padding[0]
        lo, hi = phase_taps(conv.kernel_size[0], self.padding)
        self.grad_pad = (hi, lo, hi, lo)
        self.grad_weight: torch.Tensor | None = None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        w = self.conv.weight
        grad_weight = phase_weight(w, self.padding).transpose(0, 1).flip(2, 3)
        fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        self.grad_weight = grad_weight.contiguous(memory_format=fmt)

    def applies_to(self, x: torch.Tensor) -> bool:
        """Whether ``x`` splits into phases: even height and width, and an output of half their size."""
        k = self.conv.kernel_size[0]
        return all(n % 2 == 0 and (n + 2 * self.padding - k) // 2 + 1 == n // 2 for n in x.shape[-2:])

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the input, given the gradient w.r.t. the output."""
        hi, lo = self.grad_pad[:2]
        if hi == lo:  # the convolution pads; F.pad of a channels-last tensor is a slow copy
            phases = F.conv2d(grad_out, self.grad_weight, padding=hi)
        else:
            phases = F.conv2d(F.pad(grad_out, self.grad_pad), self.grad_weight)
        return _shuffle(phases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.weight.requires_grad:
            raise RuntimeError("PolyphaseConv2d: the weights must be frozen (it returns no weight gradient)")
        if not self.applies_to(x) or not torch.is_grad_enabled() or not x.requires_grad:
            return self.conv(x)
        return _PolyphaseInputGrad.apply(x, self.conv.weight, self.conv.bias, self)


def polyphase_first_layers(module: nn.Module) -> list[PolyphaseConv2d]:
    """Swap every stride-2 ``nn.Conv2d`` of one input channel inside ``module`` for a ``PolyphaseConv2d``.

    Measured on CPU (bf16, channels-last, 64 images): only there does oneDNN's own input
    gradient lag; for the wider layers of this network it is as fast or faster than the phases.
    Returns the new layers, for ``refresh()`` after the weights change.
    """
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.in_channels == 1 and PolyphaseConv2d.supports(child):
                layer = PolyphaseConv2d(child)
                setattr(parent, name, layer)
                swapped.append(layer)
    return swapped
