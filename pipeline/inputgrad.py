"""d sum(score) / d input for a chain of layers, without autograd.

Langevin takes one input gradient per step and never a weight gradient. Through autograd each
step builds a graph and runs it in the engine; for this small network that bookkeeping costs
about 15% of a step on CPU. Here the forward pass keeps each layer's input and the backward
pass calls the same ATen kernels autograd would (``convolution_backward`` for the input only,
``silu_backward``, a matrix product), so the gradient is the same, bit for bit.

Only chains of the layers below are handled; ``layer_chain`` says whether a network is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.polyphase import PolyphaseConv2d

SUPPORTED = (nn.Conv2d, nn.SiLU, nn.Flatten, nn.Linear, PolyphaseConv2d)


def layer_chain(module: nn.Module) -> list[nn.Module] | None:
    """The layers whose composition is ``module``'s score (before the final squeeze), or None.

    A network offers its chain through a ``layers()`` method (``EnergyNet`` does); a chain with
    any layer outside ``SUPPORTED`` is None, and the caller falls back to autograd.
    """
    layers_fn = getattr(module, "layers", None)
    if layers_fn is None:
        return None
    layers = list(layers_fn())
    if not all(isinstance(layer, SUPPORTED) for layer in layers):
        return None
    for layer in layers:
        conv = layer.conv if isinstance(layer, PolyphaseConv2d) else layer
        if isinstance(conv, nn.Conv2d) and (isinstance(conv.padding, str) or conv.padding_mode != "zeros"):
            return None
    if not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != 1:
        return None
    return layers


@torch.no_grad()
def chain_input_grad(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The gradient of the summed scores of ``layers`` applied to ``x`` (B, ...), w.r.t. ``x``."""
    inputs = []
    h = x
    for layer in layers:
        inputs.append(h)
        h = layer(h)
    grad = torch.ones_like(h)  # d sum(scores) / d scores, (B, 1)
    for layer, inp in zip(reversed(layers), reversed(inputs)):
        grad = _backward(layer, inp, grad)
    return grad


def _backward(layer: nn.Module, inp: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.SiLU):
        return torch.ops.aten.silu_backward(grad, inp)
    if isinstance(layer, nn.Linear):
        return grad.mm(layer.weight)
    if isinstance(layer, nn.Flatten):
        return grad.reshape(inp.shape)
    if isinstance(layer, PolyphaseConv2d):
        if layer.applies_to(inp):
            return layer.input_grad(grad)
        layer = layer.conv
    if isinstance(layer, nn.Conv2d):
        return torch.ops.aten.convolution_backward(
            grad, inp, layer.weight, None, list(layer.stride), list(layer.padding), list(layer.dilation),
            False, [0, 0], layer.groups, [True, False, False],
        )[0]
    raise TypeError(f"chain_input_grad: no backward for {type(layer).__name__}")
