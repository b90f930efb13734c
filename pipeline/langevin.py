"""Langevin dynamics on a score function: noisy gradient ascent on s(x) w.r.t. the input.

A pure function of a callable: it knows nothing of models, buffers or optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch


ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def langevin(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    grad_clip: float,
    generator: torch.Generator | None = None,
    record_at: Iterable[int] = (),
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``steps`` Langevin steps from ``x0``; return the final images and the recorded ones.

    Per step: add N(0, noise^2) and clamp; take d s(x) / dx; clip it elementwise to
    +-grad_clip (0 = no clip); move x by step_size * gradient; clamp again.
    ``record_at`` holds 0-based step indices whose result (after that step) is kept on CPU:
    index 0 is the image after the first step, index steps-1 the final one, as in the book.
    ``clamp=None`` leaves the support unbounded (for analytic tests on unbounded targets).
    """
    record = set(record_at)
    snapshots: dict[int, torch.Tensor] = {}
    x = x0.detach().clone()
    lo, hi = clamp if clamp is not None else (None, None)
    for step in range(steps):
        if noise > 0:
            x.add_(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), alpha=noise)
        if clamp is not None:
            x.clamp_(lo, hi)
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score_fn(x).sum(), x)
        x = x.detach()
        if grad_clip > 0:
            grad.clamp_(-grad_clip, grad_clip)
        x.add_(grad.to(x.dtype), alpha=step_size)
        if clamp is not None:
            x.clamp_(lo, hi)
        if step in record:
            snapshots[step] = x.detach().cpu().clone()
        if progress is not None:
            progress(step)
    return x, snapshots


class SamplerScore:
    """The model as the sampler's score callable, in the sampler's precision.

    fp32 calls the model itself. bf16 runs a bf16 copy of the weights (refreshed by ``sync()``
    after each optimizer step): casting the weights once per training iteration instead of on
    every Langevin step, which autocast would do. The images stay float32 throughout, since
    bf16 cannot resolve the sampler's 0.005 noise near |x| = 1; only the network's arithmetic
    is bf16, and the gradient comes back as float32 through the input cast.
    """

    def __init__(self, model: torch.nn.Module, precision: str) -> None:
        self.model = model
        self.precision = precision
        self.shadow: torch.nn.Module | None = None
        if precision == "bf16":
            self.shadow = copy.deepcopy(model).to(torch.bfloat16)
            for p in self.shadow.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def sync(self) -> None:
        if self.shadow is not None:
            for mine, source in zip(self.shadow.parameters(), self.model.parameters()):
                mine.copy_(source)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shadow is None:
            return self.model(x)
        return self.shadow(x.to(torch.bfloat16)).float()


def score_in_precision(model: torch.nn.Module, precision: str) -> SamplerScore:
    """A synced ``SamplerScore`` of ``model``."""
    score = SamplerScore(model, precision)
    score.sync()
    return score
