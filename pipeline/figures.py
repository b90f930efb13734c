"""Figures: image grids, the Langevin chain, energy histograms, training curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for display."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 10, padding: int = 2) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> an (H', W') array in [0, 1]: ``nrow`` images a row, white borders.

    The layout of ``torchvision.utils.make_grid(..., padding=2, pad_value=1)``, without importing
    torchvision (seconds at every stage's start).
    """
    tiles = to_unit(images)[:, 0].numpy()  # (N, H, W)
    n, h, w = tiles.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.ones((rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=tiles.dtype)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = r * (h + padding) + padding, c * (w + padding) + padding
        grid[top : top + h, left : left + w] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, title: str | None = None) -> plt.Figure:
    grid = image_grid(images, nrow=nrow)
    scale = 0.9 * nrow / 10
    title_height = 0.4 * (title.count("\n") + 1) if title else 0
    fig, ax = plt.subplots(figsize=(7 * scale, 7 * scale * grid.shape[0] / grid.shape[1] + title_height))
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


def save_ood_scores(
    real: np.ndarray,
    cases: dict[str, np.ndarray],
    aucs: dict[str, float],
    threshold: float | None,
    path: str | Path,
    bins: int = 40,
) -> plt.Figure:
    """One panel per out-of-distribution case: its score histogram over the held-out digits', with its AUC
    and the in/out threshold. Each panel has its own score axis: noise scores far below the digits' would
    squeeze the cases that overlap them into a few bins."""
    cols = min(3, len(cases))
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows + 0.5), squeeze=False)
    for ax, (name, scores) in zip(axes.flat, cases.items()):
        both = np.concatenate([real, scores])
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        ax.hist(real, bins=edges, alpha=0.55, density=True, color="C0")
        ax.hist(scores, bins=edges, alpha=0.55, density=True, color="C1")
        if threshold is not None:
            ax.axvline(threshold, color="black", lw=1, ls="--")
        ax.set_title(f"{name}: AUC {aucs[name]:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        ax.set_xlabel("score s(x) = -E(x)", fontsize=7)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    note = "; dashed: the in/out threshold" if threshold is not None else ""
    fig.suptitle(f"Scores of held-out digits (blue) and of each out-of-distribution case (orange){note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def save_rows(rows: dict[str, Sequence[torch.Tensor | None]], path: str | Path, title: str) -> plt.Figure:
    """One labelled row of images per entry ((N, 1, H, W) in [-1, 1], or a list of (1, H, W) images in which
    None leaves a blank), e.g. examples of each OOD case, or original / damaged / restored digits.

    Drawn as one image with the labels beside it: a subplot per digit would take seconds to lay out."""
    pad = 2
    first = next(image for images in rows.values() for image in images if image is not None)
    h, w = first.shape[-2:]
    cols = max(len(images) for images in rows.values())
    # mid-grey between the images and for blanks: both black and white backgrounds stand out from it
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for i, images in enumerate(rows.values()):
        for j, image in enumerate(images):
            if image is not None:
                top, left = pad + i * (h + pad), pad + j * (w + pad)
                canvas[top : top + h, left : left + w] = to_unit(image)[0].numpy()
    lines = title.count("\n") + 1
    fig, ax = plt.subplots(figsize=(0.55 * cols + 1.7, 0.55 * len(rows) + 0.25 + 0.2 * lines))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))], list(rows), fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
