import copy
import math

import torch
from torch import nn

from pipeline.langevin import langevin, score_in_precision
from pipeline.model import EnergyNet, frozen


def _fixed_net() -> EnergyNet:
    torch.manual_seed(0)
    return EnergyNet().eval()


def test_sampler_raises_the_score_and_respects_the_clamp():
    model = _fixed_net()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(32, 1, 32, 32, generator=g) * 2 - 1
    with frozen(model):
        x, _ = langevin(model, x0, steps=20, step_size=10.0, noise=0.005, grad_clip=0.03, generator=g)
    with torch.no_grad():
        before, after = model(x0).mean().item(), model(x).mean().item()
    assert after > before
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_clip_bounds_each_move():
    """Without noise, one step moves every pixel by at most step_size * grad_clip."""
    model = _fixed_net()
    x0 = torch.zeros(8, 1, 32, 32)
    step_size, clip = 10.0, 0.003
    x, _ = langevin(model, x0, steps=1, step_size=step_size, noise=0.0, grad_clip=clip)
    moved = (x - x0).abs().max().item()
    assert moved <= step_size * clip + 1e-6
    assert moved > 0  # and the step did move the image


def test_clamp_holds_with_huge_steps():
    model = _fixed_net()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    x, _ = langevin(model, x0, steps=3, step_size=1e6, noise=0.5, grad_clip=0.0)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0


def test_quadratic_energy_reaches_target_mean_and_variance():
    """E(x) = (x - mu)^2 / (2 sigma^2) is N(mu, sigma^2); Langevin with step eps and noise sqrt(2 eps) samples it."""
    mu, sigma = 0.3, 0.2
    eps = 1e-3

    def score(x):
        return -((x - mu) ** 2).sum(dim=(1, 2, 3)) / (2 * sigma**2)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 1, 1, 1, generator=g) * 2.0
    x, _ = langevin(score, x0, steps=600, step_size=eps, noise=math.sqrt(2 * eps), grad_clip=0.0, generator=g, clamp=None)
    # The discretisation bias of the variance is O(eps / sigma^2) = 2.5%; allow for it and for sampling error.
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.var().item() / sigma**2 - 1) < 0.08


def test_records_requested_steps_on_cpu():
    model = _fixed_net()
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    x, snaps = langevin(model, x0, steps=5, step_size=1.0, noise=0.01, grad_clip=0.03, record_at=[0, 2, 4])
    assert sorted(snaps) == [0, 2, 4]
    assert torch.equal(snaps[4], x)
    assert snaps[0].device.type == "cpu"


U_BF16 = 2.0**-8  # bf16's unit roundoff: 8 significant bits


def bf16_error_bound(model: EnergyNet, x: torch.Tensor) -> torch.Tensor:
    """To first order, the most |score in bf16 - score in fp32| can be for each image, from bf16 rounding alone.

    The bf16 copy rounds the input, every weight and bias, every layer's sum W h + b (counted twice:
    it may be rounded before and after the bias) and every activation, each to within a relative
    u = 2^-8. A relative error u in a quantity q moves the score by at most u |ds/dq| |q|, to first
    order; the bound sums that over every rounded quantity, with ds/dq from float64 autograd. fp32
    sums inside each layer add about 2^-24 per term, far below it.
    """
    net = copy.deepcopy(model).double()
    bounds = []
    for image in x.double().split(1):
        image = image.clone().requires_grad_(True)
        rounded, h = [image], image
        for layer in net.layers():
            h = layer(h)
            if isinstance(layer, (nn.Conv2d, nn.Linear, nn.SiLU)):
                h.retain_grad()
                rounded += [h] if isinstance(layer, nn.SiLU) else [h, h]
        net.zero_grad()
        h.sum().backward()
        with torch.no_grad():
            terms = sum((q.grad * q).abs().sum() for q in rounded)
            terms += sum((p.grad * p).abs().sum() for p in net.parameters())
        bounds.append(U_BF16 * terms.item())
    return torch.tensor(bounds)


def test_bf16_score_is_float32_and_within_bf16_rounding_of_fp32():
    model = _fixed_net()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    fp32 = score_in_precision(model, "fp32")(x)
    bf16_score = score_in_precision(model, "bf16")
    bf16 = bf16_score(x)
    assert bf16.dtype == torch.float32
    # 1.05: the second-order terms of the bound are O(u) = 0.4% of it
    assert ((bf16 - fp32).abs() <= 1.05 * bf16_error_bound(model, x)).all()
    with torch.no_grad():  # the copy follows the weights only when synced
        model.head[2].bias.add_(1.0)
    assert torch.equal(bf16_score(x), bf16)
    bf16_score.sync()
    with torch.no_grad():
        moved = model(x)
    assert ((bf16_score(x) - moved).abs() <= 1.05 * bf16_error_bound(model, x)).all()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(bf16_score(x).sum(), x)
    assert grad.dtype == torch.float32


def test_chain_groups_on_threads_are_deterministic_and_equal_to_separate_runs():
    """...and the sampler gives the caller back the intra-op thread count it found."""
    model = _fixed_net()
    found = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, which the chain groups run with
    x0 = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    kw = dict(steps=4, step_size=10.0, noise=0.01, grad_clip=0.03, record_at=[1, 3])
    try:
        with frozen(model):
            a, snaps_a = langevin(model, x0, generator=torch.Generator().manual_seed(0), workers=2, **kw)
            threads_after = torch.get_num_threads()
            b, _ = langevin(model, x0, generator=torch.Generator().manual_seed(0), workers=2, **kw)
    finally:
        torch.set_num_threads(found)
    assert threads_after == 3
    with frozen(model):
        # The same result as running the two halves one after the other with the derived seeds.
        seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(0)).tolist()
        halves = [
            langevin(model, part, generator=torch.Generator().manual_seed(seed), **kw)[0]
            for part, seed in zip(torch.tensor_split(x0, 2), seeds)
        ]
    assert torch.equal(a, b)
    assert torch.allclose(a, torch.cat(halves), atol=1e-6)
    assert sorted(snaps_a) == [1, 3] and snaps_a[3].shape == (10, 1, 32, 32)
