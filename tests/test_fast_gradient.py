"""The sampler's input gradient without autograd (pipeline/inputgrad.py) and by phases (pipeline/polyphase.py).

These are ATen's kernels (``kernels="aten"``); the compiled ones are tested in test_compiled_kernels.py.
"""

import pytest
import torch
from torch import nn

from pipeline.inputgrad import chain_input_grad, layer_chain
from pipeline.langevin import langevin, score_in_precision
from pipeline.model import EnergyNet, frozen
from pipeline.polyphase import PolyphaseConv2d, phase_weight, polyphase_first_layers
from tests.nets import ChainNet


def _net(seed: int = 0) -> EnergyNet:
    torch.manual_seed(seed)
    return EnergyNet().eval()


def _autograd_grad(score, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(x).sum(), x)
    return grad


@pytest.mark.parametrize(
    "in_ch, out_ch, kernel, padding, size",
    [(1, 16, 5, 2, 32), (3, 8, 3, 1, 16), (2, 4, 4, 1, 12), (1, 2, 1, 0, 8), (1, 4, 7, 3, 10)],
)
def test_polyphase_convolution_equals_the_convolution_and_its_gradient(in_ch, out_ch, kernel, padding, size):
    """In float64 the phases give the convolution's output exactly and its input gradient to rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=2, padding=padding).double().requires_grad_(False)
    layer = PolyphaseConv2d(conv)
    x = torch.randn(3, in_ch, size, size, dtype=torch.float64, requires_grad=True)
    assert layer.applies_to(x)
    y_ref, y = conv(x), layer(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    (ref,) = torch.autograd.grad(y_ref, x, g)
    (mine,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-12)
    assert torch.allclose(layer.input_grad(g), ref, rtol=0, atol=1e-12)


def test_phase_weight_places_every_tap_once():
    w = torch.arange(1, 26, dtype=torch.float64).view(1, 1, 5, 5)
    phased = phase_weight(w, padding=2)
    assert phased.shape == (1, 4, 3, 3)
    assert sorted(phased[phased != 0].tolist()) == list(range(1, 26))  # 25 taps, 11 structural zeros


def test_polyphase_layer_falls_back_on_odd_sizes_and_follows_refresh():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 5, stride=2, padding=2).requires_grad_(False)
    layer = PolyphaseConv2d(conv)
    odd = torch.randn(2, 1, 9, 9, requires_grad=True)
    assert not layer.applies_to(odd)
    g = torch.randn(2, 4, 5, 5)
    assert torch.allclose(torch.autograd.grad(layer(odd), odd, g)[0], torch.autograd.grad(conv(odd), odd, g)[0])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        conv.weight.mul_(2.0)
    layer.refresh()  # the phase weights follow the new weights
    xr = x.clone().requires_grad_(True)
    g = torch.randn(2, 4, 4, 4)
    assert torch.allclose(layer.input_grad(g), torch.autograd.grad(conv(xr), xr, g)[0], atol=1e-6)
    conv.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(xr)
    with pytest.raises(ValueError, match="stride-2"):
        PolyphaseConv2d(nn.Conv2d(1, 4, 3, stride=1, padding=1))


def test_only_one_channel_stride_two_convolutions_are_swapped():
    net = _net()
    swapped = polyphase_first_layers(net)
    assert len(swapped) == 1 and net.features[0] is swapped[0]
    assert all(type(m) is nn.Conv2d for m in list(net.features)[2:8:2])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chain_gradient_is_autograds_bit_for_bit(precision):
    """The sampler's gradient without autograd is the same tensor autograd gives, in either precision."""
    model = _net()
    with frozen(model):
        score = score_in_precision(model, precision, kernels="aten")
        assert score.input_grad is not None
        x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        mine = score.input_grad(x)
        assert mine.dtype == torch.float32 and mine.shape == x.shape
        assert torch.equal(mine, _autograd_grad(score, x))
        # and so are whole chains, on one core and on two groups of chains
        plain = lambda images: score(images)  # a callable without input_grad: autograd
        kw = dict(steps=5, step_size=10.0, noise=0.005, grad_clip=0.03, record_at=[4])
        for workers in (1, 2):
            a, _ = langevin(score, x, generator=torch.Generator().manual_seed(2), workers=workers, **kw)
            b, _ = langevin(plain, x, generator=torch.Generator().manual_seed(2), workers=workers, **kw)
            assert torch.equal(a, b)


UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp32": 2.0**-24}


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of a sum of n + 1 terms in precision u."""
    return n * u / (1 - n * u)


def _first_layer_sums(plain, x: torch.Tensor, weight_change=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The exact input gradient of ``plain``'s first layer, and the sum of its terms' magnitudes, per pixel.

    Both from the copy's own (rounded) weights and the gradient reaching that layer, in float64, so
    they are what any order of summation approximates. Also the most terms one pixel's sum has.
    ``weight_change`` edits the float64 weights first (to show what a wrong tap does).
    """
    first = plain.shadow.features[0]
    seen = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["out"] = output

    hook = first.register_forward_hook(keep)
    image = plain._cast(x).requires_grad_(True)
    plain.shadow(image).float().sum().backward()
    hook.remove()
    grad_out = seen["out"].grad.double()  # (B, 16, 16, 16): the same tensor on both paths
    weight = first.weight.double()
    if weight_change is not None:
        weight = weight_change(weight.clone())
    exact = torch.nn.grad.conv2d_input(image.shape, weight, grad_out, stride=2, padding=2)
    magnitude = torch.nn.grad.conv2d_input(image.shape, weight.abs(), grad_out.abs(), stride=2, padding=2)
    k = first.kernel_size[0]
    terms = first.out_channels * ((k + 1) // 2) ** 2  # taps reaching one pixel at stride 2, times channels
    return exact, magnitude, terms


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_polyphase_gradient_differs_from_the_plain_copy_only_by_the_order_of_its_sums(precision):
    """The phases and autograd of the same copy without them sum the same products in another order.

    Only the first layer's input gradient differs between the two paths (the layers above are the
    same kernels on the same tensors), and it is a sum of ``terms`` products per pixel of the
    copy's own weights and the gradient reaching the layer. With E the exact sum and M the sum of
    its terms' magnitudes, in precision u (u32 = 2^-24):

    - the phases are one convolution: an fp32 sum (error <= gamma_terms(u32) M), in bf16 then
      rounded once to the output, <= u |E| more;
    - autograd's input gradient is that too where oneDNN runs it; PyTorch's im2col path (bf16 on
      CPUs without native bf16) rounds each tap's column, an fp32 sum over the channels, to bf16
      (<= u M in all) and adds the at most 9 columns in bf16 (<= gamma_8(u) (1 + u) M).

    The difference is at most the sum of the two bounds. A misplaced tap or phase moves a pixel by
    one tap's share of M, far beyond it.
    """
    model = _net()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # weights moved by an optimizer step
    score = score_in_precision(model, precision, kernels="aten")
    plain = score_in_precision(model, precision, kernels="aten", by_phases=False)
    assert len(score.polyphase) == 1 and plain.polyphase == []  # the two paths do differ in the first layer
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with frozen(model):
        mine = score.input_grad(x).double()
        ref = _autograd_grad(plain, x).double()
        exact, magnitude, terms = _first_layer_sums(plain, x)
    u, u32 = UNIT_ROUNDOFF[precision], UNIT_ROUNDOFF["fp32"]
    sums = _gamma(terms, u32) * magnitude  # an fp32 sum of the products, in any order
    rounding = u * exact.abs() if precision == "bf16" else 0.0
    assert ((mine - exact).abs() <= rounding + sums).all()  # the phases: one rounding of an fp32 sum
    ref_bound = sums + (u * magnitude + _gamma(8, u) * (1 + u) * magnitude if precision == "bf16" else 0.0)
    assert ((mine - ref).abs() <= rounding + sums + ref_bound).all()

    def drop_corner_tap(weight):
        weight[..., 0, 0] = 0
        return weight

    with frozen(model):  # and the first bound is tight enough to see one tap of 25 left out
        wrong, _, _ = _first_layer_sums(plain, x, drop_corner_tap)
    assert ((wrong - exact).abs() > rounding + sums).any()


def test_networks_outside_the_known_layers_use_autograd():
    def tanh_net():
        return ChainNet(nn.Conv2d(1, 4, 3, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16 * 16, 1))

    assert layer_chain(tanh_net()) is None
    assert layer_chain(nn.Sequential(nn.Linear(3, 1))) is None  # no layers() method
    other = tanh_net()
    score = score_in_precision(other, "fp32")
    assert score.input_grad is None
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    with frozen(other):
        x, _ = langevin(score, x0, steps=2, step_size=1.0, noise=0.0, grad_clip=0.0)
    assert not torch.equal(x, x0)


def test_chain_input_grad_matches_autograd_on_a_plain_chain():
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5), nn.SiLU(),
              nn.Linear(5, 1)]
    for layer in layers:
        layer.double().requires_grad_(False)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    ref = _autograd_grad(lambda v: nn.Sequential(*layers)(v).squeeze(-1), x)
    assert torch.allclose(chain_input_grad(layers, x), ref, rtol=0, atol=1e-12)


def test_shortcuts_can_be_switched_off_for_the_benchmark():
    model = _net()
    plain = score_in_precision(model, "bf16", by_phases=False, without_autograd=False)
    assert plain.input_grad is None and plain.polyphase == []
    assert all(type(m) is not PolyphaseConv2d for m in plain.shadow.modules())
    fast = score_in_precision(model, "bf16")
    assert fast.input_grad is not None and len(fast.polyphase) == 1
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with frozen(model):
        assert torch.equal(plain(x), fast(x))  # the same forward
        ref = _autograd_grad(plain, x).double()
        exact, magnitude, terms = _first_layer_sums(plain, x)
    assert ref.abs().max() > 0
    # bf16, the same products summed in another order: the bound of the test above
    u, sums = UNIT_ROUNDOFF["bf16"], _gamma(terms, UNIT_ROUNDOFF["fp32"]) * magnitude
    bound = u * exact.abs() + 2 * sums + u * magnitude + _gamma(8, u) * (1 + u) * magnitude
    assert ((fast.input_grad(x).double() - ref).abs() <= bound).all()
