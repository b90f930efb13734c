"""``python -m pipeline bench --levers N``: the kernels the trainer could use, and why it uses the ones it does.

The sampler's cost is one forward pass and one input gradient of every layer, per Langevin
step, for one group of chains on one thread (``train.batch_size / workers`` images). This times,
for each convolution of the configured network at that size, the forward and the input gradient
in the candidate implementations: oneDNN on NCHW and on channels-last tensors, PyTorch's native
(im2col + GEMM) kernels, and, for one-channel stride-2 layers, the input gradient by phases
(``pipeline/polyphase.py``). Then the whole input gradient of the trainer's fp32 sampler, eager
against ``torch.compile`` (Inductor) of the same function. Every figure is the median of N
timings of ``repeats`` calls, the candidates alternating, in milliseconds per call.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Params
from pipeline.inputgrad import _backward as layer_input_grad  # the sampler's own kernel call, per layer
from pipeline.inputgrad import chain_input_grad, layer_chain
from pipeline.model import IMAGE_SHAPE, EnergyNet
from pipeline.polyphase import PolyphaseConv2d, polyphase_first_layers
from pipeline.runtime import chain_workers, resolve_device


def _medians(candidates: dict[str, Callable[[], object]], reps: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call of each candidate: the median over ``reps`` rounds, candidates alternating."""
    for fn in candidates.values():  # warm-up: oneDNN builds its primitives on first use
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_candidates(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Forward and input-gradient implementations of one convolution at input ``x`` (NCHW, fp32)."""
    conv = copy.deepcopy(conv).requires_grad_(False)
    weight, bias = conv.weight, conv.bias
    grad_out = torch.randn_like(conv(x))
    x_cl, w_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight, grad_out))
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)

    def native(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.backends.mkldnn.flags(enabled=False):
                return fn()
        return call

    def fwd(inp: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
        return lambda: F.conv2d(inp, w, bias, conv.stride, conv.padding)

    candidates = {
        "forward oneDNN NCHW": fwd(x, weight),
        "forward oneDNN channels-last": fwd(x_cl, w_cl),
        "forward native": native(fwd(x, weight)),
        "input gradient oneDNN NCHW": lambda: layer_input_grad(conv, x, grad_out),
        "input gradient oneDNN channels-last": lambda: layer_input_grad(conv_cl, x_cl, g_cl),
        "input gradient native": native(lambda: layer_input_grad(conv, x, grad_out)),
    }
    if conv.in_channels == 1 and PolyphaseConv2d.supports(conv):
        phases = PolyphaseConv2d(conv_cl)
        candidates["input gradient by phases (channels-last)"] = lambda: phases.input_grad(g_cl)
    return candidates


def run(params: Params, reps: int, repeats: int = 20, compile_step: bool = True, out: TextIO = sys.stdout) -> dict:
    device = resolve_device(params.runtime)
    if device.type != "cpu":
        print("levers: CPU kernels only; skipped on " + device.type, file=out, flush=True)
        return {}
    torch.set_flush_denormal(params.runtime.flush_denormal)
    group = max(1, params.train.batch_size // chain_workers(params.langevin.workers, device))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one group of chains runs on one core
    results: dict[str, dict[str, float]] = {}
    try:
        torch.manual_seed(0)
        model = EnergyNet.from_config(params.model).eval().requires_grad_(False)
        print(f"levers: fp32, {group} images (one group of chains) on 1 thread, median of {reps} x {repeats} calls, "
              "ms per call", file=out, flush=True)
        h = torch.rand(group, *IMAGE_SHAPE) * 2 - 1
        for layer in model.features:
            if isinstance(layer, nn.Conv2d):
                name = (f"conv {layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} "
                        f"s{layer.stride[0]} at {h.shape[-1]}x{h.shape[-1]}")
                results[name] = _medians(layer_candidates(layer, h), reps, repeats)
                cells = " | ".join(f"{k} {v:.3f}" for k, v in results[name].items())
                print(f"  {name}: {cells}", file=out, flush=True)
            h = layer(h)
        if compile_step:
            results["step"] = _compiled_step(model, group, reps, repeats, out)
    finally:
        torch.set_num_threads(threads)
    return results


def _compiled_step(model: EnergyNet, group: int, reps: int, repeats: int, out: TextIO) -> dict[str, float]:
    """The trainer's fp32 input gradient (channels-last copy, first layer by phases), eager and compiled."""
    shadow = copy.deepcopy(model).to(memory_format=torch.channels_last)
    polyphase_first_layers(shadow)
    layers = layer_chain(shadow)
    x = (torch.rand(group, *IMAGE_SHAPE) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def eager() -> torch.Tensor:
        return chain_input_grad(layers, x)

    candidates: dict[str, Callable[[], object]] = {"eager": eager}
    try:
        start = time.perf_counter()
        compiled = torch.compile(lambda inp: chain_input_grad(layers, inp), dynamic=False)
        compiled(x)
        compile_seconds = time.perf_counter() - start
        candidates["torch.compile (Inductor)"] = lambda: compiled(x)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported platform: say so, carry on
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        print(f"  whole input gradient: torch.compile unavailable here ({reason})", file=out, flush=True)
        compile_seconds = None
    medians = _medians(candidates, reps, repeats)
    cells = " | ".join(f"{k} {v:.3f}" for k, v in medians.items())
    suffix = f" (compiled in {compile_seconds:.0f} s)" if compile_seconds is not None else ""
    print(f"  whole input gradient, the trainer's fp32 sampler: {cells}{suffix}", file=out, flush=True)
    return medians
