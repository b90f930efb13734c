"""Langevin dynamics on a score function: noisy gradient ascent on s(x) w.r.t. the input.

A pure function of a callable: it knows nothing of models, buffers or optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline.runtime import autocast

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


def score_in_precision(model: torch.nn.Module, device: torch.device, precision: str) -> ScoreFn:
    """The model as a float32 score callable, run under autocast when ``precision`` is bf16."""

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(x).float()

    return score_fn
