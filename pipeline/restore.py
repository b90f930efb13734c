"""Restoration of damaged digits: damage them, then let Langevin dynamics on the energy redraw the
damaged pixels while the known ones stay as they are (the sampler's ``mask``).

Two tasks, each with its params in the ``restore`` section:

- ``inpaint``: a half of the image (or a centred box) is replaced by uniform noise; only those
  pixels move.
- ``denoise``: ``salt_pepper`` sets a share of the pixels to -1 or 1 at random; their positions are
  known, their values lost, and only they move. ``gaussian`` adds N(0, std^2) to every pixel, so
  every pixel is damaged and moves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from pipeline.classifier import DigitClassifier, accuracy
from pipeline.config import LangevinConfig, RestoreConfig
from pipeline.langevin import ScoreFn, sample

TASKS = ("inpaint", "denoise")


def region_mask(shape: tuple[int, ...], region: str, box: int) -> torch.Tensor:
    """A bool mask of ``shape`` (..., H, W): True on the region to blank (a half, or a centred box)."""
    mask = torch.zeros(shape[-2:], dtype=torch.bool)
    h, w = mask.shape
    if region == "top":
        mask[: h // 2] = True
    elif region == "bottom":
        mask[h // 2 :] = True
    elif region == "left":
        mask[:, : w // 2] = True
    elif region == "right":
        mask[:, w // 2 :] = True
    elif region == "box":
        top, left = (h - box) // 2, (w - box) // 2
        mask[top : top + box, left : left + box] = True
    else:
        raise ValueError(f"unknown inpainting region {region!r}")  # config validation keeps users from here
    return mask.expand(shape).clone()


def damage(
    task: str, images: torch.Tensor, cfg: RestoreConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(damaged images, mask of the damaged pixels) for ``task`` on CPU images in [-1, 1]."""
    if task == "inpaint":
        mask = region_mask(images.shape, cfg.inpaint_region, cfg.inpaint_box)
        noise = torch.rand(images.shape, generator=generator) * 2 - 1
        return torch.where(mask, noise, images), mask
    if task == "denoise" and cfg.denoise_kind == "salt_pepper":
        mask = torch.rand(images.shape, generator=generator) < cfg.denoise_share
        salt = torch.where(torch.rand(images.shape, generator=generator) < 0.5, -1.0, 1.0)
        return torch.where(mask, salt, images), mask
    if task == "denoise" and cfg.denoise_kind == "gaussian":
        noisy = (images + cfg.denoise_std * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
        return noisy, torch.ones_like(images, dtype=torch.bool)
    raise ValueError(f"unknown restoration task {task!r} ({cfg.denoise_kind})")


def describe(task: str, cfg: RestoreConfig) -> str:
    """The damage of ``task`` in words, for tables and figures."""
    if task == "inpaint":
        if cfg.inpaint_region == "box":
            return f"centred {cfg.inpaint_box}x{cfg.inpaint_box} box set to uniform noise"
        return f"{cfg.inpaint_region} half set to uniform noise"
    if cfg.denoise_kind == "salt_pepper":
        return f"salt-and-pepper on {cfg.denoise_share:.0%} of the pixels"
    return f"Gaussian noise, std {cfg.denoise_std:g}, on every pixel"


def restore(
    score_fn: ScoreFn,
    damaged: torch.Tensor,
    mask: torch.Tensor,
    cfg: RestoreConfig,
    langevin_cfg: LangevinConfig,
    generator: torch.Generator,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``cfg.steps`` Langevin steps of size ``cfg.step_size`` from ``damaged``, moving only the pixels of
    ``mask`` (noise, clip, precision and workers of the ``langevin`` section)."""
    sampler_cfg = dataclasses.replace(langevin_cfg, step_size=cfg.step_size)
    x, _ = sample(score_fn, damaged, sampler_cfg, steps=cfg.steps, generator=generator, progress=progress, mask=mask)
    return x


def task_metrics(
    task: str,
    classifier: DigitClassifier,
    labels: torch.Tensor,
    images: dict[str, torch.Tensor],
    scores: dict[str, np.ndarray],
    device: torch.device,
) -> dict[str, float]:
    """``restore_<task>_{acc,mse,score}`` of the restored digits, with ``_corrupted`` (the damaged ones)
    and ``_original`` beside them. ``images`` and ``scores``: original, damaged, restored. The accuracy
    is the digit classifier's against the true labels; the MSE is over every pixel, against the originals."""
    original = images["original"]
    suffix = {"restored": "", "damaged": "_corrupted", "original": "_original"}
    metrics: dict[str, float] = {}
    for kind, end in suffix.items():
        metrics[f"restore_{task}_acc{end}"] = accuracy(classifier, images[kind], labels, device)
    for kind in ("restored", "damaged"):
        metrics[f"restore_{task}_mse{suffix[kind]}"] = float(((images[kind] - original) ** 2).mean())
    for kind, end in suffix.items():
        metrics[f"restore_{task}_score{end}"] = float(scores[kind].mean())
    return metrics


def markdown_table(metrics: dict[str, float], tasks: dict[str, str], n: int) -> str:
    """The restoration metrics, one row per task, in markdown."""
    lines = [
        (
            "| task | damage | digits | accuracy: original / damaged / restored "
            "| MSE to the original: damaged / restored | mean score: original / damaged / restored |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for task, damage_text in tasks.items():
        m = {k.removeprefix(f"restore_{task}_"): v for k, v in metrics.items() if k.startswith(f"restore_{task}_")}
        lines.append(
            f"| {task} | {damage_text} | {n} | {m['acc_original']:.3f} / {m['acc_corrupted']:.3f} / **{m['acc']:.3f}** "
            f"| {m['mse_corrupted']:.4f} / **{m['mse']:.4f}** "
            f"| {m['score_original']:.3f} / {m['score_corrupted']:.3f} / {m['score']:.3f} |"
        )
    return "\n".join(lines) + "\n"
