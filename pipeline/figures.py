"""Figures: image grids, the Langevin chain, energy histograms, training curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for display."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 10) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> an (H', W') array in [0, 1]."""
    grid = make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
    return grid[0].numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, title: str | None = None) -> plt.Figure:
    grid = image_grid(images, nrow=nrow)
    scale = 0.9 * nrow / 10
    fig, ax = plt.subplots(figsize=(7 * scale, 7 * scale * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def save_chain(snapshots: dict[int, torch.Tensor], path: str | Path) -> plt.Figure:
    """Rows = chains, columns = Langevin steps, as in the book's figure."""
    steps = sorted(snapshots)
    rows = snapshots[steps[0]].shape[0]
    fig, axes = plt.subplots(rows, len(steps), figsize=(1.1 * len(steps), 1.1 * rows + 0.3), squeeze=False)
    for j, step in enumerate(steps):
        imgs = to_unit(snapshots[step])
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"step {step}", fontsize=8)
    fig.suptitle("Langevin chains from uniform noise", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def save_histograms(scores: dict[str, np.ndarray], path: str | Path, bins: int = 50) -> plt.Figure:
    """Overlaid score histograms (score = -energy) of several image sets."""
    finite = np.concatenate([s[np.isfinite(s)] for s in scores.values()])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in scores.items():
        ax.hist(values, bins=edges, alpha=0.55, label=f"{name} (mean {np.mean(values):.3g})", density=True)
    ax.set_xlabel("score s(x) = -E(x)")
    ax.set_ylabel("density")
    ax.set_title("Energy model scores: real digits vs uniform noise vs generated samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def save_curves(history: Sequence[dict[str, float]], path: str | Path) -> plt.Figure:
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key in ("loss", "cdiv", "reg"):
        ax1.plot(steps, [h[key] for h in history], label=key)
    ax1.set_xlabel("step")
    ax1.set_title("losses")
    ax1.legend()
    for key in ("real_score", "fake_score"):
        ax2.plot(steps, [h[key] for h in history], label=key)
    ax2.set_xlabel("step")
    ax2.set_title("mean scores")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
