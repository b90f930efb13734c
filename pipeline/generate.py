"""Sampling from a trained energy model: Langevin chains from uniform noise. Computes no metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pipeline.buffer import uniform_noise
from pipeline.config import GenerateConfig, LangevinConfig
from pipeline.langevin import sample, score_in_precision
from pipeline.model import IMAGE_SHAPE, frozen
from pipeline.progress import Progress


def generate_samples(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    cfg: GenerateConfig,
    langevin_cfg: LangevinConfig,
    device: torch.device,
    progress: str | bool = True,
    progress_seconds: float = 30.0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``cfg.n_samples`` images (CPU, (N, 1, 32, 32) in [-1, 1]) and the chain snapshots.

    Every chain starts from uniform noise and runs ``cfg.steps`` steps of step size
    ``cfg.step_size`` with the noise, gradient clip and precision of the ``langevin`` section;
    with ``cfg.final_steps`` > 0 its last ``final_steps`` steps add noise ``cfg.final_noise`` instead,
    a hotter end (Langevin temperature noise^2 / (2 step size)) that gives the strokes back their soft edges.
    The snapshots hold the first ``cfg.chain_rows`` chains at ``cfg.chain_steps`` (0-based,
    after that step). ``progress`` is a mode of pipeline/progress.py (bar, lines, off; True: bar).

    ``model`` may be several networks (snapshots of one training run, generate.snapshots): the chains are split
    evenly over them, each chain sampling one network, the first network's first (the chain figure's), all from one
    generator, and returned interleaved (chain j of network k at j * len(model) + k, while every network has a
    j-th chain); a single network gives the same samples as a list of it alone.
    """
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampler_cfg = dataclasses.replace(langevin_cfg, step_size=cfg.step_size)
    cool = cfg.steps - cfg.final_steps
    phases = [(sampler_cfg, 0, cool)] if cool else []  # (sampler params, first step, steps)
    if cfg.final_steps:
        phases.append((dataclasses.replace(sampler_cfg, noise=cfg.final_noise), cool, cfg.final_steps))
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    shares = [cfg.n_samples // len(models) + (k < cfg.n_samples % len(models)) for k in range(len(models))]
    firsts = [sum(shares[:k]) for k in range(len(models))]  # each network's first chain
    batches = [  # per network: (first chain, chains) of each batch of its share
        [(first + i, min(cfg.batch_size, share - i)) for i in range(0, share, cfg.batch_size)]
        for first, share in zip(firsts, shares)
    ]
    total = sum(map(len, batches)) * cfg.steps
    bar = Progress("generate", total, mode=progress, interval=progress_seconds, unit="step")
    out, snapshots = [], {}
    for net, net_batches in zip(models, batches):
        net.eval()
        score_fn = score_in_precision(net, langevin_cfg.precision, langevin_cfg.kernels)
        with frozen(net):
            for start, n in net_batches:
                x0 = uniform_noise(n, IMAGE_SHAPE, device=device, generator=generator)
                x, snaps = x0, {}
                for phase_cfg, begin, steps in phases:
                    record = [s - begin for s in cfg.chain_steps if begin <= s < begin + steps] if start == 0 else ()
                    x, phase_snaps = sample(
                        score_fn, x, phase_cfg, steps=steps, generator=generator, record_at=record,
                        progress=lambda _step: bar.update(1),
                    )
                    snaps.update({s + begin: v for s, v in phase_snaps.items()})
                out.append(x.cpu())
                if start == 0:
                    snapshots = {s: v[: cfg.chain_rows] for s, v in snaps.items()}
    bar.close()
    samples = torch.cat(out)
    if len(models) > 1:  # interleaved, so that any first n samples (the grid's 100) mix every network's evenly
        order = [firsts[k] + j for j in range(shares[0]) for k in range(len(models)) if j < shares[k]]
        samples = samples[torch.tensor(order)]
    # The chain figure's rows are the first network's first chains, up to chain_rows (fewer if its share is smaller).
    if len(snapshots) < len(set(cfg.chain_steps)):
        raise RuntimeError("generate: chain snapshots missing")
    return samples, snapshots
