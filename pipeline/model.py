"""EnergyNet: image (B, 1, 32, 32) in [-1, 1] -> score (B,) = -energy. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.config import ModelConfig

IMAGE_SHAPE = (1, 32, 32)


class EnergyNet(nn.Module):
    """The book's Swish CNN: four stride-2 convolutions, then a two-layer head with a linear output."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), hidden: int = 64) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5, stride=2, padding=2),  # 32 -> 16
            nn.SiLU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),  # 16 -> 8
            nn.SiLU(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1),  # 8 -> 4
            nn.SiLU(),
            nn.Conv2d(c3, c4, kernel_size=3, stride=2, padding=1),  # 4 -> 2
            nn.SiLU(),
            nn.Flatten(),  # (B, c4 * 2 * 2)
        )
        self.head = nn.Sequential(nn.Linear(c4 * 4, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "EnergyNet":
        return cls(channels=tuple(cfg.channels), hidden=cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)  # (B,)

    def layers(self) -> list[nn.Module]:
        """The layers in order: their composition is ``forward`` before the squeeze (see pipeline/inputgrad.py)."""
        return [*self.features, *self.head]


@torch.no_grad()
def normalize_spectral_(model: EnergyNet) -> None:
    """Divide each layer's weight, as a matrix (out, in x kernel), by its largest singular value, in place.

    Spectral normalisation (Miyato et al. 2018, as IGEBM's energy networks use it) applied as a projection after
    each update: the singular value is computed exactly (the matrices are at most 64 x 576), so the network
    stays a plain ``EnergyNet`` for the sampler, the moving average and the saved model.
    """
    for layer in model.layers():
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.dim() >= 2:
            weight.div_(torch.linalg.matrix_norm(weight.flatten(1), ord=2))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Weights stop requiring gradients inside the block (Langevin differentiates w.r.t. the input only)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
