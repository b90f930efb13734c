"""d sum(score) / dx of the energy network on the CPU in fp32, with the compiled kernels.

The same linear algebra as ``pipeline/inputgrad.py``, arranged around matrix products: each
stride-2 convolution's input gradient is one product of the output gradient with the weights
(the BLAS) and a col2im (``pipeline/native/kernels.c``) that also applies the derivative of the
Swish before it; the Swish keeps its derivative from the forward pass, so the backward pass
computes no exponential; the first, one-channel layer runs forward and backward as products of
its tap-major columns. The forwards of the wider convolutions stay oneDNN's (channels-last),
which were as fast as a product of their columns. The result equals autograd's up to the order of
its sums (tested), and it is computed in buffers kept per thread, so chain groups on threads do not
share them and large tensors are not allocated on every step.

Only networks of the book's shape are handled (``compiled_chain`` says whether one is): a
one-channel stride-2 convolution, then stride-2 convolutions, each followed by a Swish, a flatten,
then linear layers with a Swish between them and a single output.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import native
from pipeline.polyphase import PolyphaseConv2d

MAX_CHANNELS = 256  # kernels.c
MAX_PLANE = 65536  # kernels.c: MAX_PLANE_FLOATS, the four phase planes of the first layer's padded image


def _conv(layer: nn.Module) -> nn.Module:
    return layer.conv if isinstance(layer, PolyphaseConv2d) else layer


def _stride2(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
        and conv.kernel_size[0] == conv.kernel_size[1] and conv.bias is not None
        and conv.in_channels <= MAX_CHANNELS and conv.out_channels <= MAX_CHANNELS
    )


def split_chain(layers: Sequence[nn.Module]) -> tuple[list[nn.Conv2d], list[nn.Linear]] | None:
    """(convolutions, linear layers) of a chain of the shape this module handles, else None."""
    layers = [_conv(layer) for layer in layers]
    convs: list[nn.Conv2d] = []
    i = 0
    while i + 1 < len(layers) and isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.SiLU):
        convs.append(layers[i])
        i += 2
    if not convs or not all(_stride2(c) for c in convs) or convs[0].in_channels != 1:
        return None
    if i >= len(layers) or not isinstance(layers[i], nn.Flatten):
        return None
    linears: list[nn.Linear] = []
    i += 1
    while i < len(layers):
        if not isinstance(layers[i], nn.Linear) or layers[i].bias is None:
            return None
        linears.append(layers[i])
        if i + 1 == len(layers):
            break
        if not isinstance(layers[i + 1], nn.SiLU):
            return None
        i += 2
    if not linears or linears[-1].out_features != 1 or not isinstance(layers[-1], nn.Linear):
        return None
    return convs, linears


def compiled_chain(layers: Sequence[nn.Module] | None) -> CompiledChain | None:
    """A ``CompiledChain`` of ``layers``, or None where the kernels are not available or the chain is
    not of the handled shape (the sampler then uses ``pipeline/inputgrad.py``)."""
    if layers is None or split_chain(layers) is None:
        return None
    lib = native.load()
    return None if lib is None else CompiledChain(layers, lib)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CompiledChain:
    """The input gradient of a chain of layers, as a callable: (N, 1, H, W) float32 -> the same shape.

    Reads the layers' weights at ``refresh()``; call it after they change (``SamplerScore.sync``).
    """

    def __init__(self, layers: Sequence[nn.Module], lib) -> None:
        split = split_chain(layers)
        if split is None:
            raise ValueError("CompiledChain: the layers are not of the handled shape (see split_chain)")
        self.convs, self.linears = split
        self.lib = lib
        self._local = threading.local()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        first = self.convs[0]
        k = first.kernel_size[0]
        self.first_weight = first.weight.detach().float().reshape(first.out_channels, k * k).t().contiguous()
        self.biases = [c.bias.detach().float() for c in self.convs]
        self.conv_weights = [c.weight.detach().float().contiguous(memory_format=torch.channels_last) for c in self.convs]
        # (out, k k in): the product of an output gradient (pixels, out) with it gives the columns, tap-major per pixel
        self.col_weights = [
            c.weight.detach().float().permute(0, 2, 3, 1).reshape(c.out_channels, -1).contiguous() for c in self.convs
        ]
        self.lin_weights = [lin.weight.detach().float().contiguous() for lin in self.linears]
        self.lin_biases = [lin.bias.detach().float() for lin in self.linears]
        self._flat_weight: dict[tuple[int, int], torch.Tensor] = {}

    def _first_linear(self, h: int, w: int) -> torch.Tensor:
        """The first linear layer's weight with its inputs in NHWC order (the flatten is of NCHW)."""
        if (h, w) not in self._flat_weight:
            weight = self.lin_weights[0]
            c = self.convs[-1].out_channels
            self._flat_weight[(h, w)] = (
                weight.view(weight.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
            )
        return self._flat_weight[(h, w)]

    def _shapes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(h, w, ho, wo) of each convolution, for an input of (height, width)."""
        shapes = []
        for conv in self.convs:
            k, p = conv.kernel_size[0], conv.padding[0]
            ho, wo = (height + 2 * p - k) // 2 + 1, (width + 2 * p - k) // 2 + 1
            if ho < 1 or wo < 1:
                raise ValueError(f"CompiledChain: an input of {height}x{width} is too small for {conv}")
            shapes.append((height, width, ho, wo))
            height, width = ho, wo
        return shapes

    def _buffers(self, n: int, height: int, width: int) -> dict:
        """Per-thread buffers for a batch of ``n`` images, kept while the batch shape stays the same."""
        key = (n, height, width)
        if getattr(self._local, "key", None) != key:
            shapes = self._shapes(height, width)
            k = self.convs[0].kernel_size[0]
            _, _, ho0, wo0 = shapes[0]
            if 4 * (ho0 + (k - 1) // 2 + 1) * (wo0 + (k - 1) // 2 + 1) > MAX_PLANE:
                raise ValueError(f"CompiledChain: an input of {height}x{width} is too large for the first layer's kernels")
            self._local.key = key
            self._local.buffers = {
                "shapes": shapes,
                "taps": torch.empty(k * k, n * ho0 * wo0),
                "pre": torch.empty(n * ho0 * wo0, self.convs[0].out_channels),  # the first layer's (oneDNN allocates the others')
                "act": [torch.empty(n, s[2], s[3], c.out_channels) for s, c in zip(shapes, self.convs)],
                "deriv": [torch.empty(n, s[2], s[3], c.out_channels) for s, c in zip(shapes, self.convs)],
                "cols": [None] + [torch.empty(n * s[2] * s[3], c.weight[0].numel()) for s, c in zip(shapes[1:], self.convs[1:])],
                "grad_in": [None] + [torch.empty(n, s[0], s[1], c.in_channels) for s, c in zip(shapes[1:], self.convs[1:])],
                "first_cols": torch.empty(k * k, n * ho0 * wo0),
            }
        return self._local.buffers

    def _swish(self, pre: torch.Tensor, act: torch.Tensor, deriv: torch.Tensor) -> None:
        self._check(self.lib.swish_fwd(_ptr(pre), _ptr(act), _ptr(deriv), pre.numel()), "swish_fwd")

    @staticmethod
    def _check(code: int, name: str) -> None:
        if code != 0:
            raise RuntimeError(f"CompiledChain: {name} refused its shapes")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"CompiledChain: needs (N, 1, H, W) float32 on the CPU, got {tuple(x.shape)} {x.dtype} {x.device}")
        n, _, height, width = x.shape
        x = x.contiguous()
        buf = self._buffers(n, height, width)
        shapes, first = buf["shapes"], self.convs[0]
        k, p = first.kernel_size[0], first.padding[0]
        _, _, ho, wo = shapes[0]
        # forward: the first layer as a product of its columns, the others oneDNN's; each Swish keeps its derivative
        self._check(self.lib.im2col_1ch_s2(_ptr(x), _ptr(buf["taps"]), n, height, width, k, p, ho, wo), "im2col_1ch_s2")
        torch.addmm(self.biases[0], buf["taps"].t(), self.first_weight, out=buf["pre"])
        self._swish(buf["pre"], buf["act"][0], buf["deriv"][0])
        for i in range(1, len(self.convs)):
            h = buf["act"][i - 1].permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last
            pre = F.conv2d(h, self.conv_weights[i], self.biases[i], stride=2, padding=self.convs[i].padding)
            pre = pre.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            self._swish(pre, buf["act"][i], buf["deriv"][i])
        _, _, hl, wl = shapes[-1]
        flat = buf["act"][-1].view(n, -1)
        weights = [self._first_linear(hl, wl), *self.lin_weights[1:]]
        derivs = []
        for weight, bias in zip(weights[:-1], self.lin_biases[:-1]):
            pre = torch.addmm(bias, flat, weight.t())
            flat, deriv = torch.empty_like(pre), torch.empty_like(pre)
            self._swish(pre, flat, deriv)
            derivs.append(deriv)
        # backward: d sum(score) / d (each layer's input), from the last layer down
        grad = weights[-1].expand(n, -1)
        for weight, deriv in zip(reversed(weights[:-1]), reversed(derivs)):
            grad = (grad * deriv).mm(weight)
        grad = grad.view(buf["deriv"][-1].shape) * buf["deriv"][-1]
        for i in range(len(self.convs) - 1, 0, -1):
            h, w, ho_i, wo_i = shapes[i]
            conv = self.convs[i]
            cols = buf["cols"][i]
            torch.mm(grad.reshape(n * ho_i * wo_i, conv.out_channels), self.col_weights[i], out=cols)
            self._check(
                self.lib.col2im_s2(
                    _ptr(cols), _ptr(buf["deriv"][i - 1]), _ptr(buf["grad_in"][i]),
                    n, h, w, conv.in_channels, conv.kernel_size[0], conv.padding[0], ho_i, wo_i,
                ),
                "col2im_s2",
            )
            grad = buf["grad_in"][i]
        torch.mm(self.first_weight, grad.view(n * ho * wo, first.out_channels).t(), out=buf["first_cols"])
        out = torch.empty(n, 1, height, width)
        self._check(
            self.lib.col2im_1ch_s2(_ptr(buf["first_cols"]), _ptr(out), n, height, width, k, p, ho, wo), "col2im_1ch_s2"
        )
        return out
