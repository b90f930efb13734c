"""The fp32 CPU sampler's input gradient with the compiled kernels (pipeline/native, pipeline/nativegrad.py)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from pipeline import native
from pipeline.langevin import KernelError, langevin, resolve_kernels, score_in_precision
from pipeline.model import EnergyNet, frozen
from pipeline.nativegrad import CompiledChain, split_chain
from tests.nets import ChainNet

CPU = torch.device("cpu")
needs_kernels = pytest.mark.skipif(
    native.load() is None, reason=f"the compiled kernels cannot be built here: {native.reason()}"
)


def _net(channels=(16, 32, 64, 64), hidden=64, seed=0) -> EnergyNet:
    torch.manual_seed(seed)
    net = EnergyNet(channels, hidden).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # weights moved by training: larger activations than at initialisation
    return net


def _grad64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input gradient in float64: what any fp32 implementation approximates."""
    model64 = copy.deepcopy(model).double()
    xd = x.double().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model64(xd).sum(), xd)
    return grad


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@needs_kernels
@pytest.mark.parametrize("channels, hidden, n", [((16, 32, 64, 64), 64, 16), ((16, 32, 64, 64), 64, 1),
                                                 ((8, 16, 24, 40), 32, 5), ((4, 12, 8, 100), 16, 3)])
def test_compiled_gradient_is_the_gradient_to_fp32_rounding(channels, hidden, n):
    """Against float64 autograd, the compiled gradient errs no more than ATen's fp32 path, up to a small
    factor (other sums, an exponential within 2 ulp), and far less than one tap of the first layer."""
    model = _net(channels, hidden)
    with frozen(model):
        compiled = score_in_precision(model, "fp32", kernels="compiled")
        aten = score_in_precision(model, "fp32", kernels="aten")
        assert compiled.kernels == "compiled" and aten.kernels == "aten"
        x = _images(n)
        exact = _grad64(model, x)
        mine, theirs = compiled.input_grad(x), aten.input_grad(x)
    assert mine.dtype == torch.float32 and mine.shape == x.shape
    scale = exact.abs().max().item()
    err_mine = (mine.double() - exact).abs().max().item()
    err_aten = (theirs.double() - exact).abs().max().item()
    assert err_mine <= 4 * err_aten + 1e-6 * scale, (err_mine, err_aten, scale)
    assert err_mine <= 1e-5 * scale
    with torch.no_grad():  # a wrong tap is far outside that: drop the first layer's corner tap
        model.features[0].weight[..., 0, 0] = 0
        wrong = _grad64(model, x)
    assert (wrong - exact).abs().max().item() > 100 * err_mine


@needs_kernels
def test_refresh_follows_new_weights_and_chains_match_atens():
    model = _net()
    compiled = score_in_precision(model, "fp32", kernels="compiled")
    aten = score_in_precision(model, "fp32", kernels="aten")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.8)
    compiled.sync()
    aten.sync()
    x = _images(8)
    with frozen(model):
        exact = _grad64(model, x)
        assert (compiled.input_grad(x).double() - exact).abs().max() <= 1e-5 * exact.abs().max()
        kw = dict(steps=5, step_size=10.0, noise=0.005, grad_clip=0.03)
        for workers in (1, 2):
            a, _ = langevin(compiled, x, generator=torch.Generator().manual_seed(2), workers=workers, **kw)
            b, _ = langevin(aten, x, generator=torch.Generator().manual_seed(2), workers=workers, **kw)
            assert (a - b).abs().max() < 1e-5  # the same chains, up to the rounding of the gradients
            assert not torch.equal(a, x)


@needs_kernels
def test_threads_keep_their_own_buffers():
    """Groups of chains on threads call one CompiledChain at once, with different batch sizes."""
    model = _net()
    score = score_in_precision(model, "fp32", kernels="compiled")
    batches = {n: _images(n, seed=n) for n in (3, 7, 16)}
    with frozen(model):
        alone = {n: score.input_grad(x) for n, x in batches.items()}
        results: dict[tuple[int, int], torch.Tensor] = {}

        def work(n: int, rounds: int = 20) -> None:
            for r in range(rounds):
                results[(n, r)] = score.input_grad(batches[n])

        threads = [threading.Thread(target=work, args=(n,)) for n in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(g, alone[n]) for (n, _), g in results.items())


def test_which_networks_the_kernels_take():
    net = EnergyNet()
    assert split_chain(net.layers()) is not None
    three_channels = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 1))
    tanh = [nn.Conv2d(1, 8, 3, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16 * 16, 1)]
    stride1 = [nn.Conv2d(1, 8, 3, 1, 1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 1)]
    two_outputs = [nn.Conv2d(1, 8, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 2)]
    for layers in (list(three_channels), tanh, stride1, two_outputs):
        assert split_chain(layers) is None
    with pytest.raises(ValueError, match="handled shape"):
        CompiledChain(tanh, lib=None)


def test_kernels_apply_to_the_fp32_cpu_sampler_only():
    assert resolve_kernels("aten", "fp32", CPU) == "aten"
    assert resolve_kernels("auto", "bf16", CPU) == "aten"
    with pytest.raises(KernelError, match=r"langevin.kernels=compiled.*bf16 on cpu.*langevin.kernels: auto"):
        resolve_kernels("compiled", "bf16", CPU)
    with pytest.raises(KernelError):
        score_in_precision(EnergyNet(), "bf16", kernels="compiled")
    assert score_in_precision(EnergyNet(), "bf16").kernels == "aten"


@needs_kernels
def test_compiled_refuses_a_network_it_cannot_take_and_auto_falls_back():
    torch.manual_seed(0)
    stride1 = ChainNet(nn.Conv2d(1, 8, 3, 1, 1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 1))
    tanh = ChainNet(nn.Conv2d(1, 8, 3, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16 * 16, 1))
    for net, why in ((stride1, "not of the book's shape"), (tanh, "not a chain of layers")):
        assert score_in_precision(net, "fp32").kernels == "aten"
        with pytest.raises(KernelError) as err:
            score_in_precision(net, "fp32", kernels="compiled")
        message = str(err.value)
        assert "\n" not in message and why in message and "langevin.kernels: auto" in message


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A machine without a C compiler, and no library built yet."""
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("EBM_KERNELS_DIR", str(tmp_path / "kernels"))
    native.reset()
    yield
    monkeypatch.undo()
    native.reset()


def test_without_a_compiler_auto_falls_back_and_compiled_says_why(no_compiler, capsys):
    assert native.load() is None
    assert "no C compiler (no-such-compiler not on PATH)" in native.reason()
    assert resolve_kernels("auto", "fp32", CPU) == "aten"
    assert resolve_kernels("auto", "fp32", CPU) == "aten"
    warned = capsys.readouterr().err.splitlines()  # once per process, in one line, with the reason
    assert len(warned) == 1 and "no C compiler" in warned[0] and "ATen's kernels" in warned[0]
    assert resolve_kernels("aten", "fp32", CPU) == "aten" and capsys.readouterr().err == ""
    score = score_in_precision(EnergyNet(), "fp32")
    assert score.kernels == "aten" and score.input_grad is not None  # ATen's gradient without autograd
    with pytest.raises(KernelError) as err:
        score_in_precision(EnergyNet(), "fp32", kernels="compiled")
    message = str(err.value)
    assert "\n" not in message and "no C compiler" in message and "langevin.kernels: auto" in message


@needs_kernels
def test_the_library_is_built_once_per_source_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EBM_KERNELS_DIR", str(tmp_path / "kernels"))
    native.reset()
    try:
        assert native.load() is not None
        built = list((tmp_path / "kernels").glob("kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.load() is not None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("kernels-*.so")] == [stamp]
        assert list((tmp_path / "kernels").iterdir()) == built  # no partial files left
    finally:
        monkeypatch.undo()
        native.reset()
